"""Weight-only int4 linear (group-wise scales): the reference path, dequantize and multiply.

`int4_linear(x, packed, scale, bias)` computes x @ W^T (+ bias) for the int4 weight that
nxd_core.quantization packs (two values per byte, low nibble first, +8) with one bfloat16 scale per
group of inputs, in float32, rounded once to x's dtype. `prepare()` and `isa()` mirror
int8_kernels; no SIMD kernel is built yet, so every call takes this path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prepare() -> bool:
    return False


def isa() -> str | None:
    return None


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] times the int4 weight packed [N, K / 2] with scales [N, K / group] (+ bias), in x's dtype."""
    from .quantization import dequantize

    out = F.linear(x.float(), dequantize(packed, scale), None if bias is None else bias.float())
    return out.to(x.dtype)
