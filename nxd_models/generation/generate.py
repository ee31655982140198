"""The front end of generation: prompts in, text or token ids out, streamed if asked.

The loop runs in the workers (worker/decoding.py, worker/speculative.py). The front end sends
the prompt once and then asks for tokens a chunk at a time (`chunked_steps`, which the
encoder-decoders' front end in seq2seq.py shares), so that it can look at them as they come
(streaming, stop strings) and an interrupt is handled promptly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field

import torch

from ..inputs import check_generation, check_mask, check_vocabulary, is_token_ids, sampling_seed, token_batch
from .compile_policy import MEASURED_STEPS, CompilePolicy, speculative_fields, speculative_rounds_name
from .worker import decoding, speculative
from .worker.sampling import SamplingParams


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row, up to and including an end-of-sequence token
    texts: list[str] | None  # decoded new text per row, when a tokenizer is available
    stats: dict = field(default_factory=dict)  # prompt/new token counts, seconds, tokens per second


def result(rows: list[list[int]], texts: list[str] | None, stats: dict) -> GenerationResult:
    """The result of a generation, its stats completed with the new tokens and their rate."""
    new = sum(len(r) for r in rows)
    stats.update(new_tokens=new, tokens_per_second=new / stats["seconds"] if stats.get("seconds") else 0.0)
    return GenerationResult(tokens=rows, texts=texts, stats=stats)


def eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        generation_config = model.generation_config
        eos_token_id = getattr(generation_config, "eos_token_id", None) if generation_config else None
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def pad_id(model, eos: list[int]) -> int:
    generation_config = model.generation_config
    for candidate in (getattr(generation_config, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if candidate is not None:
            return candidate
    return eos[0] if eos else 0


def encode_prompts(model, prompts, input_ids, attention_mask):
    """(input_ids, attention_mask) from text (the checkpoint's tokenizer, padded on its side) or from ids,
    checked: ids inside the vocabulary, a mask of the ids' shape, no empty prompt.
    Token ids given first (a tensor or lists of ints, as in HF's generate(input_ids)) mean ids."""
    if prompts is not None and is_token_ids(prompts):
        if input_ids is not None:
            raise ValueError("token ids were given twice: first and as input_ids; pass one")
        prompts, input_ids = None, prompts
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts: give at least one")
        wrong = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if wrong:
            raise ValueError(f"prompts must be strings (or token ids as input_ids), got {wrong[0]}")
        encoded = model.tokenizer(prompts, return_tensors="pt", padding=True)
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        empty = [repr(p) for p, row in zip(prompts, attention_mask) if int(row.sum()) == 0]
        if empty or input_ids.shape[1] == 0:
            raise ValueError(f"prompt {empty[0] if empty else repr(prompts[0])} has no tokens: give at least one")
    if input_ids is None:
        raise ValueError("generate needs prompts (text) or input_ids")
    input_ids = token_batch(input_ids)
    attention_mask = check_mask(attention_mask, input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_vocabulary(input_ids, model.config.vocab_size)
    return input_ids, attention_mask


class ChunkPlanner:
    """How many decode steps (or speculative rounds) the next round trip asks for.

    One round trip for the whole generation is fastest, but nothing can stop it
    midway: an interrupt would wait for all of it. So the front end asks for
    chunks sized to take about `target_seconds` each (a round trip costs well
    under a millisecond): an interrupt waits at most about that long.
    """

    def __init__(self, chunk: int | None, target_seconds: float = 0.25, first: int = 1):
        self.fixed = chunk
        self.size = chunk or first
        self.target = target_seconds

    def next(self, steps_done: int, seconds: float) -> int:
        if self.fixed:
            return self.fixed
        if steps_done > 0:
            per_step = max(seconds, 1e-6) / steps_done
            self.size = max(1, min(4 * self.size, int(self.target / per_step)))
        return self.size


def end_session(model, end, *keys) -> None:
    """End a session in the workers, unless the group is already gone (then its error is the one to see)."""
    if not model.group.closed:
        model.run(end, *keys)


def chunked_steps(
    model,
    start: Callable[[int], list[list[int]]],
    resume: Callable[..., tuple[list[list[int]], bool]],
    end: Callable,
    *,
    max_new_tokens: int,
    eos: list[int],
    chunk: int | None,
    stats: dict,
    prompt_tokens: int,
    draft_model=None,
    policy: CompilePolicy | None = None,
) -> Iterator[list[list[int]]]:
    """The session every generation runs in the workers, with the model (and a draft) held throughout:
    start(first_chunk) prefills and returns the first tokens per row, resume(n) returns (up to n steps'
    tokens per row, whether every row is done), and the worker function `end` ends the session.
    With a policy, resume(n, switch=True) switches the session to compiled steps first, at the
    boundary the policy chooses (it then reports in stats["compile_seconds"])."""
    planner = ChunkPlanner(chunk)
    with model.exclusive(draft_model):  # one session at a time per model (its KV cache is one)
        began = time.perf_counter()
        first = start(planner.next(0, 0.0))
        stats.update(prompt_tokens=prompt_tokens, first_chunk_seconds=time.perf_counter() - began)
        decode_seconds, decode_tokens = 0.0, 0  # after the first chunk: the decode rate's
        try:
            yield first
            produced = max(len(r) for r in first)
            done = produced >= max_new_tokens or all_finished(first, eos)
            steps_done, seconds = 0, 0.0  # the last chunk's steps (or rounds) asked for, and its time
            eager_step = None  # seconds per token of a row, measured on the last eager chunk
            while not done:
                switching = policy is not None and policy.switch_now(produced, eager_step)
                if switching:
                    policy.announce()
                    stats["compiled_from_token"] = produced
                steps_done = 1 if switching else planner.next(steps_done, seconds)
                chunk_began = time.perf_counter()
                tokens, done = resume(steps_done, switch=True) if switching else resume(steps_done)
                seconds = time.perf_counter() - chunk_began
                gained = max((len(r) for r in tokens), default=0)
                produced += gained
                decode_seconds += seconds
                decode_tokens += sum(len(r) for r in tokens)
                if gained >= MEASURED_STEPS and not (policy and policy.switched):
                    eager_step = seconds / gained
                if any(tokens):
                    yield tokens
        finally:
            stats["seconds"] = time.perf_counter() - began
            decode_seconds -= stats.get("compile_seconds", 0.0)
            if decode_tokens and decode_seconds > 0:
                stats.update(decode_tokens_per_second=decode_tokens / decode_seconds)
            end_session(model, end, model.key)


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
    draft_model=None,
    num_speculative_tokens: int = 4,
    prompt_lookup_num_tokens: int | None = None,
    max_matching_ngram_size: int | None = None,
    prompt_lookup_max_ngram: int | None = None,
    compile: bool | None = None,
    chunk: int | None = None,
    stats: dict | None = None,
) -> Iterator[list[list[int]]]:
    """New tokens as they are made, per row (rows may gain different numbers of tokens).

    chunk: how many decode steps (speculative rounds) per round trip; by default chunks of
    about a quarter of a second each (ChunkPlanner), so that an interrupt is handled promptly.
    compile: decode with torch.compile'd steps (greedy decoding compiles the whole step with the
    token choice, a greedy speculative round is two calls (the draft's k steps; the target's pass
    and the acceptance), and sampling compiles the models' forward passes). None: plain decoding
    starts eagerly and switches to compiled steps mid-generation where the tokens still to come
    repay the compilation (compile_policy.py; once per machine, the compile cache); speculative
    decoding compiles where these workers compiled the same rounds before, else stays eager.
    True: plain decoding switches after its first token, speculative rounds compile from the start.
    prompt_lookup_num_tokens=k: speculate without a draft, proposing up to k tokens that followed
    the last n-gram (n <= max_matching_ngram_size, HF's name, default 2; prompt_lookup_max_ngram is
    the same) earlier in the row's prompt and output; see worker/prompt_lookup.py.
    """
    check_generation(max_new_tokens, temperature, top_k, top_p)
    max_ngram = _lookup_ngram(prompt_lookup_num_tokens, max_matching_ngram_size, prompt_lookup_max_ngram, draft_model)
    params = SamplingParams(do_sample, temperature, top_k, top_p)
    seed = sampling_seed(seed, do_sample)
    input_ids, attention_mask = encode_prompts(model, prompts, input_ids, attention_mask)
    batch, prompt_len = input_ids.shape
    if prompt_lookup_num_tokens is not None:
        num_speculative_tokens = prompt_lookup_num_tokens
    speculating = draft_model is not None or prompt_lookup_num_tokens is not None
    extra = num_speculative_tokens if speculating else 0
    if batch > model.max_batch_size:
        raise ValueError(
            f"batch of {batch} prompts exceeds max_batch_size={model.max_batch_size}; load the model with a larger max_batch_size"
        )
    if prompt_len + max_new_tokens + extra > model.max_seq_len:
        speculation = f" + {extra} speculative slots" if extra else ""
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens}{speculation} exceeds max_seq_len={model.max_seq_len}; "
            "shorten the prompt, ask for fewer tokens, or load the model with a larger max_seq_len"
        )
    if draft_model is not None:
        _check_draft(model, draft_model, batch, prompt_len + max_new_tokens + extra, num_speculative_tokens)
    eos = eos_ids(model, eos_token_id)
    stats = stats if stats is not None else {}
    policy = None
    if not speculating:

        def start(first_chunk):
            return model.run(
                decoding.start,
                model.key,
                input_ids,
                attention_mask,
                params,
                seed,
                eos,
                pad_id(model, eos),
                max_new_tokens,
                first_chunk,
                False,
                None if policy is None else policy.fields,
            ).tolist()

        def resume(n, switch=False):
            tokens, done, report = model.run(decoding.resume, model.key, n, switch)
            if report is not None:
                stats.update(
                    compile_seconds=report["compile_seconds"],
                    compile_cpu_seconds=report["compile_cpu_seconds"],
                    compile_cache=report["cache"],
                    compile_precompiled=report["precompiled"],
                )
                model.compiled_steps.add(policy.name)
            return tokens.tolist(), done

        end = decoding.end
        if compile is not False:  # None: where it pays; True: at the first step boundary
            step = "sampled_compute" if do_sample else "greedy_step"
            policy = CompilePolicy(model, step, batch, max_new_tokens, force=compile is True)
    else:
        # A speculative session compiles its rounds from the start or not at all. With compile=None it
        # does where these workers have compiled the same rounds already (a notebook's second call).
        rounds = speculative_rounds_name(model, draft_model, do_sample, num_speculative_tokens, batch)
        if compile is None:
            compile = rounds in model.compiled_steps
        if compile:
            model.compiled_steps.add(rounds)
        stats["compiled_rounds"] = compile

        def start(first_chunk):  # a speculative session starts with the target's first token
            first = model.run(
                speculative.start,
                model.key,
                None if draft_model is None else draft_model.key,
                input_ids,
                attention_mask,
                params,
                seed,
                eos,
                num_speculative_tokens,
                max_new_tokens,
                speculative_fields(model, draft_model, do_sample, num_speculative_tokens, batch) if compile else None,
                max_ngram,
            )
            return [[t] for t in first.tolist()]

        def resume(rounds):
            tokens, done, histogram, proposed = model.run(speculative.resume, model.key, rounds)
            _acceptance_stats(stats, histogram, proposed)
            return tokens, done

        end = speculative.end
    yield from chunked_steps(
        model,
        start,
        resume,
        end,
        max_new_tokens=max_new_tokens,
        eos=eos,
        chunk=chunk,
        stats=stats,
        prompt_tokens=int(attention_mask.sum()),
        draft_model=draft_model,
        policy=policy,
    )


def _check_draft(model, draft, batch: int, slots: int, k: int) -> None:
    if draft.closed:
        raise ValueError("the draft model is closed: load it again (workers=target.group)")
    if draft is model:
        raise ValueError("the draft model is the target itself: load a second, smaller model as the draft")
    if draft.group is not model.group:
        raise ValueError("the draft model must live in the target's worker group: load it with workers=target.group")
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({draft.config.vocab_size}) differs from the target's ({model.config.vocab_size}): "
            "a draft must share the target's tokenizer"
        )
    if batch > draft.max_batch_size or slots > draft.max_seq_len:
        raise ValueError(
            f"the draft's KV cache (max_batch_size={draft.max_batch_size}, max_seq_len={draft.max_seq_len}) is too small for this request"
        )
    if k < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {k}")


def _lookup_ngram(k: int | None, hf_name: int | None, our_name: int | None, draft_model) -> int:
    """The n-gram size of prompt lookup, checked with its other arguments."""
    if hf_name is not None and our_name is not None and hf_name != our_name:
        raise ValueError(f"max_matching_ngram_size={hf_name} and prompt_lookup_max_ngram={our_name} are one setting: give one")
    n = hf_name if hf_name is not None else our_name
    if k is None:
        if n is not None:
            raise ValueError("max_matching_ngram_size needs prompt_lookup_num_tokens (the tokens proposed per round)")
        return 2
    if draft_model is not None:
        raise ValueError("prompt_lookup_num_tokens proposes without a draft: pass it or draft_model, not both")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"prompt_lookup_num_tokens must be an integer >= 1, got {k!r}")
    n = 2 if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"max_matching_ngram_size must be an integer >= 1, got {n!r}")
    return n


def _acceptance_stats(stats: dict, histogram: list[int], proposed: int) -> None:
    rounds = sum(histogram)
    stats["accepted_histogram"] = histogram  # [rounds (per row) that accepted 0, 1, ..., k proposed tokens]
    accepted = sum(i * n for i, n in enumerate(histogram))
    stats["acceptance_rate"] = accepted / proposed if proposed else 0.0
    stats["tokens_per_round"] = sum((i + 1) * n for i, n in enumerate(histogram)) / rounds if rounds else 0.0


def all_finished(rows: list[list[int]], eos: list[int]) -> bool:
    return bool(eos) and all(any(t in eos for t in row) for row in rows)


def generate(
    model,
    prompts=None,
    *,
    max_new_tokens: int = 32,
    stop: list[str] | None = None,
    callback: Callable[[list[list[int]]], None] | None = None,
    **kwargs,
) -> GenerationResult:
    """Generate for a batch; returns new tokens, texts (with a tokenizer) and stats.

    `stop` strings end a row when its text contains one (the text is cut
    there); `callback(new_tokens_per_row)` is called as tokens arrive.
    """
    streaming = callback is not None or bool(stop)
    stats: dict = {}
    eos = eos_ids(model, kwargs.get("eos_token_id"))
    rows: list[list[int]] | None = None
    stopped: list[bool] = []
    produced = steps(model, prompts, max_new_tokens=max_new_tokens, chunk=1 if streaming else None, stats=stats, **kwargs)
    with closing(produced):  # stopping early still ends the session in the workers
        for tokens in produced:
            rows, stopped = _take(model, tokens, rows, stopped, eos, stop, callback)
            if stop and all(stopped):
                break
    rows = rows or []
    texts = None
    if model.has_tokenizer:
        texts = [model.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        if stop:
            texts = [_cut_at_stop(t, stop) for t in texts]
    return result(rows, texts, stats)


def _take(model, tokens, rows, stopped, eos, stop, callback):
    """Add a chunk of new tokens to the rows (nothing after a row's end); mark rows whose text hit a stop string."""
    if rows is None:
        rows, stopped = [[] for _ in tokens], [False] * len(tokens)
    fresh = []
    for i, row in enumerate(tokens):
        kept = [] if stopped[i] else until_eos(row, eos, already=rows[i])
        rows[i] += kept
        fresh.append(kept)
        if stop and not stopped[i] and any(s in model.tokenizer.decode(rows[i], skip_special_tokens=True) for s in stop):
            stopped[i] = True
    if callback:
        callback(fresh)
    return rows, stopped


def until_eos(row: list[int], eos: list[int], already: list[int]) -> list[int]:
    """The tokens of a chunk up to and including the row's first end-of-sequence token."""
    if already and already[-1] in eos:
        return []
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def stream(model, prompt, stats: dict | None = None, **kwargs) -> Iterator[str]:
    """Text pieces for one prompt as they are generated; `stats` (a dict) gets counts and timings."""
    stats = stats if stats is not None else {}
    return text_pieces(model, steps(model, prompt, chunk=1, stats=stats, **kwargs), stats, kwargs.get("eos_token_id"))


def text_pieces(model, produced: Iterator[list[list[int]]], stats: dict, eos_token_id=None) -> Iterator[str]:
    """The decoded text of one row's token chunks, piece by piece as whole characters arrive."""
    shown = ""
    tokens: list[int] = []
    eos = eos_ids(model, eos_token_id)
    with closing(produced):
        for chunk in produced:
            tokens += until_eos(chunk[0], eos, already=tokens)
            text = model.tokenizer.decode(tokens, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # wait for whole characters
                yield text[len(shown) :]
                shown = text
    stats["new_tokens"] = len(tokens)
