"""Front end: checks of what a caller passes, made before anything is sent to a worker.

Out-of-range ids are the dangerous case: a sharded embedding looks an id up in
the one shard whose range holds it and gives zeros elsewhere, so at tp >= 2 an
id outside the vocabulary would silently act as a zero embedding.
"""

from __future__ import annotations

import math
import secrets

import torch


def as_rows(value, one_row: bool = True) -> torch.Tensor:
    """value (a tensor or nested lists) as a tensor; with one_row, a single row [seq] as a batch of one [1, seq]."""
    tensor = torch.as_tensor(value)
    return tensor[None] if one_row and tensor.dim() == 1 else tensor


def token_batch(ids, name: str = "input_ids") -> torch.Tensor:
    """ids (a tensor, a list of ints, or a list of equal-length lists) as a [batch, seq] long tensor."""
    try:
        tensor = as_rows(ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be token ids (a tensor or a list of ints, rows of equal length): {exc}") from None
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be integer token ids, got a {tensor.dtype} tensor")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be [batch, seq] (or [seq]), got shape {list(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {list(tensor.shape)}): give at least one token per row")
    return tensor.long()


def check_vocabulary(ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds id {bad}, outside the vocabulary [0, {vocab_size}) of this model")


def matching(tensor, ids: torch.Tensor, name: str, ids_name: str = "input_ids") -> torch.Tensor | None:
    """An optional per-token tensor (attention_mask, token_type_ids, position_ids) of exactly ids' shape."""
    if tensor is None:
        return None
    tensor = as_rows(tensor, one_row=ids.shape[0] == 1)
    if tuple(tensor.shape) != tuple(ids.shape):
        raise ValueError(f"{name} has shape {list(tensor.shape)} but {ids_name} has shape {list(ids.shape)}: they must match")
    return tensor


def check_mask(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
    mask = matching(mask, ids, "attention_mask")
    if mask is None:
        return None
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (a token)")
    empty = [i for i, row in enumerate(mask) if int(row.sum()) == 0]
    if empty:
        raise ValueError(f"row(s) {empty} of attention_mask mask out every token: each row needs at least one")
    return mask.long()


def check_cache_position(
    cache_position, attention_mask, ids: torch.Tensor, max_batch_size: int, max_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KV-cache slot indices for ids ([seq], shared by the rows, or [batch, seq]) inside the cache, and a
    mask over every slot written so far (prompt and cache, not just these tokens); both as tensors."""
    batch, seq = ids.shape
    cache_position = torch.as_tensor(cache_position)
    if cache_position.is_floating_point():
        raise ValueError(f"cache_position must be integer slot indices, got {cache_position.dtype}")
    if tuple(cache_position.shape) not in ((seq,), (batch, seq)):
        raise ValueError(f"cache_position has shape {list(cache_position.shape)}; it needs one slot per token: [{seq}] or [{batch}, {seq}]")
    check_below(cache_position, max_seq_len, "cache_position", f"the KV cache's max_seq_len={max_seq_len}")
    if batch > max_batch_size:
        raise ValueError(f"batch of {batch} exceeds the KV cache's max_batch_size={max_batch_size}")
    mask = None if attention_mask is None else torch.as_tensor(attention_mask)
    if mask is not None and (mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] > max_seq_len):
        raise ValueError(f"attention_mask must be [batch={batch}, slots so far <= {max_seq_len}], got shape {list(mask.shape)}")
    return cache_position, mask


def check_below(tensor: torch.Tensor | None, limit: int, name: str, what: str) -> None:
    if tensor is not None and (int(tensor.min()) < 0 or int(tensor.max()) >= limit):
        raise ValueError(f"{name} must be in [0, {limit}) ({what}), got values from {int(tensor.min())} to {int(tensor.max())}")


def check_generation(max_new_tokens, temperature, top_k, top_p, tokens_name: str = "max_new_tokens") -> None:
    """Generation arguments, checked whether or not sampling is on (a bad value is a mistake either way).
    tokens_name: what the caller calls max_new_tokens (the OpenAI API's max_tokens)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"{tokens_name} must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p!r}")


def is_token_ids(value) -> bool:
    """A tensor, or a (nested) list of ints: ids passed where text could go (HF's generate(input_ids))."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)) and value:
        first = value[0]
        if isinstance(first, (list, tuple)):
            return bool(first) and isinstance(first[0], int) and not isinstance(first[0], bool)
        return isinstance(first, int) and not isinstance(first, bool)
    return False


def sampling_seed(seed: int | None, do_sample: bool) -> int | None:
    """The seed every rank's sampler starts from: the caller's, or a fresh one chosen here, once, so
    that all ranks draw the same tokens."""
    if seed is None and do_sample:
        return secrets.randbits(63)
    return seed
