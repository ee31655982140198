"""Weight-only int8 linear for decoding on CPUs with AVX2, AVX-512 or AVX512_VNNI (int8_linear.cpp).

Decoding reads every weight once per token, so its speed is memory bandwidth: int8 weights with one
fp32 scale per output row are half the bytes of bfloat16. Activations stay floating point (no
activation quantization; nxd_core.quantization makes the weights);
`prepare()` builds the kernel once per machine (torch's C++ extension cache, seconds) and switches
it on in this process; `int8_linear()` computes (x @ (weight * scale[:, None]).T + bias) in fp32
and rounds once to x's dtype, through the kernel when the call qualifies: CPU, x bfloat16 or
float32, at most MAX_ROWS rows, no autograd. Anything else, or a machine without AVX2/FMA or a
compiler, dequantizes W and takes ATen's linear (see _fallback).

The kernel picks its SIMD path (avx512vnni, avx512 or avx2) from the CPU at run time;
NXD_INT8_KERNEL=avx2 or avx512, read once per process, lowers it. `isa()` says which. On avx512vnni,
bf16 x becomes a 22-bit integer per block of 256 inputs, three signed bytes (vpdpbusd against the
weights): every input within 2^14 of its block's largest is exact, a smaller one off by at most 2^-22
of that largest; fp32 x takes the avx512 path. It is a torch operator
(nxd::int8_linear), so torch.compile keeps it as one call.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpp_build import build_and_load, cpu_flags

# Up to this many rows the kernel beats the fallback, which must first dequantize all of W
# (measured on 2 Zen 4 cores, AVX-512, W [5632, 2048], bf16 x, ms per call, best of 6):
#   rows                     8    16    64   128   512
#   kernel                 2.0   2.9   9.3  17.8    67
#   fallback (dequantize)   26    40    27  16-28   34
# Up to ~8 rows the kernel is memory-bound (1.6-2.3x the AVX2-only bf16_linear of its day on bf16 weights; the
# bf16 kernel has AVX-512 BF16 paths since, so measure the two again with
# benchmarks/int8_kernel.py); beyond, it does one fp32 FMA per 16 multiply-adds, while ATen's bf16
# GEMM (avx512_bf16) does two, so prefill-sized calls go to ATen after all.
MAX_ROWS = 128

_SOURCE = Path(__file__).with_name("int8_linear.cpp")
_extension = None  # torch.ops.nxd.int8_linear, once prepare() succeeded in this process
_unavailable = False  # prepare() found no AVX2/FMA or could not build: not tried again in this process


def _cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma"} <= cpu_flags()


def prepare() -> bool:
    """Build (or load from the cache) and enable the kernel in this process; False where it cannot run."""
    global _extension, _unavailable
    if _extension is not None:
        return True
    if _unavailable:
        return False
    if not _cpu_has_avx2_fma():
        _unavailable = True
        warnings.warn("this CPU has no AVX2/FMA: int8 weights are dequantized for ATen's linear (slower decoding)", stacklevel=2)
        return False
    # AVX2 is the file's baseline; the AVX-512 functions carry their own target attributes.
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
    if not build_and_load("nxd_int8_linear", _SOURCE, flags, ["-fopenmp"], "dequantizing for ATen's linear"):
        _unavailable = True
        return False
    _register_shape_function()
    _extension = torch.ops.nxd.int8_linear
    return True


def isa() -> str | None:
    """The kernel's SIMD path in this process ("avx512vnni", "avx512" or "avx2"), or None where it is not prepared."""
    return torch.ops.nxd.int8_linear_isa() if _extension is not None else None


def _register_shape_function() -> None:
    """Shapes for torch.compile's tracing (the kernel itself is registered by the C++ library)."""

    @torch.library.register_fake("nxd::int8_linear")
    def _(x, weight, scale):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("nxd::int8_linear_many")
    def _many(x, weights, scales):
        return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))


def _qualifies(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> bool:
    return (
        _extension is not None
        and x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and weight.dtype == torch.int8
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and scale.dtype == torch.float32
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def _fallback(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize, then ATen's linear. For bf16 x, W * scale rounded to bf16: measured at 128 and
    512 rows (W [5632, 2048], 2 threads) 16 / 34 ms against 25 / 70 ms for the fp32 GEMM
    (F.linear(x.float(), weight.float()) * scale, rounded once), within 0.85 bf16 ulp of the exact
    sum against 0.5. (F.linear on weight.bfloat16() and then * scale: 8 / 29 ms but 1.4 ulp off;
    torch._weight_int8pack_mm wants a bf16 scale: 20 / 80 ms.) Other dtypes: the fp32 GEMM."""
    if x.dtype == torch.bfloat16:
        return F.linear(x, (weight.float() * scale.float()[:, None]).bfloat16(), bias)
    out = (F.linear(x.float(), weight.float()) * scale.float()).to(x.dtype)
    return out + bias if bias is not None else out


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] times int8 weight [N, K] with per-row fp32 scale [N] (+ bias), in x's dtype."""
    if not _qualifies(x, weight, scale):
        return _fallback(x, weight, scale, bias)
    out = _extension(x.reshape(-1, x.shape[-1]), weight, scale).view(*x.shape[:-1], weight.shape[0])
    return out + bias if bias is not None else out


def int8_linear_many(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """[int8_linear(x, w, s) for w, s in zip(weights, scales)]: the weights that meet the same x
    (q, k and v; gate and up) in one call of the kernel where they all qualify (its fixed costs once)."""
    if len(weights) < 2 or not all(_qualifies(x, w, s) for w, s in zip(weights, scales)):
        return [int8_linear(x, w, s) for w, s in zip(weights, scales)]
    out = torch.ops.nxd.int8_linear_many(x.reshape(-1, x.shape[-1]), list(weights), list(scales)).view(*x.shape[:-1], -1)
    return list(out.split([w.shape[0] for w in weights], dim=-1))
