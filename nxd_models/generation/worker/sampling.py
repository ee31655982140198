"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p
(the front end builds SamplingParams; the workers choose).

The warpers run in Hugging Face's order (temperature, then top-k, then top-p),
so a seeded sampler draws from the same distribution as HF's `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Float32 logits with temperature applied and the tokens outside top-k / top-p set to -inf."""
    logits = logits.float()
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - params.top_p
        remove[..., -1] = False  # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from (used by speculative decoding's acceptance test)."""
    return warp(logits, params).softmax(dim=-1)


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch] token ids from [batch, vocab] logits."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, params), 1, generator=generator).squeeze(-1)


def choose(logits, finished, eos, pad_token_id: int, params: SamplingParams, generator=None):
    """Each row's next token [batch] and the updated finished flags: finished rows get padding,
    rows that choose an end-of-sequence token finish."""
    tokens = next_tokens(logits, params, generator)
    tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
    return tokens, finished | torch.isin(tokens, eos)


def seeded_generator(params: SamplingParams, seed: int | None, device) -> torch.Generator | None:
    """The same generator state on every rank (so every rank samples the same token); None for greedy.
    The front end picks the seed when the caller gave none (inputs.sampling_seed): a seed drawn here
    would differ between ranks, and so would their tokens and KV caches."""
    if not params.do_sample:
        return None
    if seed is None:
        raise ValueError("sampling needs a seed that every rank shares: the front end picks one (inputs.sampling_seed)")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
