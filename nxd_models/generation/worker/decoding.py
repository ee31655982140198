"""Causal LM generation inside the workers: prefill, decode_one_token, decode_n_tokens.

Every rank runs the same loop on the same gathered logits with the same
seeded generator, so every rank picks the same tokens; only token ids go
back to the front end (tokens are tiny: every rank returns them, which is
what a torchrun script on each rank needs). A `Session` holds one batch's progress between calls,
next to the model and its KV cache in `worker_state()`. decode_n_tokens is the loop of every
session (seq2seq.py's too): a session says how it advances one step.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from nxd_core.worker_process import StateKey, worker_state

from ...worker_ops import device_of, end_session, owned_key
from .compiling import AheadOfTime, record_step_times, switch_to_compiled
from .sampling import SamplingParams, choose, seeded_generator

SESSION = "session"  # the worker_state() kind of a causal LM's generation in flight


class Decoding(Protocol):
    """What decode_n_tokens advances, one token per row per step."""

    slot: int  # the KV-cache slot of the next token fed (shared by the rows)
    last_tokens: torch.Tensor  # [batch], the tokens to feed next
    finished: torch.Tensor  # [batch] bool
    remaining: int  # tokens still allowed

    def advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed last_tokens at slot; (the next tokens [batch], the updated finished flags)."""


@dataclass
class Session:
    valid: torch.Tensor  # [batch, max_seq_len]: 0 on the prompt's left padding, 1 elsewhere (static shape)
    slot: int
    last_tokens: torch.Tensor
    finished: torch.Tensor
    remaining: int
    step: Callable  # (tokens, valid, cache_position, finished) -> (next tokens, finished): see decode_one_token
    compiled_step: Callable | None = None  # (ahead) -> the compiled version of step, for a switch in flight
    compile_fields: dict | None = None  # the compile cache key's fields (its entry learns the step times)
    compiled: bool = False  # switched to the compiled step
    steps_taken: int = 0  # by the current step (a switch starts again: the compiled step's first call runs its guards)
    seconds: dict = field(default_factory=lambda: {"eager": [0.0, 0], "compiled": [0.0, 0]})  # time and steps per kind

    def advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        position = torch.tensor([self.slot], device=self.valid.device)
        began = time.perf_counter()
        chosen = guarded_call(self.steps_taken > 0, self.step, self.last_tokens, self.valid, position, self.finished)
        if self.steps_taken > 0:  # a first call may compile: not a step's time
            spent = self.seconds["compiled" if self.compiled else "eager"]
            spent[0] += time.perf_counter() - began
            spent[1] += 1
        self.steps_taken += 1
        return chosen

    def mean_step_seconds(self, kind: str) -> float | None:
        total, steps = self.seconds[kind]
        return total / steps if steps else None


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Write the prompt into the KV cache (slots 0..len-1); return the last position's logits [batch, vocab]."""
    slots = torch.arange(input_ids.shape[1], device=input_ids.device)
    return model(input_ids, attention_mask=attention_mask, cache_position=slots, last_only=True)[:, -1]


def decode_one_token(
    compute: Callable, tokens, valid, cache_position, finished, eos, pad_token_id: int, params: SamplingParams, generator=None
):
    """Feed one token per row at cache_position ([1], shared by the rows) and choose the next ones.
    Shapes never change from step to step, so a compiled version compiles once."""
    logits = compute(tokens[:, None], valid, position_ids=None, cache_position=cache_position, last_only=True)[:, -1]
    return choose(logits, finished, eos, pad_token_id, params, generator)


def greedy_step(model, tokens, valid, cache_position, finished, eos, pad_token_id: int, params: SamplingParams):
    """decode_one_token on the model's compute as a function of the model, not a partial of its
    method: what a compiled step must be to be compiled ahead of time and reused by another process
    (nxd_core.precompile; the weights are read from `model` on each call, not kept in the step)."""
    return decode_one_token(model.compute, tokens, valid, cache_position, finished, eos, pad_token_id, params)


def forward_step(model, input_ids, valid, cache_position):
    """The forward pass of sampled decoding (the draw stays eager), as a function of the model: see greedy_step."""
    return model.compute(input_ids, valid, None, cache_position, True)


def as_compute(forward: Callable) -> Callable:
    """A compiled forward(input_ids, valid, cache_position) (forward_step's, or another whose
    last_only is fixed) called the way model.compute is called here."""
    return lambda input_ids, valid, position_ids=None, cache_position=None, last_only=True: forward(input_ids, valid, cache_position)


# Every model a worker loads compiles the same code objects again (its compute, the step functions),
# and torch gives up compiling a code object after 8 versions by default: a long-lived worker
# (a notebook, a server, the test suite) would then decode eagerly without a word.
RECOMPILE_LIMIT = 256


def compiled(key: StateKey, name: str, function: Callable) -> Callable:
    """torch.compile(function), kept per model in the worker so that it compiles once."""
    functions = worker_state().setdefault(owned_key(key, "compiled"), {})
    if name not in functions:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        functions[name] = torch.compile(function, dynamic=False)
    return functions[name]


def decode_step(
    model, key: StateKey, compile: bool, eos, pad_token_id: int, params: SamplingParams, generator, ahead: AheadOfTime | None = None
) -> Callable:
    """The step a Session runs. Compiled greedy decoding compiles the whole step, token choice
    included; sampling draws from the seeded generator eagerly after a compiled forward.
    ahead: compile through the compile cache, ahead of time (a switch in flight: compiling.py)."""
    if compile and ahead is not None:
        if not params.do_sample:
            whole = ahead.step(greedy_step)
            return lambda tokens, valid, position, finished: whole(model, tokens, valid, position, finished, eos, pad_token_id, params)
        compute = as_compute(functools.partial(ahead.step(forward_step), model))
        return functools.partial(decode_one_token, compute, eos=eos, pad_token_id=pad_token_id, params=params, generator=generator)
    if compile and not params.do_sample:
        whole = compiled(key, "greedy_step", functools.partial(decode_one_token, model.compute))
        return lambda tokens, valid, position, finished: whole(tokens, valid, position, finished, eos, pad_token_id, params)
    compute = compiled(key, "compute", model.compute) if compile else model.compute
    return functools.partial(decode_one_token, compute, eos=eos, pad_token_id=pad_token_id, params=params, generator=generator)


def trusted_guards(trusted: bool):
    """Within a session every step after the first passes the same model, shapes, dtypes and
    objects (only values change), so the compiled step's guards (some 300 checks, about a tenth of
    a small model's step) are skipped; the first step runs them all, and compiles if it must."""
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=trusted)


def guarded_call(trusted: bool, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs), its compiled guards skipped when trusted (trusted_guards). Should no compiled
    graph fit after all (seen once in a long-lived worker, cause unknown), torch refuses to compile
    under that stance before anything runs; the call is then made again with the guards on, which
    compiles what it must, instead of failing the generation."""
    if trusted:
        try:
            with trusted_guards(True):
                return fn(*args, **kwargs)
        except RuntimeError as error:
            if "skip_guard_eval_unsafe" not in str(error):
                raise
    return fn(*args, **kwargs)


def decode_n_tokens(session: Decoding, n: int) -> torch.Tensor:
    """Up to n more tokens per row, [batch, k]; stops early when every row has finished."""
    produced = []
    for _ in range(min(n, session.remaining)):
        if bool(session.finished.all()):
            break
        session.last_tokens, session.finished = session.advance()
        session.slot += 1
        session.remaining -= 1
        produced.append(session.last_tokens)
    if not produced:
        return torch.empty(session.last_tokens.shape[0], 0, dtype=torch.long)
    return torch.stack(produced, dim=1)


def validity_mask(attention_mask: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """[batch, max_seq_len]: the prompt's mask (0 on left padding), then 1 for every slot after it."""
    batch, prompt_len = attention_mask.shape
    valid = torch.ones(batch, max_seq_len, dtype=torch.long, device=attention_mask.device)
    valid[:, :prompt_len] = attention_mask
    return valid


# -- what the front end calls on every rank ---------------------------------------------------


def start(
    key: StateKey,
    input_ids,
    attention_mask,
    params: SamplingParams,
    seed,
    eos: list[int],
    pad_token_id: int,
    max_new_tokens: int,
    first_chunk: int,
    compile: bool = False,
    compile_fields: dict | None = None,
):
    """Prefill, choose the first token, then decode up to first_chunk - 1 more; return the tokens [batch, k].
    compile_fields: the compile cache key of this session's compiled step, for a switch later (resume)."""
    model = worker_state()[key]
    device = device_of(model)
    generator = seeded_generator(params, seed, device)
    batch, prompt_len = input_ids.shape
    attention_mask = attention_mask.to(device)
    eos = torch.tensor(eos, dtype=torch.long, device=device)
    with torch.inference_mode():
        logits = prefill(model, input_ids.to(device), attention_mask)
        first, finished = choose(logits, torch.zeros(batch, dtype=torch.bool, device=device), eos, pad_token_id, params, generator)
        session = Session(
            valid=validity_mask(attention_mask, model.max_seq_len),
            slot=prompt_len,
            last_tokens=first,
            finished=finished,
            remaining=max_new_tokens - 1,
            step=decode_step(model, key, compile, eos, pad_token_id, params, generator),
            compiled_step=functools.partial(decode_step, model, key, True, eos, pad_token_id, params, generator),
            compile_fields=compile_fields,
            compiled=compile,
        )
        rest = decode_n_tokens(session, first_chunk - 1)
    worker_state()[owned_key(key, SESSION)] = session
    return torch.cat([first[:, None], rest], dim=1).cpu()


def resume(key: StateKey, n: int, switch: bool = False):
    """Up to n more tokens of the session in flight, whether every row has finished, and a compile
    report: with switch, the session first switches to its compiled step (see compiling.py); the
    report says how long compiling took and whether this machine's compile cache had it."""
    session = worker_state()[owned_key(key, SESSION)]
    report = None
    if switch and not session.compiled:

        def to_compiled(ahead):
            session.step, session.compiled, session.steps_taken = session.compiled_step(ahead=ahead), True, 0

        with torch.inference_mode():
            first, report = switch_to_compiled(session.compile_fields, to_compiled, lambda: decode_n_tokens(session, 1))
        n -= first.shape[1]
    tokens, done = resume_session(key, SESSION, n)
    if report is not None:
        tokens = torch.cat([first, tokens], dim=1)
    return tokens, done, report


def resume_session(key: StateKey, kind: str, n: int):
    """Up to n more tokens of the model's session of this kind in flight, and whether every row has finished."""
    session = worker_state()[owned_key(key, kind)]
    with torch.inference_mode():
        tokens = decode_n_tokens(session, n)
    done = bool(session.finished.all()) or session.remaining <= 0
    return tokens.cpu(), done


def end(key: StateKey) -> None:
    session = worker_state().get(owned_key(key, SESSION))
    if session is not None and session.compile_fields is not None:
        record_step_times(session.compile_fields, session.mean_step_seconds("eager"), session.mean_step_seconds("compiled"))
    end_session(key, SESSION)
