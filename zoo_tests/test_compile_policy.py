"""Compilation that never makes a run slower: the switch to compiled steps mid-generation, the
decision, and the per-machine compile cache (its key, and entries it must not trust)."""

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from llama_fixtures import left_padded_batch, save_tiny_llama

from nxd_core import compile_cache
from nxd_models import from_pretrained_parallel
from nxd_models.generation import compile_policy
from nxd_models.generation.compile_policy import CompilePolicy

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-compile")
    save_tiny_llama(path, "gqa", initializer_range=0.2)
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """This process's compile cache entries in a fresh folder (workers keep theirs where they are)."""
    monkeypatch.setenv("NXD_CACHE_DIR", str(tmp_path / "nxd-cache"))
    return tmp_path / "nxd-cache"


@pytest.fixture
def compiling_pays(monkeypatch, cache_dir):
    """Make the policy's estimate of compiling free and let it trust an eager chunk of any length, so
    that compile=None switches at the second chunk boundary (after token 5): a switch in the middle.
    (With chunks of MEASURED_STEPS, the boundary depends on how fast the machine decodes: a loaded
    machine sized every chunk below 16 steps and never switched.)"""
    from nxd_models.generation import generate

    monkeypatch.setattr(CompilePolicy, "compile_seconds", lambda self: 0.0)
    monkeypatch.setattr(generate, "MEASURED_STEPS", 1)


@pytest.mark.parametrize("tp", [pytest.param(1, marks=pytest.mark.slow), 2])  # tp=1 in the slow run: another cold compile
def test_switching_to_compiled_mid_generation_keeps_greedy_tokens(tp_runner, checkpoint, compiling_pays, tp):
    ids, mask = left_padded_batch()
    with from_pretrained_parallel(
        checkpoint, tp=tp, max_batch_size=3, max_seq_len=40, workers=tp_runner.workers(tp), progress=False
    ) as model:
        eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, compile=False, eos_token_id=[])
        switched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, compile=None, eos_token_id=[])
    assert "compile_seconds" not in eager.stats
    assert 1 < switched.stats["compiled_from_token"] < 24, "the switch must happen in the middle of the generation"
    assert switched.stats["compile_cache"] in ("hit", "miss", "process")
    assert switched.tokens == eager.tokens
    assert all(len(set(row)) > 5 for row in eager.tokens), "outputs must vary for the comparison to mean something"
    assert model.compiled_steps, "the handle remembers the step its workers compiled"


def test_switching_keeps_seeded_sampling_reproducible(tp_runner, checkpoint, compiling_pays):
    ids, mask = left_padded_batch()
    with from_pretrained_parallel(
        checkpoint, tp=2, max_batch_size=3, max_seq_len=64, workers=tp_runner.workers(2), progress=False
    ) as model:
        draw = lambda seed: model.generate(  # noqa: E731
            input_ids=ids, attention_mask=mask, max_new_tokens=36, do_sample=True, seed=seed, eos_token_id=[], compile=None
        )
        first, again, other = draw(0), draw(0), draw(1)
    assert 1 < first.stats["compiled_from_token"] < 36 and 1 < again.stats["compiled_from_token"] < 36
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens


def test_compile_none_stays_eager_where_compiling_cannot_pay(tp_runner, checkpoint, cache_dir):
    """A cold compile costs seconds; 16 tokens of a tiny model take milliseconds: no switch."""
    with from_pretrained_parallel(
        checkpoint, tp=2, max_batch_size=1, max_seq_len=40, workers=tp_runner.workers(2), progress=False
    ) as model:
        result = model.generate(input_ids=[[1, 5, 9]], max_new_tokens=16, eos_token_id=[])
    assert "compile_seconds" not in result.stats and "compiled_from_token" not in result.stats
    assert result.stats["decode_tokens_per_second"] > 0


def _policy(entry_info=None, layers=4, max_new_tokens=1000):
    policy = CompilePolicy.__new__(CompilePolicy)
    policy.fields = {"batch": 1, "tp": 2, "dtype": "torch.bfloat16", "layers": layers}
    policy.layers, policy.max_new_tokens, policy.force, policy.switched = layers, max_new_tokens, False, False
    policy.in_workers, policy._cold = False, None
    policy.entry = None if entry_info is None else compile_cache.Entry({}, Path("."), {"artifacts_sha256": "x", **entry_info})
    return policy


def test_the_decision_weighs_the_compile_against_the_tokens_left(cache_dir):
    warm = {"warm_seconds": 2.0, "eager_step_seconds": 0.004, "compiled_step_seconds": 0.002}
    # the workers measured 2 ms saved per step: 1000 tokens left save 2 s, not more than the 2 s compile,
    # however slow one eager chunk looked from the front end
    assert not _policy(warm).switch_now(produced=0, eager_step=0.004)
    assert not _policy(warm).switch_now(produced=0, eager_step=0.05)
    # 3.5 ms saved per step: 3.5 s for 2 s of compiling, more than the margin asks (1.5 x 2 s + 0.05 s)
    faster = {**warm, "compiled_step_seconds": 0.0005}
    assert not _policy({**warm, "compiled_step_seconds": 0.001}).switch_now(produced=0, eager_step=0.004), "3 s: within the margin"
    assert _policy(faster).switch_now(produced=0, eager_step=0.004)
    assert not _policy(faster).switch_now(produced=0, eager_step=0.0015), "never more than the eager step itself"
    assert not _policy(faster, max_new_tokens=400).switch_now(produced=0, eager_step=0.004)
    assert not _policy(warm).switch_now(produced=0, eager_step=None), "nothing measured yet: no decision"
    policy = _policy(faster)
    assert policy.switch_now(produced=10, eager_step=0.006) and not policy.switch_now(produced=20, eager_step=0.006), "once"
    # nothing measured on this machine: a cold estimate that grows with the layers, savings capped per layer
    cold = _policy(layers=4)
    assert cold.compile_seconds() == compile_policy.COLD_SECONDS_BASE + 4 * compile_policy.COLD_SECONDS_PER_LAYER
    assert cold.saved_per_step(1.0) == pytest.approx(4 * compile_policy.SAVED_PER_LAYER_STEP)
    assert _policy({"cold_seconds": 20.0}).compile_seconds() == pytest.approx(compile_policy.WARM_FRACTION * 20.0)
    assert "once per machine" in cold.notice() and "compile cache" in _policy(warm).notice()
    compiled = _policy(warm)
    compiled.in_workers = True  # these workers compiled the step already: switching costs nothing
    assert compiled.compile_seconds() == 0.0 and compiled.switch_now(produced=990, eager_step=0.004)
    forced = _policy(warm)
    forced.force = True  # compile=True: at the first boundary, measured or not
    assert forced.switch_now(produced=1, eager_step=None)


def _model(tp=2, dtype=torch.bfloat16, batch_size=4, layers=4, hidden=64):
    config = SimpleNamespace(num_hidden_layers=layers, to_dict=lambda: {"hidden_size": hidden, "num_hidden_layers": layers})
    return SimpleNamespace(config=config, tp=tp, dtype=dtype, max_batch_size=batch_size, max_seq_len=128)


def test_the_cache_key_changes_with_tp_dtype_batch_and_model(cache_dir):
    def where(model, batch=1, step="greedy_step"):
        return compile_cache.entry_dir(compile_cache.full_key(compile_policy.step_fields(model, step, batch)))

    base = where(_model())
    assert base == where(_model()), "the same model, step and shape share an entry"
    assert str(base).startswith(str(cache_dir))
    changed = [where(_model(tp=4)), where(_model(dtype=torch.float32)), where(_model(), batch=2), where(_model(hidden=96))]
    changed.append(where(_model(), step="sampled_compute"))
    assert len({base, *changed}) == 6
    key = compile_cache.full_key(compile_policy.step_fields(_model(), "greedy_step", 1))
    assert key["torch"] == torch.__version__ and isinstance(key["cpu_features"], list) and key["code"]


def _write_entry(key, info, blob=b"artifacts"):
    path = compile_cache.entry_dir(key)
    path.mkdir(parents=True)
    sha = hashlib.sha256(blob).hexdigest()
    (path / f"artifacts-{sha[:16]}.bin").write_bytes(blob)
    (path / "entry.json").write_text(json.dumps({"key": key, "info": {"artifacts_sha256": sha, **info}}))
    return path


def test_a_corrupt_or_foreign_entry_is_ignored_with_a_warning_never_loaded(cache_dir, monkeypatch):
    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda blob: loaded.append(blob))
    key = compile_cache.full_key({"step": "greedy_step", "tp": 2})
    path = _write_entry(key, {"cold_seconds": 5.0})
    entry = compile_cache.lookup(key)
    assert entry is not None and compile_cache.load_artifacts(entry) and loaded == [b"artifacts"], "a sound entry loads"

    artifacts = next(path.glob("artifacts-*.bin"))
    artifacts.write_bytes(b"artifacts, altered")
    with pytest.warns(UserWarning, match="does not match the checksum"):
        assert not compile_cache.load_artifacts(compile_cache.lookup(key))
    artifacts.unlink()
    with pytest.warns(UserWarning, match="cannot be read"):
        assert not compile_cache.load_artifacts(compile_cache.lookup(key))

    (path / "entry.json").write_text('{"key": {"step": "greedy_')
    with pytest.warns(UserWarning, match="cannot be read"):
        assert compile_cache.lookup(key) is None
    other = {**key, "tp": 4}
    (path / "entry.json").write_text(json.dumps({"key": other, "info": {}}))
    with pytest.warns(UserWarning, match="another key.*tp: 4 here, 2 wanted"):
        assert compile_cache.lookup(key) is None
    assert loaded == [b"artifacts"], "nothing but the sound entry was ever loaded"

    # a precompiled step is checked the same way, per fingerprint of the arguments it was compiled for
    compile_cache.store(key, precompiled=("fingerprint", "aoti", b"compiled step"))
    entry = compile_cache.lookup(key)
    kind, file = compile_cache.precompiled(entry, "fingerprint")
    assert kind == "aoti" and file.suffix == ".pt2" and file.read_bytes() == b"compiled step"
    assert compile_cache.precompiled(entry, "another fingerprint") is None, "none for other arguments: no warning"
    file.write_bytes(b"compiled step, truncated")
    with pytest.warns(UserWarning, match="precompiled-.*does not match the checksum"):
        assert compile_cache.precompiled(compile_cache.lookup(key), "fingerprint") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compile_cache.lookup(compile_cache.full_key({"step": "never compiled"})) is None, "no entry: no warning"


def _compile_in_a_new_process(checkpoint, env) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "compile_twice.py"), str(checkpoint)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_a_second_process_loads_the_precompiled_step(checkpoint, tmp_path):
    """Processes sharing one cache folder: the first compiles and stores its entry with the step compiled
    ahead of time, the second loads that without tracing (shown by the worker's counters, not by
    timing), with the eager tokens, and so does a third with other weights of the same shapes; a
    fourth, given a precompiled step torch cannot load (its checksum matching), warns, compiles
    afresh and still decodes the same tokens."""
    cache = tmp_path / "nxd-cache"
    env = {**os.environ, "NXD_CACHE_DIR": str(cache)}
    # torch's own caches stay where the suite keeps them warm: what is tested is our entry
    compile_cache.use_persistent_torch_cache()
    env["TORCHINDUCTOR_CACHE_DIR"] = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    first, _ = _compile_in_a_new_process(checkpoint, env)
    second, _ = _compile_in_a_new_process(checkpoint, env)
    assert first["compile_cache"] == "miss" and first["worker_counters"]["stored"] == 1
    assert not first["compile_precompiled"] and first["worker_counters"]["precompiled"] == 0
    assert second["compile_cache"] == "hit" and second["compile_precompiled"]
    assert second["worker_counters"]["precompiled"] == 1 and second["worker_counters"]["hits"] == 1
    assert second["worker_counters"]["stored"] == 0 and second["worker_counters"]["ignored"] == 0
    assert first["tokens"] == first["eager_tokens"] and second["tokens"] == second["eager_tokens"] == first["tokens"]
    assert len(set(first["tokens"][0])) > 2, "outputs must vary for the comparison to mean something"
    [entry_file] = list((cache / "compiled").glob("*/entry.json"))
    data = json.loads(entry_file.read_text())
    info = data["info"]
    assert info["cold_seconds"] > 0 and info["warm_seconds"] > 0, "both compiles were timed"
    assert info["compiled_step_seconds"] > 0, "the compiled steps' time was learnt for the next decision"
    [(fingerprint, known)] = info["precompiled"].items()
    assert known["kind"] == "aoti", "the tiny Llama's step is an AOTInductor package (no compiler imported to load it)"

    # the weights are read from the model on each call, never kept in the precompiled step: a checkpoint
    # of the same config with other weights loads the same step and decodes its own tokens
    other_weights = tmp_path / "other-weights"
    save_tiny_llama(other_weights, "gqa", seed=1, initializer_range=0.2)
    other, _ = _compile_in_a_new_process(other_weights, env)
    assert other["compile_cache"] == "hit" and other["compile_precompiled"]
    assert other["tokens"] == other["eager_tokens"] != first["tokens"]
    data = json.loads(entry_file.read_text())
    info = data["info"]
    assert info["precompiled"] == {fingerprint: known}, "the same step served both checkpoints"

    # bytes that pass their checksum but that torch cannot load: ignored with a warning, never fatal
    garbage = b"not a compiled function"
    (entry_file.parent / compile_cache.precompiled_name("aoti", known["sha256"])).unlink()
    sha = hashlib.sha256(garbage).hexdigest()
    (entry_file.parent / compile_cache.precompiled_name("aoti", sha)).write_bytes(garbage)
    info["precompiled"][fingerprint] = {"kind": "aoti", "sha256": sha}
    entry_file.write_text(json.dumps(data))
    third, stderr = _compile_in_a_new_process(checkpoint, env)
    assert "torch cannot load its precompiled step" in stderr
    assert third["worker_counters"]["ignored"] == 1 and third["worker_counters"]["precompiled"] == 0
    assert not third["compile_precompiled"] and third["tokens"] == first["tokens"]
    info = json.loads(entry_file.read_text())["info"]
    assert info["precompiled"][fingerprint]["sha256"] != sha, "the step compiled afresh replaced the one torch could not load"


def test_where_aotinductor_fails_the_step_is_precompiled_by_torch(checkpoint, cache_dir, monkeypatch):
    """The fallback: a step AOTInductor cannot compile is precompiled by torch's aot_compile (warned
    once), kept in the entry, and loaded from there without tracing by a process that has not
    compiled it (this one, made to forget). Run here, in-process, at tp=1: the worker-side calls."""
    from nxd_core import precompile
    from nxd_core.worker_process import StateKey
    from nxd_models.generation.worker import compiling, decoding
    from nxd_models.generation.worker.sampling import SamplingParams
    from nxd_models.worker_ops import load_shard, release

    def no_aoti(fn, args):
        raise RuntimeError("no AOTInductor here")

    def forget_compiled_steps():  # what a new process starts with
        monkeypatch.setattr(compiling, "_ahead", {})
        monkeypatch.setattr(compiling, "_compiled_here", set())
        monkeypatch.setattr(compiling, "_warned", set())

    def generate(switch: bool):
        ids, mask = torch.tensor([[1, 5, 9]]), torch.ones(1, 3, dtype=torch.long)
        first = decoding.start(key, ids, mask, SamplingParams(), None, [], 0, 12, 2, False, fields)
        rest, _, report = decoding.resume(key, 10, switch=switch)
        decoding.end(key)
        return torch.cat([first, rest], dim=1).tolist(), report

    monkeypatch.setattr(precompile, "compile_package", no_aoti)
    forget_compiled_steps()
    key = StateKey("model", 10**6)
    load_shard(key, str(checkpoint), torch.float32, 1, 32, "cpu", False)
    try:
        fields = {"step": "greedy_step", "model": str(checkpoint), "batch": 1, "max_seq_len": 32, "tp": 1}
        eager, _ = generate(False)
        with pytest.warns(UserWarning, match="could not be compiled by AOTInductor.*no AOTInductor here"):
            compiled, report = generate(True)
        assert report["cache"] == "miss" and not report["precompiled"] and compiled == eager
        [entry] = compile_cache.entries()
        assert [known["kind"] for known in entry.info["precompiled"].values()] == ["dynamo"]
        forget_compiled_steps()
        loaded, report = generate(True)
        assert report["cache"] == "hit" and report["precompiled"] and loaded == eager
        assert len(set(eager[0])) > 2, "outputs must vary for the comparison to mean something"
    finally:
        release(key)


def test_a_precompiled_step_is_chosen_by_what_it_was_compiled_for():
    """dynamo's guards are not saved with a precompiled step: the fingerprint stands for them, and
    changes with every shape, dtype, constant and weight layout the compiled code depends on."""
    from nxd_core.precompile import fingerprint
    from nxd_models.generation.worker.sampling import SamplingParams

    model = torch.nn.Linear(4, 4)
    args = (model, torch.zeros(1, 8, dtype=torch.long), torch.tensor([2]), 0, SamplingParams())
    base = fingerprint(args)
    assert base == fingerprint((torch.nn.Linear(4, 4), torch.ones(1, 8, dtype=torch.long), torch.tensor([7]), 0, SamplingParams()))
    others = [
        (model, torch.zeros(2, 8, dtype=torch.long), *args[2:]),  # batch
        (model, torch.zeros(1, 8, dtype=torch.int32), *args[2:]),  # dtype
        (*args[:2], torch.tensor([2, 3]), *args[3:]),  # two end-of-sequence ids
        (*args[:3], 1, args[4]),  # another padding id
        (*args[:4], SamplingParams(do_sample=True, temperature=0.5)),
        (torch.nn.Linear(4, 6), *args[1:]),  # weights of another shape
    ]
    digests = {fingerprint(other) for other in others}
    assert len(digests) == len(others) and base not in digests
    assert fingerprint(args, collectives={"group": "1"}) != fingerprint(args, collectives={"group": "2"})
    with torch.inference_mode():
        assert fingerprint(args) != base, "inference mode is part of it"


def test_speculative_rounds_compile_with_compile_none_once_these_workers_have_them(tp_runner, checkpoint):
    """Speculative rounds compile from the start or not at all: by default only where the workers
    compiled the same rounds already, so the first call is never slower than eager."""
    ids, mask = left_padded_batch()
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[], prompt_lookup_num_tokens=3)
    with from_pretrained_parallel(
        checkpoint, tp=2, max_batch_size=3, max_seq_len=40, workers=tp_runner.workers(2), progress=False
    ) as model:
        first = model.generate(**args)
        compiled = model.generate(**args, compile=True)
        again = model.generate(**args)
        other_k = model.generate(**{**args, "prompt_lookup_num_tokens": 2})
    assert not first.stats["compiled_rounds"] and compiled.stats["compiled_rounds"] and again.stats["compiled_rounds"]
    assert not other_k.stats["compiled_rounds"], "other rounds (k) were never compiled here"
    assert first.tokens == compiled.tokens == again.tokens


def test_inductor_cache_moves_under_ours_unless_the_user_chose_one(monkeypatch, cache_dir):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    assert compile_cache._torch_default_cache_dir() == os.path.abspath(default_cache_dir()), "torch changed its default"
    for before in (None, default_cache_dir()):  # unset, or torch's own default written into the environment
        if before is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
        compile_cache.use_persistent_torch_cache()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_dir / f"torchinductor-{torch.__version__}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/chosen")
    compile_cache.use_persistent_torch_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/chosen"
    # a worker that never compiles must not pay for importing the compiler (2 s)
    code = "import sys, nxd_core.compile_cache as c; c.use_persistent_torch_cache(); print('torch._inductor' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
