"""Front end: checks of what a caller passes, made before anything is sent to a worker.

Out-of-range ids are the dangerous case: a sharded embedding looks an id up in
the one shard whose range holds it and gives zeros elsewhere, so at tp >= 2 an
id outside the vocabulary would silently act as a zero embedding.
"""

from __future__ import annotations

import math

import torch


def token_batch(ids, name: str = "input_ids") -> torch.Tensor:
    """ids (a tensor, a list of ints, or a list of equal-length lists) as a [batch, seq] long tensor."""
    try:
        tensor = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be token ids (a tensor or a list of ints, rows of equal length): {exc}") from None
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be integer token ids, got a {tensor.dtype} tensor")
    if tensor.dim() == 1:
        tensor = tensor[None]
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
    tensor = torch.as_tensor(tensor)
    if tensor.dim() == 1 and ids.shape[0] == 1:
        tensor = tensor[None]
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


def check_below(tensor: torch.Tensor | None, limit: int, name: str, what: str) -> None:
    if tensor is not None and (int(tensor.min()) < 0 or int(tensor.max()) >= limit):
        raise ValueError(f"{name} must be in [0, {limit}) ({what}), got values from {int(tensor.min())} to {int(tensor.max())}")


def check_generation(max_new_tokens, temperature, top_k, top_p) -> None:
    """Generation arguments, checked whether or not sampling is on (a bad value is a mistake either way)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
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
