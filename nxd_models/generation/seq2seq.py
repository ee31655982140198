"""Encoder-decoder generation (T5): greedy and sampling here, beam search in beam.py.

The workers encode the source once (the cross-attention K/V stay in the
model), then decode one token per step into the preallocated self-attention
KV cache. Every rank runs the same loop on the same gathered logits with the
same seeded generator, so every rank picks the same tokens; only token ids
go back to the front end.
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from typing import Iterator

import torch

from nxd_core.workers import worker_state

from ..inputs import check_generation
from .generate import ChunkPlanner, GenerationResult, _all_finished, _eos_ids, _pad_id, _until_eos, encode_prompts, end_session, text_pieces
from .runner import seeded_generator
from .sampling import SamplingParams, next_tokens


@dataclass
class Seq2SeqSession:
    slot: int  # the decoder KV-cache slot of the next token fed
    last_tokens: torch.Tensor  # [batch], the tokens to feed next
    finished: torch.Tensor  # [batch] bool
    params: SamplingParams
    generator: torch.Generator | None
    eos: torch.Tensor
    pad_token_id: int
    remaining: int


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


def _choose(session: Seq2SeqSession, logits: torch.Tensor) -> torch.Tensor:
    tokens = next_tokens(logits, session.params, session.generator)
    tokens = torch.where(session.finished, torch.full_like(tokens, session.pad_token_id), tokens)
    session.finished |= torch.isin(tokens, session.eos)
    session.last_tokens = tokens
    session.remaining -= 1
    return tokens


def decode_n_tokens(model, session: Seq2SeqSession, n: int) -> torch.Tensor:
    """Up to n more tokens per row, [batch, k]; stops early when every row has finished."""
    produced = []
    for _ in range(min(n, session.remaining)):
        if bool(session.finished.all()):
            break
        logits = decode_one_token(model, session.last_tokens, session.slot)
        session.slot += 1
        produced.append(_choose(session, logits))
    if not produced:
        return torch.empty(session.last_tokens.shape[0], 0, dtype=torch.long)
    return torch.stack(produced, dim=1)


# -- what the front end calls on every rank ---------------------------------------------------


def _session_key(key: int):
    return ("seq2seq-session", key)


def _device(model):
    return next(model.parameters()).device


def start(key: int, input_ids, attention_mask, params: SamplingParams, seed, eos: list[int], pad_token_id: int,
          decoder_start_token_id: int, max_new_tokens: int, first_chunk: int):
    """Encode, then decode up to first_chunk tokens; return them [batch, k]."""
    model = worker_state()[key]
    device = _device(model)
    batch = input_ids.shape[0]
    session = Seq2SeqSession(
        slot=0, last_tokens=torch.full((batch,), decoder_start_token_id, dtype=torch.long, device=device),
        finished=torch.zeros(batch, dtype=torch.bool, device=device), params=params,
        generator=seeded_generator(params, seed, device), eos=torch.tensor(eos, dtype=torch.long, device=device),
        pad_token_id=pad_token_id, remaining=max_new_tokens,
    )
    with torch.inference_mode():
        start_decoding(model, input_ids.to(device), attention_mask.to(device))
        tokens = decode_n_tokens(model, session, first_chunk)
    worker_state()[_session_key(key)] = session
    return tokens.cpu()


def resume(key: int, n: int):
    """Up to n more tokens of the session in flight, and whether every row has finished."""
    session = worker_state()[_session_key(key)]
    with torch.inference_mode():
        tokens = decode_n_tokens(worker_state()[key], session, n)
    return tokens.cpu(), bool(session.finished.all()) or session.remaining <= 0


def end(key: int) -> None:
    worker_state().pop(_session_key(key), None)


# -- the front end ------------------------------------------------------------------------------


def decoder_start_token_id(model) -> int:
    for source in (model.generation_config, model.config):
        value = getattr(source, "decoder_start_token_id", None)
        if value is not None:
            return value
    return model.config.pad_token_id or 0


def _check_sizes(model, rows: int, max_new_tokens: int) -> None:
    if rows > model.max_batch_size:
        raise ValueError(
            f"{rows} decoder rows (prompts x beams) exceed max_batch_size={model.max_batch_size}; "
            "load the model with a larger max_batch_size"
        )
    if max_new_tokens > model.max_seq_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} exceeds the decoder KV cache (max_seq_len={model.max_seq_len}); "
            "ask for fewer tokens or load the model with a larger max_seq_len"
        )


def steps(model, prompts=None, *, input_ids=None, attention_mask=None, max_new_tokens: int = 32, do_sample: bool = False,
          temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
          eos_token_id=None, chunk: int | None = None, stats: dict | None = None) -> Iterator[list[list[int]]]:
    """New tokens as they are made, per row (greedy or sampling); chunk = decode steps per round trip
    (by default about a quarter of a second's worth: see generate.ChunkPlanner)."""
    check_generation(max_new_tokens, temperature, top_k, top_p)
    params = SamplingParams(do_sample, temperature, top_k, top_p)
    input_ids, attention_mask = encode_prompts(model, prompts, input_ids, attention_mask)
    _check_sizes(model, input_ids.shape[0], max_new_tokens)
    eos = _eos_ids(model, eos_token_id)
    planner = ChunkPlanner(chunk)
    stats = stats if stats is not None else {}
    with model.exclusive():  # one session at a time per model (its KV caches are one)
        began = time.perf_counter()
        first = model.run(start, model.key, input_ids, attention_mask, params, seed, eos, _pad_id(model, eos),
                          decoder_start_token_id(model), max_new_tokens, planner.next(0, 0.0)).tolist()
        stats.update(prompt_tokens=int(attention_mask.sum()), first_chunk_seconds=time.perf_counter() - began)
        try:
            yield first
            done = max(len(r) for r in first) >= max_new_tokens or _all_finished(first, eos)
            steps_done, seconds = 0, 0.0
            while not done:
                n = planner.next(steps_done, seconds)
                chunk_began = time.perf_counter()
                tokens, done = model.run(resume, model.key, n)
                steps_done, seconds = n, time.perf_counter() - chunk_began
                if tokens.shape[1]:
                    yield tokens.tolist()
        finally:
            stats["seconds"] = time.perf_counter() - began
            end_session(model, end, model.key)


def generate(model, prompts=None, *, max_new_tokens: int = 32, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, num_return_sequences: int = 1, **kwargs) -> GenerationResult:
    """Generate for a batch of sources (text with the checkpoint's tokenizer, or input_ids/attention_mask).

    num_beams=1: greedy, or sampling with do_sample/temperature/top_k/top_p/seed.
    num_beams>1: beam search as Hugging Face's (length_penalty, early_stopping True/False/"never",
    num_return_sequences best beams per source, in order). Rows end at an end-of-sequence token.
    """
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    stats: dict = {}
    eos = _eos_ids(model, kwargs.get("eos_token_id"))
    if num_beams > 1:
        rows = _beam_rows(model, prompts, max_new_tokens, num_beams, length_penalty, early_stopping, num_return_sequences, eos, stats, **kwargs)
    else:
        if num_return_sequences != 1:
            raise ValueError("num_return_sequences > 1 needs beam search (num_beams >= num_return_sequences)")
        rows = None
        with closing(steps(model, prompts, max_new_tokens=max_new_tokens, stats=stats, **kwargs)) as produced:
            for tokens in produced:
                rows = rows or [[] for _ in tokens]
                for row, new in zip(rows, tokens):
                    row += _until_eos(new, eos, already=row)
        rows = rows or []
    texts = [model.tokenizer.decode(r, skip_special_tokens=True) for r in rows] if model.has_tokenizer else None
    new = sum(len(r) for r in rows)
    stats.update(new_tokens=new, tokens_per_second=new / stats["seconds"] if stats.get("seconds") else 0.0)
    return GenerationResult(tokens=rows, texts=texts, stats=stats)


def _beam_rows(model, prompts, max_new_tokens, num_beams, length_penalty, early_stopping, num_return_sequences, eos, stats,
               input_ids=None, attention_mask=None, eos_token_id=None, do_sample: bool = False, **unused):
    unsupported = sorted(unused) + (["do_sample"] if do_sample else [])
    if unsupported:
        raise ValueError(f"beam search is deterministic here: {', '.join(unsupported)} cannot be combined with num_beams > 1")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be between 1 and num_beams={num_beams}, got {num_return_sequences}")
    check_generation(max_new_tokens, 1.0, None, None)
    input_ids, attention_mask = encode_prompts(model, prompts, input_ids, attention_mask)
    _check_sizes(model, input_ids.shape[0] * num_beams, max_new_tokens)
    from .beam import beam_search  # beam.py builds on this module's decoding steps

    began = time.perf_counter()
    with model.exclusive():
        rows, scores = model.run(
            beam_search, model.key, input_ids, attention_mask, num_beams, max_new_tokens, eos, decoder_start_token_id(model), length_penalty, early_stopping, num_return_sequences,
        )
    stats.update(prompt_tokens=int(attention_mask.sum()), seconds=time.perf_counter() - began, sequence_scores=scores)
    return [_until_eos(row, eos, already=[]) for row in rows]


def stream(model, prompt, stats: dict | None = None, **kwargs) -> Iterator[str]:
    """Text pieces for one source as they are generated (greedy or sampling)."""
    stats = stats if stats is not None else {}
    return text_pieces(model, steps(model, prompt, chunk=1, stats=stats, **kwargs), stats, kwargs.get("eos_token_id"))
