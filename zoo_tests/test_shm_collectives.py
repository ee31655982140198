"""Shared-memory collectives (nxd_core/shm_*.py): gloo's results at any size and tp, two groups at
once, traced graphs reloaded elsewhere, killed and missing peers reported, nothing left in /dev/shm."""

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from nxd_core import parallel_state as ps
from nxd_core import shm_group
from nxd_core.layers import ColumnParallelLinear, RowParallelLinear
from nxd_core.mappings import all_gather_tensor_model_parallel, all_reduce_tensor_model_parallel
from nxd_core.trace import parallel_model_save, parallel_model_trace
from nxd_core.trace_format import graph_file
from nxd_core.workers import WorkerDied, WorkerGroup

SCRIPTS = Path(__file__).parent / "scripts"
DEV_SHM = Path("/dev/shm")
CHUNK_FP32 = shm_group.BUFFER_BYTES // 4  # fp32 elements per step: larger tensors go in chunks
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def _segments_of(pid: int) -> list[str]:
    """Entries in /dev/shm of a group whose rank 0 has this pid."""
    prefix = f"{shm_group.SEGMENT_PREFIX.strip('/')}{pid}-"
    return [p.name for p in DEV_SHM.iterdir() if p.name.startswith(prefix)]


def _ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` numbers at each fp32 value."""
    _, exponent = torch.frexp(values)
    return torch.ldexp(torch.ones_like(values), exponent - 1 - MANTISSA_BITS[dtype]).clamp(min=2.0**-24)


def compare_with_gloo(numels: list[int]) -> list[tuple]:
    """Per size and dtype: (numel, dtype, sum within tolerance of gloo's, gather and max equal to gloo's, digest)."""
    group = ps.get_tensor_model_parallel_group()
    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_size()
    assert ps.tp_collectives() == "shm"
    report = []
    for numel in numels:
        base = torch.randn(numel, generator=torch.Generator().manual_seed(7919 * rank + numel)) * 4
        exact = base.clone()
        dist.all_reduce(exact, group=group)  # gloo, fp32
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = base.to(dtype)
            ours = all_reduce_tensor_model_parallel(x)
            if dtype == torch.float32:
                close = torch.allclose(ours, exact, rtol=1e-5, atol=1e-5)
            else:
                fp32_sum = x.float()
                dist.all_reduce(fp32_sum, group=group)
                close = bool(((ours.float() - fp32_sum).abs() <= _ulp(fp32_sum, dtype)).all())
            peak = x.clone()
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            pieces = [torch.empty_like(x) for _ in range(tp)]
            dist.all_gather(pieces, x, group=group)
            gathered = torch.cat(pieces)
            same = torch.equal(all_reduce_tensor_model_parallel(x, "max"), peak) and torch.equal(
                all_gather_tensor_model_parallel(x), gathered
            )
            digest = hashlib.sha256(ours.view(torch.uint8).numpy().tobytes()).hexdigest()
            report.append((numel, str(dtype), close, same, digest, ours.shape == x.shape))
    return report


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_results_equal_gloo_at_every_size(tp_runner, tp):
    numels = [1, 3, 1000, 4097, CHUNK_FP32 - 1, CHUNK_FP32 + 5]
    if tp == 2:
        numels.append(5 * CHUNK_FP32 // 2)  # several segments in fp32
    reports = tp_runner.run(tp, compare_with_gloo, numels)
    for entry in reports[0]:
        numel, dtype, close, same, _, shaped = entry
        assert close, f"{dtype} sum of {numel} elements at tp={tp} is off gloo's"
        assert same, f"{dtype} max or gather of {numel} elements at tp={tp} differs from gloo's"
        assert shaped
    digests = [[entry[4] for entry in report] for report in reports]
    assert all(d == digests[0] for d in digests), "every rank must get the same bits"


def _group_shape_check():
    """2-D tensors gather along dim 0; a [3, 5] sum keeps its shape; empty tensors pass."""
    x = torch.full((3, 5), float(ps.get_tensor_model_parallel_rank() + 1))
    gathered = all_gather_tensor_model_parallel(x)
    summed = all_reduce_tensor_model_parallel(x)
    empty = all_reduce_tensor_model_parallel(torch.empty(0, 4))
    return list(gathered.shape), gathered[:, 0].tolist(), summed.unique().tolist(), list(empty.shape)


def test_shapes_are_kept(tp_runner):
    gathered_shape, first_column, summed, empty = tp_runner.run(2, _group_shape_check)[0]
    assert gathered_shape == [6, 5] and first_column == [1, 1, 1, 2, 2, 2]
    assert summed == [3.0] and empty == [0, 4]


# -- choosing the path ----------------------------------------------------------------


def _forced_backend_then_auto() -> tuple:
    """collectives="gloo" keeps the process group's; the op then runs c10d's collective under the same name."""
    from nxd_core import shm_ops

    ps.initialize_model_parallel(2, collectives="gloo")
    forced = ps.tp_collectives()
    name = ps.get_tensor_model_parallel_group().group_name
    x = torch.full((4,), float(ps.get_tensor_model_parallel_rank() + 1))
    through_fallback = shm_ops.all_reduce(x, "sum", name).tolist()
    ps.initialize_model_parallel(2)
    return forced, through_fallback, ps.tp_collectives()


def test_gloo_can_be_forced_and_graphs_still_run(tp_runner):
    forced, summed, auto = tp_runner.run(2, _forced_backend_then_auto)[0]
    assert forced == "backend" and summed == [3.0] * 4 and auto == "shm"
    with pytest.raises(ValueError, match="collectives must be one of"):
        ps.initialize_model_parallel(1, collectives="shared")


def _replicated_layers_never_communicate():
    with ps.replicated():
        inside = ps.tp_shared_memory_group()
        layer = RowParallelLinear(8, 4)
    out = layer(torch.ones(2, 8))
    return inside, ps.tp_collectives(), list(out.shape)


def test_replicated_inside_a_shm_group(tp_runner):
    inside, outside, shape = tp_runner.run(2, _replicated_layers_never_communicate)[0]
    assert inside is None and outside == "shm" and shape == [2, 4]


def _compiled_graph_calls() -> dict:
    """torch.compile's graph of a Row -> Column(gather) block: each collective one node."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    block = nn.Sequential(RowParallelLinear(16, 16), ColumnParallelLinear(16, 8, gather_output=True))
    x = torch.randn(2, 16)
    # Modules share their __call__'s code object, which a long-lived worker has compiled for other
    # tests' models already: room for one more compile of it, whatever ran before.
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1024):
        eager = block(x)
        compiled = torch.compile(block, backend=record, fullgraph=True)(x)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    return {
        "all_reduce": targets.count("nxd.shm_all_reduce.default"),
        "all_gather": targets.count("nxd.shm_all_gather.default"),
        "c10d": sum("c10d" in t for t in targets),
        "equal": torch.equal(eager, compiled),
    }


def test_torch_compile_keeps_each_collective_as_one_call(tp_runner):
    assert tp_runner.run(2, _compiled_graph_calls)[0] == {"all_reduce": 1, "all_gather": 1, "c10d": 0, "equal": True}


# -- groups and segments ----------------------------------------------------------------


def _segment() -> str:
    return shm_group.segment_name(ps.get_tensor_model_parallel_group().group_name)


def _sums(value: float, calls: int) -> bool:
    x = torch.full((1024,), value + ps.get_tensor_model_parallel_rank(), dtype=torch.bfloat16)
    expected = 2 * value + 1
    return all(bool((all_reduce_tensor_model_parallel(x) == expected).all()) for _ in range(calls))


def test_two_groups_at_once_have_their_own_segments_and_leave_none():
    groups = [WorkerGroup(2), WorkerGroup(2)]
    first_ranks = [g.pids[0] for g in groups]
    try:
        segments = [g.run(_segment) for g in groups]
        assert all(s[0] and s[0] == s[1] for s in segments) and segments[0][0] != segments[1][0]
        assert [_segments_of(pid) for pid in first_ranks] == [[], []]  # unlinked once every rank mapped them
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, groups[i].run(_sums, 10.0 * i, 2000))) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert results == {0: [True, True], 1: [True, True]}
    finally:
        for group in groups:
            group.close()
    assert [_segments_of(pid) for pid in first_ranks] == [[], []]


# -- traced graphs -----------------------------------------------------------------------


class Block(nn.Module):
    """Column -> Row (all-reduce) -> Column gathered (all-gather): both collectives in one graph."""

    def __init__(self):
        super().__init__()
        self.up = ColumnParallelLinear(16, 32, gather_output=False)
        self.down = RowParallelLinear(32, 16, input_is_parallel=True)
        self.head = ColumnParallelLinear(16, 12, gather_output=True)

    def forward(self, x):
        return (self.head(torch.relu(self.down(torch.relu(self.up(x))))),)


def build_block(state: dict):
    from nxd_core.checkpoint import load_state_dict_from_full

    block = Block()
    load_state_dict_from_full(block, state)
    return block


def _graph_targets(path: Path) -> list[str]:
    from nxd_core import shm_ops  # noqa: F401  (the graph calls its operators)

    program = torch.export.load(path)
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


def _reload(folder: Path, x: torch.Tensor, tmp_path: Path, collectives: str, compiled: bool = False) -> dict:
    save_file({"0": x}, tmp_path / "inputs.safetensors")
    out = tmp_path / f"out-{collectives}.json"
    args = [sys.executable, str(SCRIPTS / "shm_trace_reload.py"), str(folder), str(tmp_path / "inputs.safetensors"), str(out), collectives]
    done = subprocess.run(args + (["--compiled"] if compiled else []), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_traced_model_saved_and_reloaded_in_a_fresh_process(tp_runner, tmp_path, compiled):
    torch.manual_seed(0)
    with ps.replicated():
        reference = Block()  # tp=1: the unsharded block
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = reference(x)[0]
    folder = tmp_path / "block"
    get_model = functools.partial(build_block, reference.state_dict())
    with parallel_model_trace(get_model, x, tp_degree=2, workers=tp_runner.workers(2), compiled=False) as model:
        torch.testing.assert_close(model(x)[0], expected)
        parallel_model_save(model, folder)
    targets = _graph_targets(folder / graph_file(0, 0))
    assert "nxd.shm_all_reduce.default" in targets and "nxd.shm_all_gather.default" in targets
    assert not any("c10d" in t for t in targets)
    # A fresh process has other group names and segments: the graph follows its TP group.
    on_shm = _reload(folder, x, tmp_path, "auto", compiled)
    assert on_shm["collectives"] == ["shm", "shm"]
    torch.testing.assert_close(torch.tensor(on_shm["output"]), expected)
    if not compiled:  # and where the group has no shared memory, the process group's collectives
        on_gloo = _reload(folder, x, tmp_path, "gloo")
        assert on_gloo["collectives"] == ["backend", "backend"]
        torch.testing.assert_close(torch.tensor(on_gloo["output"]), expected)


# -- peers that die or never come ---------------------------------------------------------


def test_a_killed_rank_is_reported_by_the_others_within_seconds(tmp_path):
    """Ranks started by hand (no front end): SIGKILL one mid-loop; every other raises, nothing stays in /dev/shm."""
    world = 4
    environment = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / "shm_rank.py"), str(r), str(world), str(tmp_path / "init")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        for r in range(world)
    ]
    try:
        ready = [proc.stdout.readline().split() for proc in ranks]
        assert all(line[:1] == ["ready"] and line[2] == "shm" for line in ready), [p.stderr.read() for p in ranks if p.poll() is not None]
        assert _segments_of(ranks[0].pid) == []
        time.sleep(0.5)  # well inside the loop of all-reduces
        killed = time.monotonic()
        ranks[1].send_signal(signal.SIGKILL)
        survivors = [ranks[0], ranks[2], ranks[3]]
        for proc in survivors:
            proc.wait(timeout=20)
        elapsed = time.monotonic() - killed
        reports = [proc.stdout.read() for proc in survivors]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert [proc.returncode for proc in survivors] == [3, 3, 3], reports
    assert elapsed < 5, f"the survivors took {elapsed:.1f}s to notice"
    assert all(report.startswith("raised") for report in reports)
    assert any(f"rank 1 (pid {ranks[1].pid}) exited" in report for report in reports), reports
    assert _segments_of(ranks[0].pid) == []


def _kill_self_in_collectives(victim: int):
    x = torch.ones(4096, dtype=torch.bfloat16)
    for step in range(10**9):
        if step == 500 and ps.get_tensor_model_parallel_rank() == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        all_reduce_tensor_model_parallel(x)


def test_front_end_reports_a_worker_killed_mid_collective():
    group = WorkerGroup(2)
    first = group.pids[0]
    start = time.monotonic()
    with pytest.raises(WorkerDied, match=r"worker rank 1 \(pid \d+\) exited with code -9"):
        group.run(_kill_self_in_collectives, 1)
    assert time.monotonic() - start < 10
    assert group.closed and _segments_of(first) == []


def _missing_peer(seconds: float) -> list:
    """Rank 1 comes late to a group with a 1 s timeout: rank 0 gives up, then rank 1 is told at once."""
    ps.initialize_model_parallel(2, timeout=timedelta(seconds=seconds))
    x = torch.ones(8)
    if ps.get_tensor_model_parallel_rank() == 1:
        time.sleep(3 * seconds)
    start = time.monotonic()
    try:
        all_reduce_tensor_model_parallel(x)
        outcome = "no error"
    except RuntimeError as error:
        outcome = str(error).splitlines()[0]
    waited = time.monotonic() - start
    ps.initialize_model_parallel(2)  # a fresh segment: the failed one stays broken
    return [outcome, waited, float(all_reduce_tensor_model_parallel(x)[0])]


def test_a_peer_that_never_joins_times_out_and_the_group_recovers_on_reinit(tp_runner):
    (late_0, waited_0, after_0), (late_1, waited_1, after_1) = tp_runner.run(2, _missing_peer, 1.0)
    assert "rank 1" in late_0 and "did not join" in late_0 and 0.9 < waited_0 < 3
    assert "stopped" in late_1 and waited_1 < 1
    assert after_0 == after_1 == 2.0


# -- no compiler --------------------------------------------------------------------------

_NO_COMPILER_SCRIPT = """
import torch
from nxd_core import parallel_state as ps
from nxd_core.mappings import all_reduce_tensor_model_parallel
from nxd_core.workers import WorkerGroup

def check():
    ps.initialize_model_parallel(2)  # a second group in the same process: the failed build is not retried
    x = torch.full((4,), float(ps.get_tensor_model_parallel_rank() + 1))
    return ps.tp_collectives(), all_reduce_tensor_model_parallel(x).tolist()

with WorkerGroup(2) as group:
    print(group.run(check))
"""


def test_without_a_compiler_groups_use_gloo_after_one_warning_per_process(tmp_path):
    script = tmp_path / "no_compiler.py"
    script.write_text(_NO_COMPILER_SCRIPT)
    # A compiler that always fails, and an empty extension cache (so nothing built earlier is found).
    environment = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[('backend', [3.0, 3.0, 3.0, 3.0]), ('backend', [3.0, 3.0, 3.0, 3.0])]" in done.stdout
    assert done.stderr.count("shm_collectives.cpp could not be built") == 2, done.stderr[-3000:]  # once per worker
