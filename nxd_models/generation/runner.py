"""Generation inside the workers: prefill, decode_one_token, decode_n_tokens.

Every rank runs the same loop on the same gathered logits with the same
seeded generator, so every rank picks the same tokens; only token ids go
back to the front end (tokens are tiny: every rank returns them, which is
what a torchrun script on each rank needs). A `Session` holds one batch's progress between calls,
next to the model and its KV cache in `worker_state()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nxd_core.workers import worker_state

from .sampling import SamplingParams, next_tokens


@dataclass
class Session:
    valid: torch.Tensor  # [batch, max_seq_len]: 0 on the prompt's left padding, 1 elsewhere (static shape)
    slot: int  # the next KV-cache slot (shared by the rows)
    last_tokens: torch.Tensor  # [batch], the tokens to feed next
    finished: torch.Tensor  # [batch] bool
    params: SamplingParams
    generator: torch.Generator | None
    eos: torch.Tensor  # ids that end a row
    pad_token_id: int
    remaining: int  # tokens still allowed
    step: Callable  # model.compute, or its compiled version


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Write the prompt into the KV cache (slots 0..len-1); return the last position's logits [batch, vocab]."""
    slots = torch.arange(input_ids.shape[1], device=input_ids.device)
    return model(input_ids, attention_mask=attention_mask, cache_position=slots, last_only=True)[:, -1]


def decode_one_token(step: Callable, tokens: torch.Tensor, valid: torch.Tensor, slot: int) -> torch.Tensor:
    """Feed one token per row at `slot`; return logits [batch, vocab]. Shapes never change, so a
    compiled `step` compiles once."""
    cache_position = torch.tensor([slot], device=tokens.device)
    return step(tokens[:, None], valid, None, cache_position, True)[:, -1]


def decode_step(model, key: int, compiled: bool) -> Callable:
    """model.compute, or torch.compile of it, kept per model so it compiles once per worker."""
    if not compiled:
        return model.compute
    return worker_state().setdefault(("compiled", key), torch.compile(model.compute, dynamic=False))


def _choose(session: Session, logits: torch.Tensor) -> torch.Tensor:
    tokens = next_tokens(logits, session.params, session.generator)
    tokens = torch.where(session.finished, torch.full_like(tokens, session.pad_token_id), tokens)
    session.finished |= torch.isin(tokens, session.eos)
    session.last_tokens = tokens
    session.remaining -= 1
    return tokens


def decode_n_tokens(model, session: Session, n: int) -> torch.Tensor:
    """Up to n more tokens per row, [batch, k]; stops early when every row has finished."""
    produced = []
    for _ in range(min(n, session.remaining)):
        if bool(session.finished.all()):
            break
        logits = decode_one_token(session.step, session.last_tokens, session.valid, session.slot)
        session.slot += 1
        produced.append(_choose(session, logits))
    if not produced:
        return torch.empty(session.last_tokens.shape[0], 0, dtype=torch.long)
    return torch.stack(produced, dim=1)


def seeded_generator(params: SamplingParams, seed, device) -> torch.Generator | None:
    """The same generator state on every rank (so every rank samples the same token); None for greedy."""
    if not params.do_sample:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    return generator


def validity_mask(attention_mask: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """[batch, max_seq_len]: the prompt's mask (0 on left padding), then 1 for every slot after it."""
    batch, prompt_len = attention_mask.shape
    valid = torch.ones(batch, max_seq_len, dtype=torch.long, device=attention_mask.device)
    valid[:, :prompt_len] = attention_mask
    return valid


# -- what the front end calls on every rank ---------------------------------------------------


def _session_key(key: int):
    return ("session", key)


def start(key: int, input_ids, attention_mask, params: SamplingParams, seed, eos: list[int], pad_token_id: int, max_new_tokens: int, first_chunk: int, compiled: bool = False):
    """Prefill, choose the first token, then decode up to first_chunk - 1 more; return the tokens [batch, k]."""
    model = worker_state()[key]
    device = model.lm_head.weight.device
    generator = seeded_generator(params, seed, device)
    batch, prompt_len = input_ids.shape
    attention_mask = attention_mask.to(device)
    session = Session(
        valid=validity_mask(attention_mask, model.max_seq_len), slot=prompt_len, last_tokens=torch.empty(0), finished=torch.zeros(batch, dtype=torch.bool, device=device),
        params=params, generator=generator, eos=torch.tensor(eos, dtype=torch.long, device=device),
        pad_token_id=pad_token_id, remaining=max_new_tokens, step=decode_step(model, key, compiled),
    )
    with torch.inference_mode():
        first = _choose(session, prefill(model, input_ids.to(device), attention_mask))
        rest = decode_n_tokens(model, session, first_chunk - 1)
    worker_state()[_session_key(key)] = session
    return torch.cat([first[:, None], rest], dim=1).cpu()


def resume(key: int, n: int):
    """Up to n more tokens of the session in flight, and whether every row has finished."""
    session = worker_state()[_session_key(key)]
    with torch.inference_mode():
        tokens = decode_n_tokens(worker_state()[key], session, n)
    done = bool(session.finished.all()) or session.remaining <= 0
    return tokens.cpu(), done


def end(key: int) -> None:
    worker_state().pop(_session_key(key), None)


def generate_on_neuron(prompt, target_model, draft_model=None, **kwargs):
    """NxD's runner entry point, kept as a thin alias of target_model.generate."""
    if draft_model is not None:
        kwargs["draft_model"] = draft_model
    return target_model.generate(prompt, **kwargs)
