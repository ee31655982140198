"""A faster bfloat16 linear for decoding on CPUs with AVX2 (bf16_linear.cpp).

Decoding multiplies a few rows of activations by every weight matrix; on CPUs
without native bfloat16 instructions ATen's bf16 matrix-vector product is the
bottleneck. `prepare()` builds the kernel once per machine (torch's C++
extension cache, seconds) and switches it on in this process; `linear()` is
F.linear, through the kernel when the call qualifies: CPU, bfloat16, at most
MAX_ROWS rows of at most MAX_K features, no autograd. Anything else, or a machine without AVX2/FMA or a
compiler, takes F.linear.

The kernel is a torch operator (nxd::bf16_linear), so torch.compile keeps it as one call.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .cpp_build import build_and_load, cpu_flags

# Where the kernel beats ATen (measured on AVX2 without native bf16): up to this many rows
# (tokens x batch: decoding and speculative verification) of at most this many features.
MAX_ROWS = 8
MAX_K = 4096

_SOURCE = Path(__file__).with_name("bf16_linear.cpp")
_extension = None  # torch.ops.nxd.bf16_linear, once prepare() succeeded in this process
_unavailable = False  # prepare() found no AVX2/FMA or could not build: not tried again in this process


def _cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma"} <= cpu_flags()


def prepare() -> bool:
    """Build (or load from the cache) and enable the kernel in this process; False where it cannot run."""
    global _extension, _unavailable
    if _extension is not None:
        return True
    if _unavailable or not _cpu_has_avx2_fma():
        _unavailable = True
        return False
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
    if not build_and_load("nxd_bf16_linear", _SOURCE, flags, ["-fopenmp"], "using torch's F.linear"):
        _unavailable = True
        return False
    _register_shape_function()
    _extension = torch.ops.nxd.bf16_linear
    return True


def _register_shape_function() -> None:
    """Shapes for torch.compile's tracing (the kernel itself is registered by the C++ library)."""

    @torch.library.register_fake("nxd::bf16_linear")
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])


def _qualifies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _extension is not None
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and weight.is_contiguous()
        and x.shape[-1] <= MAX_K
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), on the bf16 kernel where it qualifies."""
    if not _qualifies(x, weight):
        return F.linear(x, weight, bias)
    out = _extension(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return out + bias if bias is not None else out
