"""A faster bfloat16 linear for decoding on x86 CPUs (bf16_linear.cpp).

Decoding multiplies a few rows of activations by every weight matrix, so its speed is memory
bandwidth. `prepare()` builds the kernel once per machine (torch's C++ extension cache, seconds),
picks its SIMD path from this CPU's flags (read at run time, never assumed from the build machine)
and switches it on in this process; `linear()` is F.linear, through the kernel when the call
qualifies: CPU, bfloat16, at most max_rows() rows, no autograd. Anything else, or a machine without
AVX2/FMA or a compiler, takes F.linear.

Paths, best first: avx512bf16 (AVX512_BF16 dot products), avx512 (AVX-512F/BW/VL), avx2 (AVX2+FMA).
NXD_BF16_KERNEL=avx2|avx512|avx512bf16 forces one (read by prepare(); a path this CPU lacks means
F.linear, with a warning); NXD_BF16_KERNEL=aten switches the kernel off. AMX is not implemented:
`path_support()` says so. Every path gives row m of an M-row call bit for bit what a one-row call
on that row gives (the serving engine and speculative decoding rely on it).

The kernel is a torch operator (nxd::bf16_linear), so torch.compile keeps it as one call.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpp_build import build_and_load, cpu_flags

# The CPU flags each path needs, best path first (names as in /proc/cpuinfo).
PATHS = {
    "avx512bf16": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"},
    "avx512": {"avx512f", "avx512bw", "avx512vl"},
    "avx2": {"avx2", "fma"},
}
ENV = "NXD_BF16_KERNEL"

# Up to how many rows (tokens x batch: decoding and speculative verification) take the kernel, per
# path. Measured on 2 Zen 4 cores with AVX512_BF16 (benchmarks/bf16_kernel.py --threads 1, fastest
# call, ms, W [2048, 2048] / [2048, 5632], weights from memory):
#   rows                       1            4            8
#   ATen F.linear (oneDNN)     0.68 / 1.97  0.64 / 1.84  0.79 / 2.29
#   kernel, avx512bf16         0.19 / 0.66  0.46 / 1.49  0.63 / 2.05
# One row is memory-bound and the kernel reads 3x faster. From 4 rows both are compute-bound; the
# kernel's tiles of 3-4 weight rows (each load of x shared) keep it ahead of oneDNN up to 8 rows
# (before the tiles: 0.90 / 2.17 and 1.36 / 3.64). The rows of a verification (k + 1) or a serving
# batch must be summed exactly as a one-row decode step sums them (row invariance), so a switch
# to ATen at some row count would break it anyway. On AVX2-only CPUs ATen has no bf16
# instructions and the kernel wins up to 8 rows (measured before issue 21). The avx512bf16 kernel
# stays ahead at 12 and 16 rows too (2 threads, weights from memory, ms per call, ATen against the
# kernel: [2048, 2048] 0.55 / 0.43 and 0.60 / 0.50; [5632, 2048] 1.46 / 1.31 and 1.66 / 1.54;
# [32000, 2048] 8.4 / 7.6 and 10.4 / 8.9; the demo model's shapes in cache, one step's linears,
# 381 / 257 and 436 / 344 us), so it takes up to 16: HF's default prompt_lookup_num_tokens=10
# verifies 11 rows, which then stay row-invariant (greedy exact) and fast (with llama.FEW_QUERIES);
# on the avx512 and avx2 paths ATen's bf16 GEMM wins past 8 here.
MAX_ROWS = {"avx512bf16": 16, "avx512": 8, "avx2": 8}

_SOURCE = Path(__file__).with_name("bf16_linear.cpp")
_extension = None  # torch.ops.nxd.bf16_linear, once prepare() succeeded in this process
_path = None  # the SIMD path the kernel runs
_unavailable = False  # prepare() found no usable path or could not build: not tried again in this process


def available_paths() -> list[str]:
    """The kernel's paths this CPU can run (from its flags), best first."""
    flags = cpu_flags()
    return [name for name, needs in PATHS.items() if needs <= flags]


def path_support() -> dict[str, str]:
    """Every path, and AMX, with a word on whether it runs here: "available", "no <flags>" or
    "not implemented"."""
    flags = cpu_flags()
    report = {name: "available" if needs <= flags else "no " + " ".join(sorted(needs - flags)) for name, needs in PATHS.items()}
    report["amx"] = "not implemented" + (" (this CPU has amx_bf16)" if "amx_bf16" in flags else "")
    return report


def _chosen_path() -> str | None:
    """The best path this CPU has, or the one NXD_BF16_KERNEL forces; None for F.linear."""
    forced = os.environ.get(ENV, "").strip().lower()
    have = available_paths()
    if not forced:
        return have[0] if have else None
    if forced == "aten":
        return None
    if forced not in PATHS:
        warnings.warn(
            f"{ENV}={forced!r} is not a bf16 kernel path (one of {', '.join(PATHS)}, or aten); using torch's F.linear", stacklevel=3
        )
        return None
    if forced not in have:
        missing = " ".join(sorted(PATHS[forced] - cpu_flags()))
        warnings.warn(f"{ENV}={forced}: this CPU lacks {missing}; using torch's F.linear (unset {ENV} to pick a path it has)", stacklevel=3)
        return None
    return forced


def prepare() -> bool:
    """Build (or load from the cache) and enable the kernel in this process; False where it cannot run."""
    global _extension, _unavailable
    if _extension is not None:
        return True
    if _unavailable:
        return False
    chosen = _chosen_path()
    if chosen is None:
        _unavailable = True
        return False
    # AVX2 is the file's baseline; the AVX-512 functions carry their own target attributes.
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
    if not build_and_load("nxd_bf16_linear", _SOURCE, flags, ["-fopenmp"], "using torch's F.linear"):
        _unavailable = True
        return False
    _register_shape_function()
    use_path(chosen)
    _extension = torch.ops.nxd.bf16_linear
    return True


def use_path(name: str) -> None:
    """Run the kernel on path `name` from now on in this process (tests and benchmarks)."""
    global _path
    if name not in available_paths():
        raise ValueError(f"bf16 kernel path {name!r} does not run on this CPU; it has {available_paths()} (cpu_kernels.path_support())")
    torch.ops.nxd.bf16_linear_set_isa(name)
    _path = name


def path() -> str | None:
    """The kernel's SIMD path in this process, or None where it is not prepared (F.linear)."""
    return _path if _extension is not None else None


def max_rows() -> int:
    return MAX_ROWS.get(_path, 0)


def _register_shape_function() -> None:
    """Shapes for torch.compile's tracing (the kernel itself is registered by the C++ library)."""

    @torch.library.register_fake("nxd::bf16_linear")
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("nxd::bf16_linear_many")
    def _many(x, weights):
        return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))


def _qualifies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _extension is not None
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and x.numel() <= max_rows() * x.shape[-1]
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), on the bf16 kernel where it qualifies."""
    if not _qualifies(x, weight):
        return F.linear(x, weight, bias)
    out = _extension(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return out + bias if bias is not None else out


def linear_many(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """[F.linear(x, w) for w in weights]: the weights that meet the same x (q, k and v; gate and up)
    in one call of the kernel where they all qualify, which pays a call's fixed costs once."""
    if len(weights) < 2 or not all(_qualifies(x, w) for w in weights):
        return [linear(x, w) for w in weights]
    out = torch.ops.nxd.bf16_linear_many(x.reshape(-1, x.shape[-1]), list(weights)).view(*x.shape[:-1], -1)
    return list(out.split([w.shape[0] for w in weights], dim=-1))
