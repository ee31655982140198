"""Encoder-decoder generation (T5) inside the workers: greedy and sampling here, beam search in beam.py.

The workers encode the source once (the cross-attention K/V stay in the
model), then decode one token per step into the preallocated self-attention
KV cache. Every rank runs the same loop on the same gathered logits with the
same seeded generator, so every rank picks the same tokens; only token ids
go back to the front end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nxd_core.worker_process import StateKey, worker_state

from ...worker_ops import device_of, end_session, owned_key
from .decoding import decode_n_tokens, resume_session
from .sampling import SamplingParams, choose, seeded_generator

SESSION = "seq2seq-session"  # the worker_state() kind of an encoder-decoder's generation in flight


@dataclass
class Seq2SeqSession:
    model: torch.nn.Module
    slot: int  # the decoder KV-cache slot of the next token fed
    last_tokens: torch.Tensor  # [batch], the tokens to feed next
    finished: torch.Tensor  # [batch] bool
    params: SamplingParams
    generator: torch.Generator | None
    eos: torch.Tensor
    pad_token_id: int
    remaining: int

    def advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        logits = decode_one_token(self.model, self.last_tokens, self.slot)
        return choose(logits, self.finished, self.eos, self.pad_token_id, self.params, self.generator)


def start_decoding(model, input_ids, attention_mask, rows_per_source: int = 1) -> None:
    """Encode the sources and keep the cross-attention K/V; each source feeds rows_per_source decoder rows (beams)."""
    hidden = model.encode(input_ids, attention_mask)
    if rows_per_source > 1:
        hidden = hidden.repeat_interleave(rows_per_source, dim=0)
        attention_mask = attention_mask.repeat_interleave(rows_per_source, dim=0)
    model.start_decoding(hidden, attention_mask)


def decode_one_token(model, tokens: torch.Tensor, slot: int) -> torch.Tensor:
    """Feed one token per row at `slot`; return float32 logits [batch, vocab]."""
    return model.decode(tokens[:, None], torch.tensor([slot], device=tokens.device))[:, -1].float()


# -- what the front end calls on every rank ---------------------------------------------------


def start(
    key: StateKey,
    input_ids,
    attention_mask,
    params: SamplingParams,
    seed,
    eos: list[int],
    pad_token_id: int,
    decoder_start_token_id: int,
    max_new_tokens: int,
    first_chunk: int,
):
    """Encode, then decode up to first_chunk tokens; return them [batch, k]."""
    model = worker_state()[key]
    device = device_of(model)
    batch = input_ids.shape[0]
    session = Seq2SeqSession(
        model=model,
        slot=0,
        last_tokens=torch.full((batch,), decoder_start_token_id, dtype=torch.long, device=device),
        finished=torch.zeros(batch, dtype=torch.bool, device=device),
        params=params,
        generator=seeded_generator(params, seed, device),
        eos=torch.tensor(eos, dtype=torch.long, device=device),
        pad_token_id=pad_token_id,
        remaining=max_new_tokens,
    )
    with torch.inference_mode():
        start_decoding(model, input_ids.to(device), attention_mask.to(device))
        tokens = decode_n_tokens(session, first_chunk)
    worker_state()[owned_key(key, SESSION)] = session
    return tokens.cpu()


def resume(key: StateKey, n: int):
    """Up to n more tokens of the session in flight, and whether every row has finished."""
    return resume_session(key, SESSION, n)


def end(key: StateKey) -> None:
    end_session(key, SESSION)
