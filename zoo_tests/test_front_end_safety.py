"""The front end never gives a wrong answer: concurrent callers, interrupts, hung workers, bad inputs.

The bundled demo-llama at tp=2 (trained, so different prompts give different outputs).
"""

import _thread
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from test_workers import _wait_gone

from nxd_core.workers import WorkerDied, WorkerGroup
from nxd_models import from_pretrained_parallel

DEMO = Path(__file__).parent.parent / "nxd_models" / "demo_models"
TARGET, DRAFT = DEMO / "demo-llama", DEMO / "demo-llama-draft"
PROMPTS = [
    "def f(",
    "import os\nimport sys\n",
    "class Reader:\n",
    "for i in range(",
    "return self.",
    "    if x is None:",
    "with open(path) as",
    "print(",
]


@pytest.fixture(scope="module")
def demo(tp_runner):
    """demo-llama at tp=2 on the shared group, and each prompt's single-threaded answers."""
    with from_pretrained_parallel(TARGET, tp=2, workers=tp_runner.workers(2), max_seq_len=512, progress=False) as model:
        expected = {}
        for prompt in PROMPTS:
            ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
            expected[prompt] = (model.generate(prompt, max_new_tokens=12, compile=False).tokens, model(ids))
        assert len({str(tokens) for tokens, _ in expected.values()}) == len(PROMPTS)  # the answers tell the prompts apart
        yield model, expected


@pytest.mark.parametrize("threads", [2, 8])
def test_threads_calling_one_model_each_get_their_own_answer(demo, threads):
    model, expected = demo
    prompts = PROMPTS[:threads]
    start = threading.Barrier(threads)
    outcomes: dict = {}

    def caller(prompt):
        ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        start.wait()
        got = []
        try:
            for _ in range(3):
                got.append((model.generate(prompt, max_new_tokens=12, compile=False).tokens, model(ids)))
        except BaseException as exc:  # recorded and asserted below
            got.append(exc)
        outcomes[prompt] = got

    workers = [threading.Thread(target=caller, args=(p,)) for p in prompts]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    for prompt in prompts:
        tokens, logits = expected[prompt]
        assert len(outcomes[prompt]) == 3, (prompt, outcomes[prompt])
        for got_tokens, got_logits in outcomes[prompt]:
            assert got_tokens == tokens, prompt
            assert torch.equal(got_logits, logits), prompt


def _interrupt_after(seconds: float, running: threading.Event) -> threading.Thread:
    """Interrupt the main thread (as a notebook's interrupt button does) if it is still generating."""

    def interrupt():
        time.sleep(seconds)
        if running.is_set():
            _thread.interrupt_main()

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "compile", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"]
)  # compiled: a cold compile
def test_interrupted_generate_leaves_the_model_answering_correctly(demo, compile):
    model, expected = demo
    if compile:  # compile first: the interrupt should land in decoding, not in the compiler
        model.generate("x", max_new_tokens=4, compile=True)
    running = threading.Event()
    running.set()
    _interrupt_after(0.3, running)
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        try:
            model.generate("def f(", max_new_tokens=480, eos_token_id=[], compile=compile)
        finally:
            running.clear()
    assert time.monotonic() - began < 30  # the workers stopped within a chunk, not at the end of 480 tokens... or soon after
    for prompt in ("import os\nimport sys\n", "class Reader:\n"):
        assert model.generate(prompt, max_new_tokens=12, compile=False).tokens == expected[prompt][0]
        ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        assert torch.equal(model(ids), expected[prompt][1])


def test_interrupted_stream_then_the_next_calls_get_their_own_answers(demo):
    model, expected = demo
    running = threading.Event()
    running.set()
    pieces = []
    _interrupt_after(0.3, running)
    with pytest.raises(KeyboardInterrupt):
        try:
            for piece in model.stream("def f(", max_new_tokens=480, eos_token_id=[], compile=False):
                pieces.append(piece)
        finally:
            running.clear()
    assert pieces  # it was interrupted mid-stream
    assert model.generate("print(", max_new_tokens=12, compile=False).tokens == expected["print("][0]


def test_sigint_to_a_worker_is_ignored(demo):
    """A terminal's Ctrl-C signals the whole process group; the workers are in their own session and ignore it."""
    model, expected = demo
    for pid in model.group.pids:
        assert os.getpgid(pid) != os.getpgid(0)
        os.kill(pid, signal.SIGINT)
    assert model.generate("def f(", max_new_tokens=12, compile=False).tokens == expected["def f("][0]


def test_a_stream_left_open_in_this_thread_is_an_error_not_a_wrong_answer(demo):
    model, expected = demo
    stream = model.stream("def f(", max_new_tokens=40, compile=False)
    next(stream)
    with pytest.raises(RuntimeError, match="still busy in this thread"):
        model.generate("print(", max_new_tokens=4)
    stream.close()
    assert model.generate("print(", max_new_tokens=12, compile=False).tokens == expected["print("][0]


def test_a_stopped_worker_fails_the_call_in_bounded_time_and_leaves_no_process():
    group = WorkerGroup(2, heartbeat_timeout=3.0)
    pids = group.pids
    model = from_pretrained_parallel(TARGET, tp=2, workers=group, max_seq_len=512, progress=False)
    victim = pids[1]

    def stop():
        time.sleep(0.5)
        os.kill(victim, signal.SIGSTOP)

    threading.Thread(target=stop, daemon=True).start()
    began = time.monotonic()
    try:
        with pytest.raises(WorkerDied, match=rf"worker rank 1 \(pid {victim}, stopped\) sent no heartbeat for 3s"):
            model.generate("def f(", max_new_tokens=480, eos_token_id=[], compile=False)
        assert time.monotonic() - began < 20
        assert group.closed and _wait_gone(pids) == []
        with pytest.raises(RuntimeError, match="closed"):
            model.generate("def f(", max_new_tokens=4)
    finally:
        model.close()
        group.close()


def test_a_worker_killed_while_streaming_raises_worker_died():
    group = WorkerGroup(2)
    pids = group.pids
    try:
        model = from_pretrained_parallel(TARGET, tp=2, workers=group, max_seq_len=512, progress=False)
        stream = model.stream("def f(", max_new_tokens=480, eos_token_id=[], compile=False)
        next(stream)
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(WorkerDied, match="worker rank 0"):
            for _ in stream:
                pass
        assert _wait_gone(pids) == []
    finally:
        group.close()


def _all_reduce_or_sleep(seconds):
    import torch.distributed as dist

    from nxd_core import parallel_state as ps

    if ps.get_tensor_model_parallel_rank() == 1:
        time.sleep(seconds)  # alive (heartbeats go on) but never joins
        return "slept"
    dist.all_reduce(torch.ones(1), group=ps.get_tensor_model_parallel_group())
    return "reduced"


def test_collective_timeout_bounds_a_wait_on_a_live_peer():
    group = WorkerGroup(2, collective_timeout=3.0, error_grace=1.0, collectives="gloo")
    pids = group.pids
    began = time.monotonic()
    try:
        with pytest.raises(Exception, match="(?i)timed out|timeout"):
            group.run(_all_reduce_or_sleep, 60)
        assert time.monotonic() - began < 30
    finally:
        group.close()
    assert _wait_gone(pids) == []


# -- bad inputs: a clear error, before anything is sent --------------------------------------------


@pytest.mark.parametrize("bad", [4096, 99999, -1])
def test_ids_outside_the_vocabulary_are_refused(demo, bad):
    model, _ = demo
    ids = torch.tensor([[5, 6, bad, 7]])
    with pytest.raises(ValueError, match=rf"holds id {bad}, outside the vocabulary \[0, 4096\)"):
        model(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(input_ids=ids, max_new_tokens=4)


@pytest.mark.parametrize("shape", [(1, 2), (1, 9), (2, 4)])
def test_a_mask_of_another_shape_is_refused(demo, shape):
    model, _ = demo
    ids = torch.tensor([[5, 6, 8, 7]])
    with pytest.raises(ValueError, match=rf"attention_mask has shape {list(shape)}".replace("[", r"\[").replace("]", r"\]")):
        model(ids, attention_mask=torch.ones(shape, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.generate(input_ids=ids, attention_mask=torch.ones(shape, dtype=torch.long), max_new_tokens=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=-5), "max_new_tokens must be an integer >= 1"),
        (dict(temperature=math.nan), "temperature must be a finite number > 0"),
        (dict(temperature=math.inf, do_sample=True), "temperature must be a finite number > 0"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5, do_sample=True), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(num_speculative_tokens=0, draft_model="draft"), "num_speculative_tokens must be >= 1"),
    ],
)
def test_bad_generation_arguments_are_refused(demo, tp_runner, kwargs, message):
    model, _ = demo
    if kwargs.get("draft_model") == "draft":
        kwargs["draft_model"] = from_pretrained_parallel(DRAFT, tp=1, workers=model.group, max_seq_len=512, progress=False)
    try:
        with pytest.raises(ValueError, match=message):
            model.generate("def f(", **kwargs)
    finally:
        if "draft_model" in kwargs:
            kwargs["draft_model"].close()


@pytest.mark.parametrize(
    "prompts, message", [("", "has no tokens"), ([], "no prompts"), ([""], "has no tokens"), (["a", 3], "prompts must be strings")]
)
def test_empty_or_odd_prompts_are_refused(demo, prompts, message):
    model, _ = demo
    with pytest.raises(ValueError, match=message):
        model.generate(prompts, max_new_tokens=4)


def test_a_closed_draft_is_refused(demo):
    model, _ = demo
    draft = from_pretrained_parallel(DRAFT, tp=1, workers=model.group, max_seq_len=512, progress=False)
    draft.close()
    with pytest.raises(ValueError, match="the draft model is closed"):
        model.generate("def f(", max_new_tokens=4, draft_model=draft)


def test_token_ids_as_the_first_argument_mean_ids(demo):
    """HF's form: generate(input_ids) with a tensor (or a list of ids) first."""
    model, expected = demo
    ids = model.tokenizer("def f(", return_tensors="pt")["input_ids"]
    want = expected["def f("][0]
    assert model.generate(ids, max_new_tokens=12, compile=False).tokens == want
    assert model.generate(ids[0].tolist(), max_new_tokens=12, compile=False).tokens == want
    assert model.generate(ids.tolist(), max_new_tokens=12, compile=False).tokens == want
    with pytest.raises(ValueError, match="given twice"):
        model.generate(ids, input_ids=ids, max_new_tokens=4)
