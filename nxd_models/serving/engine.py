"""The serving engine (front end): continuous batching over one causal LM's KV-cache rows.

    engine = Engine(model)                      # holds the model until engine.close()
    request = engine.submit("def add(a, b):", max_tokens=32)
    for output in request:                      # Output(text, token_ids, finish_reason) as they come
        print(output.text, end="")
    engine.generate("import os", max_tokens=8).text   # or wait for the whole of it

A scheduler thread plans one step at a time: requests whose row is needed back are retired,
waiting requests are admitted into free rows, prompts are prefilled a chunk at a time (so that a
long prompt never stalls the rows that decode), and every decoding row gets its next token in
one forward pass. The workers run each step (generation/worker/continuous.py); only the plan and
the token ids cross. Text, stop strings, max_tokens and cancellation are handled here.

Speculative decoding is not offered per request here: a row's draft tokens would need the draft's
own KV-cache rows kept in step with the target's, and verifying k+1 tokens per row makes the
decode step's shape depend on which rows speculate, which would cost batch invariance.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque

import torch

from ..generation.compile_policy import CompilePolicy
from ..generation.generate import eos_ids
from ..generation.worker import continuous
from ..handles import ParallelModel
from ..inputs import check_vocabulary, sampling_seed
from .requests import Request, SamplingOptions

log = logging.getLogger("nxd.serve")

# Prompt tokens prefilled per step while other rows decode: a step's extra time stays about that of
# one such forward. Prompts are cut at multiples of it from slot 0, so the cut never depends on load.
PREFILL_CHUNK = 128


class EngineError(RuntimeError):
    """The engine cannot take the request now (the subclasses say why)."""


class EngineFull(EngineError):
    """Every row is busy and the waiting queue is full: retry later."""


class EngineClosed(EngineError):
    """The engine is shutting down or closed."""


class EngineDead(EngineError):
    """A worker died (or the model failed): the engine serves no more."""


class Engine:
    """Continuous batching over `model` (a causal LM from from_pretrained_parallel): up to
    model.max_batch_size requests decode together, max_waiting more wait for a free row."""

    def __init__(self, model, *, max_waiting: int = 256, prefill_chunk: int = PREFILL_CHUNK, compile: bool = False):
        """compile: decode with a compiled step, compiled before the first request (once per machine:
        this machine's compile cache keeps it, and a later engine of the same model, tp, dtype and
        rows loads it in about a tenth of a second). A long-lived engine (a server) wants it; the
        default starts at once."""
        if not isinstance(model, ParallelModel):
            raise ValueError(f"Engine serves causal LMs (from_pretrained_parallel of a Llama-family model), got {type(model).__name__}")
        if max_waiting < 0 or prefill_chunk < 1:
            raise ValueError(f"max_waiting must be >= 0 and prefill_chunk >= 1, got {max_waiting} and {prefill_chunk}")
        self.model, self.max_waiting, self.prefill_chunk, self.compile = model, max_waiting, prefill_chunk, compile
        self.eos = eos_ids(model, None)
        self.tokenizer = model.tokenizer if model.has_tokenizer else None
        self.rows: list[Request | None] = [None] * model.max_batch_size
        self._waiting: deque[Request] = deque()
        self._admitted: list[Request] = []  # requests in rows, in admission order (prefill goes first come, first served)
        self._ids = itertools.count(1)
        self._wake = threading.Condition()
        self._closing = self._drain = False
        self.dead: str | None = None  # why the engine stopped serving, once it has
        self.steps = 0
        self.compile_report: dict | None = None  # how the compiled step came to be (compile=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nxd-serving-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    # -- the caller's side ----------------------------------------------------------------------

    def submit(self, prompt, *, request_id: str | None = None, loop=None, **options) -> Request:
        """Queue a prompt (text, or a list of token ids) with SamplingOptions' fields as keywords.
        loop: an asyncio event loop the outputs are delivered to (then iterate with `async for`).
        Raises ValueError for bad input, EngineFull/EngineClosed/EngineDead when it cannot be taken."""
        options = SamplingOptions(**options)
        ids = self.encode(prompt)
        room = self.model.max_seq_len - len(ids)
        if options.max_tokens > room:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_tokens={options.max_tokens} exceeds max_seq_len={self.model.max_seq_len}; "
                f"ask for at most {max(room, 0)} tokens or shorten the prompt"
            )
        if options.stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer, and {self.model.path} has none: pass stop token ids as eos instead")
        seed = sampling_seed(options.seed, not options.greedy)
        with self._wake:
            self._raise_unless_serving()
            if len(self._waiting) >= self.max_waiting + self.rows.count(None):
                raise EngineFull(f"all {len(self.rows)} rows are busy and {len(self._waiting)} requests wait: retry later")
            request = Request(request_id or f"req-{next(self._ids)}", ids, options, seed, self, loop)
            self._waiting.append(request)
            self._wake.notify()
        return request

    def generate(self, prompt, **options) -> Request:
        """Submit and wait: the finished Request (text, token_ids, finish_reason, usage counts)."""
        return self.submit(prompt, **options).result()

    def cancel(self, request: Request) -> None:
        with self._wake:
            request.cancel_requested = True
            self._wake.notify()

    def encode(self, prompt) -> list[int]:
        """Token ids of a prompt (text through the checkpoint's tokenizer, or ids), checked."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model.path} has no tokenizer: give the prompt as token ids")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list | tuple) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt has no tokens: give at least one")
        check_vocabulary(torch.tensor(ids), self.model.config.vocab_size, "prompt")
        return ids

    def health(self) -> dict:
        """{"status": "ok" | "closing" | "dead", "reason", rows in use, waiting, steps, worker pids}."""
        dead = self.dead or self._group_problem()
        status = "dead" if dead else "closing" if self._closing else "ok"
        with self._wake:
            busy, waiting = sum(r is not None for r in self.rows), len(self._waiting)
        return dict(
            status=status,
            reason=dead,
            rows=len(self.rows),
            busy_rows=busy,
            waiting=waiting,
            steps=self.steps,
            workers=self.model.group.pids,
        )

    def close(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests; with drain, let the queued and running ones finish first (up to
        timeout seconds, then they are cancelled); without, cancel them now. The model stays open."""
        with self._wake:
            self._closing, self._drain = True, drain
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._wake:
                self._drain = False
                self._wake.notify()
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Engine({self.model.path.name}, tp={self.model.tp}, rows={len(self.rows)}, {self.health()['status']})"

    def _raise_unless_serving(self) -> None:
        problem = self.dead or self._group_problem()
        if problem:
            raise EngineDead(f"the engine serves no more: {problem}")
        if self._closing:
            raise EngineClosed("the engine is shutting down")

    def _group_problem(self) -> str | None:
        dead = self.model.group.exited_workers()
        if dead:
            return "; ".join(dead)
        return "the worker group is closed" if self.model.group.closed else None

    # -- the scheduler thread ------------------------------------------------------------------

    def _run(self) -> None:
        key = self.model.key
        try:
            with self.model.reserved(f"a serving Engine ({len(self.rows)} rows)"):
                self._open_batch()
                self._started.set()
                try:
                    self._serve()
                finally:
                    if not self.model.group.closed:
                        self.model.run(continuous.close_batch, key)
        except BaseException as exc:  # the model or a worker failed: every request learns why
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
                return
            self.dead = f"{type(exc).__name__}: {exc}"
            log.error("serving stopped: %s", self.dead)
        finally:
            with self._wake:
                for request in [*self._waiting, *(r for r in self.rows if r is not None)]:
                    reason = "error" if self.dead else "cancelled"
                    request.finish(reason, self.dead)
                    self._log(request)
                self._waiting.clear()
                self.rows = [None] * len(self.rows)

    def _open_batch(self) -> None:
        """The workers' batch of rows, its decode step compiled first with compile=True (with a
        notice on stderr when that means waiting: a compile, or a load from the compile cache)."""
        if not self.compile:
            self.model.run(continuous.open_batch, self.model.key)
            return
        policy = CompilePolicy(self.model, "serving_decode", len(self.rows), max_new_tokens=0, force=True)
        policy.announce()
        _, report = self.model.run(continuous.open_batch, self.model.key, policy.fields)
        self.model.compiled_steps.add(policy.name)
        self.compile_report = report
        log.info("decode step compiled in %.2fs (compile cache: %s)", report["compile_seconds"], report["cache"])

    def _serve(self) -> None:
        retire: list[int] = []
        while True:
            with self._wake:
                while not (self._waiting or self._admitted or self._closing or retire):
                    self._wake.wait()
                if self._closing and not self._drain:
                    for request in [*self._waiting, *self._admitted]:
                        request.cancel_requested = True
                retire += self._retire_cancelled()
                if self._closing and not self._waiting and not self._admitted:
                    return
                self._admit()
            prefills = self._prefills()
            decode = any(r.prefilled == r.prompt_tokens for r in self._admitted)
            if not (retire or prefills or decode):
                continue
            made = self.model.run(continuous.step, self.model.key, retire, prefills, decode)
            self.steps += 1
            retire = self._deliver(made)

    def _retire_cancelled(self) -> list[int]:
        """Requests cancelled while waiting end now; rows of cancelled requests are freed."""
        for request in [r for r in self._waiting if r.cancel_requested]:
            self._waiting.remove(request)
            request.finish("cancelled")
            self._log(request)
        freed = []
        for request in [r for r in self._admitted if r.cancel_requested]:
            freed.append(self._free(request))
            request.finish("cancelled")
            self._log(request)
        return freed

    def _admit(self) -> None:
        for row, holder in enumerate(self.rows):
            if not self._waiting:
                return
            if holder is None:
                request = self._waiting.popleft()
                request.row, request.prefilled = row, 0
                self.rows[row] = request
                self._admitted.append(request)

    def _prefills(self) -> list[continuous.Prefill]:
        """The prompt pieces of this step: first come, first served, about prefill_chunk tokens."""
        pieces, tokens = [], 0
        for request in self._admitted:
            while request.prefilled < request.prompt_tokens and tokens < self.prefill_chunk:
                start = request.prefilled
                end = min((start // self.prefill_chunk + 1) * self.prefill_chunk, request.prompt_tokens)
                first = start == 0
                pieces.append(
                    continuous.Prefill(
                        request.row,
                        request.prompt_ids[start:end],
                        start,
                        end == request.prompt_tokens,
                        request.options.sampling_params() if first else None,
                        request.seed if first else None,
                    )
                )
                request.prefilled, tokens = end, tokens + end - start
            if tokens >= self.prefill_chunk:
                break
        return pieces

    def _deliver(self, made: dict[int, list[int]]) -> list[int]:
        """Hand each row's new tokens to its request; the rows of requests that ended."""
        freed = []
        for row, tokens in made.items():
            request = self.rows[row]
            if request is not None and request.take(tokens, self.eos, self.tokenizer):
                with self._wake:
                    freed.append(self._free(request))
                self._log(request)
        return freed

    def _free(self, request: Request) -> int:
        self._admitted.remove(request)
        self.rows[request.row] = None
        return request.row

    def _log(self, request: Request) -> None:
        first = f"{request.first_token_seconds:.3f}s" if request.first_token_seconds is not None else "-"
        log.info(
            "%s: %d prompt + %d completion tokens, %s, first token %s, %.3fs",
            request.id,
            request.prompt_tokens,
            request.completion_tokens,
            request.finish_reason,
            first,
            request.seconds or 0.0,
        )
