"""Weight-only int4 linear (group-wise scales) for decoding on CPUs with AVX2 or AVX-512 (int4_linear.cpp).

Decoding reads every weight once per token, so its speed is memory bandwidth: int4 weights (two
per byte, low nibble first, +8, as nxd_core.quantization packs them) with one bfloat16 scale per
group of inputs are about a quarter of the bytes of bfloat16. Activations stay floating point.
`prepare()` builds the kernel once per machine (torch's C++ extension cache, seconds) and switches
it on in this process; `int4_linear()` computes x @ W^T (+ bias) in fp32 and rounds once to x's
dtype, through the kernel when the call qualifies: CPU, x bfloat16 or float32, packed uint8
contiguous, bfloat16 scales, at most max_rows(x.dtype) rows, no autograd. Anything else, or a machine
without AVX2/FMA or a compiler, dequantizes W and multiplies in fp32 (see _fallback).

The kernel picks its SIMD path from the CPU at run time: AVX-512 BF16 (nibbles looked up as bf16,
vdpbf16ps; for bf16 x and groups of 8..128 dividing 128 or multiples of 128), else AVX-512, else
AVX2. NXD_INT4_KERNEL=avx512 or avx2, read once per process, lowers it (avx512bf16: the default).
`isa()` says which. It is a torch operator (nxd::int4_linear), so torch.compile keeps it as one call.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpp_build import build_and_load, cpu_flags

# Up to this many rows (per path) the kernel takes a call; beyond, the fallback, which dequantizes
# all of W to fp32 first. Measured on one shared Zen 4 core (load average ~6), W [5632, 2048] g128,
# bf16 x, ms per call, best of 3 (the fallback's numbers from the same runs):
#   rows                      16    64   128   256   512  1024  2048  4096
#   kernel, avx512bf16       4.3    11    29    58   124   254   577  1213
#   kernel, avx512           4.4    22    49   110   145   377   860
#   kernel, avx2             8.7    41    84   169   347   725
#   fallback (dequantize)     96   171   184   218   306   497   860  1726
# The fp32 paths' FMAs grow with the rows while the fallback's dequantization does not: AVX2 loses
# past ~300 rows. The BF16 path (2 multiply-adds per lane per instruction) still wins at 4096.
MAX_ROWS = {"avx512bf16": 4096, "avx512": 1024, "avx2": 256}

_SOURCE = Path(__file__).with_name("int4_linear.cpp")
_extension = None  # torch.ops.nxd.int4_linear, once prepare() succeeded in this process
_row_limits: dict[torch.dtype, int] = {}  # max_rows per dtype of x, once prepared
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
        warnings.warn("this CPU has no AVX2/FMA: int4 weights are dequantized for ATen's linear (slower decoding)", stacklevel=2)
        return False
    # AVX2 is the file's baseline; the AVX-512 functions carry their own target attributes.
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
    if not build_and_load("nxd_int4_linear", _SOURCE, flags, ["-fopenmp"], "dequantizing for ATen's linear"):
        _unavailable = True
        return False
    _register_shape_function()
    _extension = torch.ops.nxd.int4_linear
    _check_override()
    _row_limits.update({dtype: max_rows(dtype) for dtype in (torch.bfloat16, torch.float32)})
    return True


PATHS = ("avx512bf16", "avx512", "avx2")  # best first; NXD_INT4_KERNEL names one to lower the path to


def _check_override() -> None:
    """One warning for an NXD_INT4_KERNEL the kernel does not know (it then takes the CPU's best path)."""
    forced = os.environ.get("NXD_INT4_KERNEL")
    if forced and forced not in PATHS:
        warnings.warn(f"NXD_INT4_KERNEL={forced} is none of {', '.join(PATHS)}: the int4 kernel takes this CPU's best path", stacklevel=3)


def isa() -> str | None:
    """The kernel's best SIMD path in this process ("avx512bf16", "avx512" or "avx2"), or None where it is
    not prepared. On "avx512bf16", float32 x and groups the BF16 path does not fit take "avx512"."""
    return torch.ops.nxd.int4_linear_isa() if _extension is not None else None


def max_rows(dtype: torch.dtype) -> int:
    """Rows of x of this dtype up to which int4_linear takes the kernel here (0 where not prepared):
    float32 x takes the fp32 AVX-512 path on a BF16 CPU."""
    path = isa()
    if path is None:
        return 0
    return MAX_ROWS["avx512" if path == "avx512bf16" and dtype != torch.bfloat16 else path]


def _register_shape_function() -> None:
    """Shapes for torch.compile's tracing (the kernel itself is registered by the C++ library)."""

    @torch.library.register_fake("nxd::int4_linear")
    def _(x, packed, scale):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("nxd::int4_linear_many")
    def _many(x, packs, scales):
        return x.new_empty(x.shape[0], sum(p.shape[0] for p in packs))


def _qualifies(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> bool:
    return (
        _extension is not None
        and x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and packed.dtype == torch.uint8
        and packed.device.type == "cpu"
        and packed.is_contiguous()
        and scale.dtype == torch.bfloat16
        and scale.device.type == "cpu"
        and x.numel() <= _row_limits.get(x.dtype, 0) * x.shape[-1]
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def _fallback(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: dequantize to fp32, fp32 linear, rounded once to x's dtype."""
    from .quantization import dequantize

    out = F.linear(x.float(), dequantize(packed, scale), None if bias is None else bias.float())
    return out.to(x.dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] times the int4 weight packed [N, K / 2] with scales [N, K / group] (+ bias), in x's dtype."""
    if not _qualifies(x, packed, scale):
        return _fallback(x, packed, scale, bias)
    out = _extension(x.reshape(-1, x.shape[-1]), packed, scale).view(*x.shape[:-1], packed.shape[0])
    return out + bias if bias is not None else out


def int4_linear_many(x: torch.Tensor, packs: list[torch.Tensor], scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """[int4_linear(x, p, s) for p, s in zip(packs, scales)]: the weights that meet the same x (q, k
    and v; gate and up) in one call of the kernel where they all qualify and share a group size (its
    fixed costs once)."""
    same_groups = len({s.shape[-1] for s in scales}) == 1
    if len(packs) < 2 or not same_groups or not all(_qualifies(x, p, s) for p, s in zip(packs, scales)):
        return [int4_linear(x, p, s) for p, s in zip(packs, scales)]
    out = torch.ops.nxd.int4_linear_many(x.reshape(-1, x.shape[-1]), list(packs), list(scales)).view(*x.shape[:-1], -1)
    return list(out.split([p.shape[0] for p in packs], dim=-1))
