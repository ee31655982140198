"""The persistent worker group: runs, propagates errors, detects dead workers, leaves nothing behind."""

import _thread
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nxd_core import parallel_state as ps
from nxd_core.workers import WorkerDied, WorkerError, WorkerGroup, worker_state

SCRIPTS = Path(__file__).parent / "scripts"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "\nState:\tZ" not in status.read()  # a zombie has exited
    except FileNotFoundError:
        return False


def _wait_gone(pids, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def tp_all_reduce(value):
    t = torch.tensor([float(value + ps.get_tensor_model_parallel_rank())])
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    return ps.get_tensor_model_parallel_rank(), t.item()


def remember(key, value):
    worker_state()[key] = value


def recall(key):
    return worker_state().get(key)


def raise_on_rank(rank, exc):
    if ps.get_tensor_model_parallel_rank() == rank:
        raise exc
    return "fine"


def fail_then_collective():
    """Rank 0 fails; rank 1 waits in an all-reduce that rank 0 never joins."""
    if ps.get_tensor_model_parallel_rank() == 0:
        raise RuntimeError("rank 0 gave up")
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def kill_self_on_rank(rank):
    if ps.get_tensor_model_parallel_rank() == rank:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # the other rank is busy; the front end must not wait for it


class Unpicklable(Exception):
    def __init__(self, message, handle):
        super().__init__(message)
        self.handle = handle

    def __reduce__(self):
        raise TypeError("no pickling")


def raise_unpicklable():
    raise Unpicklable("cannot travel", object())


def test_runs_collectives_and_keeps_state(tp_runner):
    group = tp_runner.group(2)
    tp_runner.run(2, remember, "x", 41)  # also makes sure the group's layout is tp=2
    assert group.run(tp_all_reduce, 10) == [(0, 21.0), (1, 21.0)]
    assert group.run(recall, "x") == [41, 41]
    assert group.run_per_rank(remember, [("y", 1), ("y", 2)]) == [None, None]
    assert group.run(recall, "y") == [1, 2]
    offset = 5
    assert group.run(lambda: offset + ps.get_tensor_model_parallel_rank()) == [5, 6]  # closures travel by value


def test_worker_exception_is_raised_with_its_traceback(tp_runner):
    group = tp_runner.group(2)
    with pytest.raises(KeyError, match="missing-key") as info:
        group.run(raise_on_rank, 1, KeyError("missing-key"))
    note = "\n".join(info.value.__notes__)
    assert "raised on worker rank 1" in note and "raise_on_rank" in note
    with pytest.raises(WorkerError, match="Unpicklable: cannot travel"):
        group.run(raise_unpicklable)
    assert not group.closed and group.run(os.getpid) == group.pids  # still usable


def test_rank_stuck_in_a_collective_after_another_failed_does_not_hang():
    group = WorkerGroup(2, error_grace=1.0)
    pids = group.pids
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 0 gave up") as info:
        group.run(fail_then_collective)
    assert time.monotonic() - start < 10
    assert "did not finish" in "\n".join(info.value.__notes__)
    assert group.closed and _wait_gone(pids) == []


def test_killed_worker_is_detected_within_seconds():
    group = WorkerGroup(2)
    pids = group.pids
    start = time.monotonic()
    with pytest.raises(WorkerDied, match=r"worker rank 1 \(pid \d+\) exited with code -9"):
        group.run(kill_self_on_rank, 1)
    assert time.monotonic() - start < 10
    assert group.closed and _wait_gone(pids) == []
    with pytest.raises(RuntimeError, match="closed"):
        group.run(os.getpid)


def test_close_and_context_manager_leave_no_processes():
    with WorkerGroup(2) as group:
        pids = group.pids
        assert all(_alive(p) for p in pids)
    assert group.closed and _wait_gone(pids, timeout=1.0) == []


def _imported_by_then(name: str, seconds: float = 60.0) -> bool:
    """Whether `name` is in this worker's modules, waiting for its preload thread (not importing it)."""
    deadline = time.monotonic() + seconds
    while name not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.05)
    return name in sys.modules


def test_preloaded_modules_are_imported_as_the_workers_start_and_a_bad_name_is_harmless():
    with WorkerGroup(2, preload=("no_such_module_anywhere", "xml.dom.minidom")) as group:
        assert group.run(_imported_by_then, "xml.dom.minidom") == [True, True]
        assert group.run(_imported_by_then, "no_such_module_anywhere", 0.0) == [False, False]
        assert group.run(_imported_by_then, "xml.sax.saxutils", 0.0) == [False, False], "only what was asked for"


def test_front_end_that_dies_leaves_no_orphans_and_needs_no_main_guard():
    out = subprocess.run([sys.executable, str(SCRIPTS / "abandon_workers.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    assert _wait_gone(pids) == []


def test_same_code_runs_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    out = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(SCRIPTS / "spmd_check.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert report["local_group"] and report["tp"] == 2 and report["tp_rank"] == report["rank"]
        assert report["collectives"] == "shm"  # torchrun's ranks on one node: shared memory
        assert report["error"] < 1e-5


def _megabytes(n: int) -> bytes:
    return bytes(n << 20)


def test_an_interrupt_at_any_moment_of_a_call_leaves_the_group_answering():
    """Ctrl-C may land while a reply is half read or read but not yet recorded: neither may lose it.

    (A lost reply left the interrupted call waiting for a rank that had already answered, until
    the heartbeat limit shut the group down.)
    """
    rng = random.Random(0)
    with WorkerGroup(2, heartbeat_timeout=5) as group:
        answered = 0
        for _ in range(80):
            timer = threading.Timer(rng.uniform(0.0, 0.04), _thread.interrupt_main)
            result = None
            try:
                timer.start()
                try:
                    result = group.run(_megabytes, 4)
                finally:
                    timer.join()  # the interrupt lands in this try, never in the checks below
            except KeyboardInterrupt:
                pass
            if result is not None:  # the call finished before the interrupt
                assert result == [bytes(4 << 20)] * 2
                answered += 1
            assert group.run(os.getpid) == group.pids
        assert 0 < answered < 80, answered  # some calls were interrupted, at different moments
