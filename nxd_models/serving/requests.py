"""One request to a serving Engine (front end): its options, its tokens and text as they come,
and the outputs its caller iterates (from a thread, or from an asyncio event loop)."""

from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import dataclass

from ..generation.worker.sampling import SamplingParams
from ..inputs import check_generation

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class SamplingOptions:
    """What a request asks for. temperature 0 is greedy (OpenAI's convention); stop strings end
    the text before them; max_tokens counts new tokens, an end-of-sequence token included."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.temperature, int | float) or isinstance(self.temperature, bool) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: no limit), got {self.top_p!r}")
        # generate's checks of the rest, temperature 0 (greedy) allowed above
        check_generation(self.max_tokens, self.temperature or 1.0, self.top_k, None, tokens_name="max_tokens")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {list(self.stop)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampling_params(self) -> SamplingParams:
        if self.greedy:
            return SamplingParams()
        return SamplingParams(True, float(self.temperature), self.top_k, self.top_p if self.top_p < 1 else None)


@dataclass(frozen=True)
class Output:
    """What a request made since its previous output; finish_reason is set on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # one of FINISH_REASONS
    error: str | None = None  # why, when finish_reason is "error"


class Request:
    """A submitted request. Iterate it (for, or async for when submitted with a loop) for its
    outputs, or call result() to wait for the whole of it; cancel() ends it at the next step."""

    def __init__(self, request_id: str, prompt_ids: list[int], options: SamplingOptions, seed, engine, loop=None):
        self.id, self.prompt_ids, self.options, self.seed = request_id, prompt_ids, options, seed
        self.token_ids: list[int] = []
        self.text = ""  # the text shown so far (held back: half characters and what may begin a stop string)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_seconds: float | None = None  # time to the first token
        self.seconds: float | None = None  # submission to the end
        self.cancel_requested = False
        self._engine, self._loop = engine, loop
        self._outputs = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self._delivered = 0  # token_ids already in an Output
        # The scheduler's bookkeeping (engine.py): the KV-cache row, prompt slots written so far.
        self.row: int | None = None
        self.prefilled = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """End this request at the next step boundary (its row is freed; finish_reason "cancelled")."""
        self._engine.cancel(self)

    def __iter__(self):
        if self._loop is not None:
            raise RuntimeError("this request was submitted with an event loop: iterate it with `async for`")
        while True:
            output = self._outputs.get()
            yield output
            if output.finish_reason is not None:
                return

    async def __aiter__(self):
        if self._loop is None:
            raise RuntimeError("this request was submitted without an event loop: iterate it with `for`")
        while True:
            output = await self._outputs.get()
            yield output
            if output.finish_reason is not None:
                return

    def result(self) -> Request:
        """Wait until the request ends; itself, with its text, token_ids and finish_reason."""
        for _ in self:
            pass
        return self

    # -- the engine's side (its scheduler thread) -------------------------------------------------

    def take(self, tokens: list[int], eos: list[int], tokenizer) -> bool:
        """Add new tokens (nothing after the end); push an Output; whether the request has ended."""
        if self.first_token_seconds is None:
            self.first_token_seconds = time.perf_counter() - self.submitted
        reason = None
        for token in tokens:
            self.token_ids.append(token)
            if token in eos:
                reason = "stop"
                break
            if len(self.token_ids) >= self.options.max_tokens:
                reason = "length"
                break
        if tokenizer is None:
            self._push(self.text, reason)
            return reason is not None
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s, max(0, len(self.text) - len(s))) for s in self.options.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif reason is None:
            text = text[: len(text) - _held_back(text, self.options.stop)]
        self._push(text, reason)
        return reason is not None

    def finish(self, reason: str, error: str | None = None) -> None:
        """End the request without new tokens (cancelled, or an error)."""
        if not self.finished:
            self.error = error
            self._push(self.text, reason)

    def _push(self, text: str, reason: str | None) -> None:
        new_text = text[len(self.text) :] if text.startswith(self.text) else text
        new_ids = self.token_ids[self._delivered :]
        self.text, self._delivered = text, len(self.token_ids)
        if reason is not None:
            self.finish_reason = reason
            self.seconds = time.perf_counter() - self.submitted
        elif not new_text and not new_ids:
            return
        output = Output(new_text, new_ids, reason, self.error)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._outputs.put_nowait, output)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                pass
        else:
            self._outputs.put(output)


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many characters at the end of text to hold back: a half character (the tokenizer's
    replacement character) or the start of a stop string that the next tokens may complete."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
