"""Attention of a few queries over a KV cache on x86 CPUs (decode_attention.cpp): one call per layer.

A decode step's attention is two tiny matrix products and a softmax per layer. ATen's bmm costs
20-60 us a call at these sizes, and reads the whole cache, filled or not. The kernel does the layer's
attention in one call and reads each row's slots only up to the last one its mask allows, so a step
costs what the text's length asks, not the cache's (benchmarks/attention.py measures both).

`prepare()` builds it once per machine (torch's C++ extension cache) where the CPU has AVX2/FMA;
`qualifies()` says whether a call can take it (CPU, float32 or bfloat16, head size a multiple of
8, no autograd). Models keep their own Python attention for everything else (nxd_models/llama.py).
NXD_ATTENTION_KERNEL=0 switches it off (read by prepare()).

Two paths, chosen at run time: AVX2+FMA throughout, or, for bf16 inputs on a CPU with AVX512_BF16,
both products by `vdpbf16ps` on the inputs as stored (`path()`, `use_path()`, `available_paths()`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .cpp_build import build_and_load, cpu_flags

ENV = "NXD_ATTENTION_KERNEL"
# The CPU flags each path needs, best first (names as in /proc/cpuinfo).
PATHS = {
    "avx512bf16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx2", "fma"},
    "avx2": {"avx2", "fma"},
}
_SOURCE = Path(__file__).with_name("decode_attention.cpp")
_loaded = None  # torch.ops.nxd.decode_attention, once built and loaded in this process
_extension = None  # _loaded while the kernel is switched on
_unavailable = False  # not tried again in this process (until enable())


def prepare() -> bool:
    """Build (or load from the cache) and enable the kernel in this process; False where it cannot run."""
    global _extension, _loaded, _unavailable
    if _extension is not None:
        return True
    if _unavailable:
        return False
    if os.environ.get(ENV, "").strip() == "0" or not {"avx2", "fma"} <= cpu_flags():
        _unavailable = True
        return False
    if _loaded is None:
        if not build_and_load(
            "nxd_decode_attention", _SOURCE, ["-O3", "-mavx2", "-mfma", "-fopenmp"], ["-fopenmp"], "attention stays in ATen"
        ):
            _unavailable = True
            return False

        @torch.library.register_fake("nxd::decode_attention")
        def _(q, k, v, mask, scale):
            return q.new_empty(q.shape)

        _loaded = torch.ops.nxd.decode_attention
    _extension = _loaded
    return True


def disable() -> None:
    """Switch the kernel off in this process (tests and benchmarks compare against the Python path)."""
    global _extension, _unavailable
    _extension, _unavailable = None, True


def enable() -> bool:
    """Undo disable(); False where the kernel cannot run here."""
    global _unavailable
    _unavailable = False
    return prepare()


def available_paths() -> list[str]:
    """The paths this CPU can run, best first (the kernel takes the first unless use_path says otherwise)."""
    flags = cpu_flags()
    return [name for name, needs in PATHS.items() if needs <= flags]


def path() -> str | None:
    """The path the kernel takes in this process, or None where it is not prepared."""
    return torch.ops.nxd.decode_attention_isa() if _extension is not None else None


def use_path(name: str) -> None:
    """Make the kernel take `name` in this process (tests and benchmarks compare the paths)."""
    if not prepare():
        raise RuntimeError("the decode attention kernel cannot run here")
    torch.ops.nxd.decode_attention_set_isa(name)


def qualifies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        _extension is not None
        and q.device.type == "cpu"
        and k.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] % 8 == 0
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    )


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale over the slots mask allows) v: q [b, heads, s, d], k and v [b, kv_heads,
    slots, d] (heads a multiple of kv_heads), mask bool [b, 1, s, slots]; [b, heads, s, d]. Only
    where qualifies() is True."""
    if _extension is None:
        raise RuntimeError("the decode attention kernel is not prepared in this process: call prepare() and check qualifies()")
    return _extension(q, k, v, mask, scale)
