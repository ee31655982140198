"""The shared-memory collectives as torch operators: nxd::shm_all_reduce and nxd::shm_all_gather.

    shm_all_reduce(Tensor x, str reduce_op, str group_name) -> Tensor           # "sum", "max", "min"
    shm_all_gather(Tensor x, int group_size, str group_name) -> Tensor          # shards stacked on dim 0

The arguments are those of torch's `_c10d_functional.all_reduce` / `all_gather_into_tensor`, and
the group is named the same way (the process group's name): a traced graph names no shared-memory
segment, and trace_worker points it at the loading process's TP group as it does for c10d ops.
In a process where that group has no shared memory (collectives="gloo", a graph loaded elsewhere),
the op runs the process group's own functional collective.

The schemas, fake (meta) shapes and that fallback are defined here, on import, so torch.compile
sees each collective as one call and torch.export.load finds the op in any process. The CPU kernels
come from shm_collectives.cpp, built by `load()` once per machine (torch's C++ extension cache).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed._functional_collectives as funcol

from .cpp_build import build_and_load, cpu_flags

_SOURCE = Path(__file__).with_name("shm_collectives.cpp")
_loaded = False
_unavailable = False  # a failed build is not retried (nor warned about) again in this process

_LIBRARY = torch.library.Library("nxd", "FRAGMENT")
_LIBRARY.define("shm_all_reduce(Tensor x, str reduce_op, str group_name) -> Tensor")
_LIBRARY.define("shm_all_gather(Tensor x, int group_size, str group_name) -> Tensor")


def _gathered_shape(x: torch.Tensor, group_size: int) -> list[int]:
    shape = list(x.shape) or [1]
    shape[0] *= group_size
    return shape


# Without the C++ kernels (another device, or no compiler): the process group's collective.
def _all_reduce_fallback(x, reduce_op, group_name):
    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), reduce_op, group_name))


def _all_gather_fallback(x, group_size, group_name):
    out = torch.ops._c10d_functional.all_gather_into_tensor(x.contiguous(), group_size, group_name)
    return funcol.wait_tensor(out)


_LIBRARY.impl("shm_all_reduce", _all_reduce_fallback, "CompositeExplicitAutograd")
_LIBRARY.impl("shm_all_gather", _all_gather_fallback, "CompositeExplicitAutograd")


@torch.library.register_fake("nxd::shm_all_reduce")
def _(x, reduce_op, group_name):
    return x.new_empty(x.shape)


@torch.library.register_fake("nxd::shm_all_gather")
def _(x, group_size, group_name):
    return x.new_empty(_gathered_shape(x, group_size))


all_reduce = torch.ops.nxd.shm_all_reduce.default
all_gather = torch.ops.nxd.shm_all_gather.default


def _build_flags() -> tuple[str, list[str]]:
    """The extension's name and compiler flags for this CPU (found at run time; never AVX-512)."""
    if {"avx2", "fma", "f16c"} <= cpu_flags():
        return "nxd_shm_collectives_avx2", ["-O3", "-mavx2", "-mfma", "-mf16c"]
    return "nxd_shm_collectives", ["-O3"]


def load() -> bool:
    """Build (or take from the cache) and load the CPU kernels in this process; False where they cannot be."""
    global _loaded, _unavailable
    if _loaded:
        return True
    if _unavailable:
        return False
    name, flags = _build_flags()
    if not build_and_load(name, _SOURCE, flags, ["-lrt"], "tensor parallel groups use gloo"):
        _unavailable = True  # a failed build is warned about once, not retried
        return False
    _loaded = True
    return True
