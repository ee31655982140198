"""Encoder-decoder generation (T5), the front end: greedy and sampling a chunk at a time
(generate.chunked_steps), beam search in one round trip.

The workers (worker/seq2seq.py, worker/beam.py) encode the sources once and decode into the
preallocated KV cache; only token ids come back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import closing

from ..inputs import check_generation, sampling_seed
from .generate import GenerationResult, chunked_steps, encode_prompts, eos_ids, pad_id, result, text_pieces, until_eos
from .worker import beam
from .worker import seq2seq as worker_seq2seq
from .worker.sampling import SamplingParams


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


def steps(
    model,
    prompts=None,
    *,
    input_ids=None,
    attention_mask=None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id=None,
    chunk: int | None = None,
    stats: dict | None = None,
) -> Iterator[list[list[int]]]:
    """New tokens as they are made, per row (greedy or sampling); chunk = decode steps per round trip
    (by default about a quarter of a second's worth: see generate.ChunkPlanner)."""
    check_generation(max_new_tokens, temperature, top_k, top_p)
    params = SamplingParams(do_sample, temperature, top_k, top_p)
    seed = sampling_seed(seed, do_sample)
    input_ids, attention_mask = encode_prompts(model, prompts, input_ids, attention_mask)
    _check_sizes(model, input_ids.shape[0], max_new_tokens)
    eos = eos_ids(model, eos_token_id)
    stats = stats if stats is not None else {}

    def start(first_chunk):
        return model.run(
            worker_seq2seq.start,
            model.key,
            input_ids,
            attention_mask,
            params,
            seed,
            eos,
            pad_id(model, eos),
            decoder_start_token_id(model),
            max_new_tokens,
            first_chunk,
        ).tolist()

    def resume(n):
        tokens, done = model.run(worker_seq2seq.resume, model.key, n)
        return tokens.tolist(), done

    yield from chunked_steps(
        model,
        start,
        resume,
        worker_seq2seq.end,
        max_new_tokens=max_new_tokens,
        eos=eos,
        chunk=chunk,
        stats=stats,
        prompt_tokens=int(attention_mask.sum()),
    )


def generate(
    model,
    prompts=None,
    *,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    **kwargs,
) -> GenerationResult:
    """Generate for a batch of sources (text with the checkpoint's tokenizer, or input_ids/attention_mask).

    num_beams=1: greedy, or sampling with do_sample/temperature/top_k/top_p/seed.
    num_beams>1: beam search as Hugging Face's (length_penalty, early_stopping True/False/"never",
    num_return_sequences best beams per source, in order). Rows end at an end-of-sequence token.
    """
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    stats: dict = {}
    eos = eos_ids(model, kwargs.get("eos_token_id"))
    if num_beams > 1:
        rows = _beam_rows(
            model, prompts, max_new_tokens, num_beams, length_penalty, early_stopping, num_return_sequences, eos, stats, **kwargs
        )
    else:
        if num_return_sequences != 1:
            raise ValueError("num_return_sequences > 1 needs beam search (num_beams >= num_return_sequences)")
        rows = None
        with closing(steps(model, prompts, max_new_tokens=max_new_tokens, stats=stats, **kwargs)) as produced:
            for tokens in produced:
                rows = rows or [[] for _ in tokens]
                for row, new in zip(rows, tokens):
                    row += until_eos(new, eos, already=row)
        rows = rows or []
    texts = [model.tokenizer.decode(r, skip_special_tokens=True) for r in rows] if model.has_tokenizer else None
    return result(rows, texts, stats)


def _beam_rows(
    model,
    prompts,
    max_new_tokens,
    num_beams,
    length_penalty,
    early_stopping,
    num_return_sequences,
    eos,
    stats,
    input_ids=None,
    attention_mask=None,
    eos_token_id=None,
    do_sample: bool = False,
    **unused,
):
    unsupported = sorted(unused) + (["do_sample"] if do_sample else [])
    if unsupported:
        raise ValueError(f"beam search is deterministic here: {', '.join(unsupported)} cannot be combined with num_beams > 1")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be between 1 and num_beams={num_beams}, got {num_return_sequences}")
    check_generation(max_new_tokens, 1.0, None, None)
    input_ids, attention_mask = encode_prompts(model, prompts, input_ids, attention_mask)
    _check_sizes(model, input_ids.shape[0] * num_beams, max_new_tokens)
    began = time.perf_counter()
    with model.exclusive():
        rows, scores = model.run(
            beam.beam_search,
            model.key,
            input_ids,
            attention_mask,
            num_beams,
            max_new_tokens,
            eos,
            decoder_start_token_id(model),
            length_penalty,
            early_stopping,
            num_return_sequences,
        )
    stats.update(prompt_tokens=int(attention_mask.sum()), seconds=time.perf_counter() - began, sequence_scores=scores)
    return [until_eos(row, eos, already=[]) for row in rows]


def stream(model, prompt, stats: dict | None = None, **kwargs) -> Iterator[str]:
    """Text pieces for one source as they are generated (greedy or sampling)."""
    stats = stats if stats is not None else {}
    return text_pieces(model, steps(model, prompt, chunk=1, stats=stats, **kwargs), stats, kwargs.get("eos_token_id"))
