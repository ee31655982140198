"""Process groups for tensor parallelism (TP) and data parallelism (DP).

Ranks are laid out tp-major: a TP group is `tp` contiguous ranks, and data
parallelism runs across TP groups (rank r is in TP group r // tp and DP group
r % tp). With tp=1 and no process group at all, every getter answers as a
single process would, so layers and models run unchanged in a plain script.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

_TP_GROUP = None
_DP_GROUP = None
_TP_RANKS: list[list[int]] | None = None
_DP_RANKS: list[list[int]] | None = None
_TP_SIZE = 1
_INITIALIZED = False
_TP_SHM_GROUP: str | None = None  # the TP group's name when its collectives run through shared memory
COLLECTIVES = ("auto", "gloo", "backend")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """numerator / denominator, or a clear error naming both and the valid choices."""
    if numerator % denominator != 0:
        raise ValueError(
            f"{what} {numerator} is not divisible by tensor parallel size {denominator}; valid tp values are {divisors(numerator)}"
        )
    return numerator // denominator


def initialize_model_parallel(tensor_model_parallel_size: int = 1, collectives: str = "auto", timeout=None) -> None:
    """Build the TP and DP groups over the default process group.

    Every rank must call this, in the same order as any other group creation.
    collectives: "auto" (shared memory where a TP group is on one host, else the backend's) or
    "gloo"/"backend" to force the process group's own collectives. timeout: a timedelta after
    which a collective that waits on a peer fails (None: torch's default).
    """
    global _TP_GROUP, _DP_GROUP, _TP_RANKS, _DP_RANKS, _TP_SIZE, _INITIALIZED, _TP_SHM_GROUP
    tp = int(tensor_model_parallel_size)
    if tp < 1:
        raise ValueError(f"tensor_model_parallel_size must be >= 1, got {tp}")
    if collectives not in COLLECTIVES:
        raise ValueError(f"collectives must be one of {list(COLLECTIVES)}, got {collectives!r}")
    if not dist.is_initialized() and launched_by_torchrun():
        join_torchrun_world()
    if not dist.is_initialized() and tp != 1:
        raise RuntimeError(
            f"tensor_model_parallel_size={tp} needs a torch.distributed process group: "
            "run under torchrun, call torch.distributed.init_process_group first, "
            "or use nxd_core.workers.WorkerGroup"
        )
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % tp != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size {tp}; "
            f"valid tensor parallel sizes for this world are {divisors(world)}"
        )
    if _INITIALIZED:
        destroy_model_parallel()
    if not dist.is_initialized():
        _TP_SIZE, _TP_RANKS, _DP_RANKS = 1, [[0]], [[0]]
        _INITIALIZED = True
        return

    _TP_RANKS = [list(range(start, start + tp)) for start in range(0, world, tp)]
    _DP_RANKS = [list(range(offset, world, tp)) for offset in range(tp)]
    rank = dist.get_rank()
    # new_group is collective over the whole world: every rank creates every group.
    for ranks in _TP_RANKS:
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _TP_GROUP = group
    for ranks in _DP_RANKS:
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _DP_GROUP = group
    _TP_SIZE = tp
    _INITIALIZED = True
    # Chosen once, here: the mappings ask tp_shared_memory_group() on every call.
    if collectives == "auto" and tp > 1:
        from . import shm_group

        if shm_group.attach(_TP_GROUP, timeout):
            _TP_SHM_GROUP = _TP_GROUP.group_name


def launched_by_torchrun() -> bool:
    # torchrun (like env:// rendezvous in torch itself) hands each rank its identity in the environment.
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def join_torchrun_world(device: str | None = None) -> None:
    """Create the default process group from torchrun's environment.

    NxD's guide calls initialize_model_parallel under torchrun with no process group in sight (its
    scripts made one with init_process_group("xla")), so initialize_model_parallel makes it here.
    device "cuda" means nccl only; None means gloo for CPU tensors, plus nccl for CUDA tensors where
    CUDA is present, so a CPU script runs unchanged on a GPU host.
    """
    cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if device == "cuda" else ("cpu:gloo,cuda:nccl" if cuda else "gloo")
    dist.init_process_group(backend)


def model_parallel_is_initialized() -> bool:
    return _INITIALIZED


def destroy_model_parallel() -> None:
    """Forget the TP/DP groups (the default process group stays)."""
    global _TP_GROUP, _DP_GROUP, _TP_RANKS, _DP_RANKS, _TP_SIZE, _INITIALIZED, _TP_SHM_GROUP
    if _TP_SHM_GROUP is not None:
        from . import shm_group

        shm_group.detach(_TP_SHM_GROUP)
        _TP_SHM_GROUP = None
    for group in (_TP_GROUP, _DP_GROUP):
        if group is not None and dist.is_initialized():
            dist.destroy_process_group(group)
    _TP_GROUP = _DP_GROUP = _TP_RANKS = _DP_RANKS = None
    _TP_SIZE = 1
    _INITIALIZED = False


def _world_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_tensor_model_parallel_size() -> int:
    return _TP_SIZE


def get_tensor_model_parallel_rank() -> int:
    return _world_rank() % _TP_SIZE if _INITIALIZED else 0


def get_tensor_model_parallel_group(as_list: bool = False):
    """The TP group of this rank (None when tp=1 without a process group), or all TP groups as lists of ranks."""
    if as_list:
        return [list(r) for r in (_TP_RANKS or [[0]])]
    return _TP_GROUP


def tp_shared_memory_group() -> str | None:
    """The TP group's name when its collectives go through shared memory (shm_ops), else None."""
    return _TP_SHM_GROUP


def tp_collectives() -> str:
    """ "shm" or "backend": which collectives the TP group uses (chosen by initialize_model_parallel)."""
    return "shm" if _TP_SHM_GROUP is not None else "backend"


def get_data_parallel_size() -> int:
    if not _INITIALIZED or not dist.is_initialized():
        return 1
    return dist.get_world_size() // _TP_SIZE


def get_data_parallel_rank() -> int:
    return _world_rank() // _TP_SIZE if _INITIALIZED else 0


def get_data_parallel_group(as_list: bool = False):
    """The DP group of this rank (None without a process group), or all DP groups as lists of ranks."""
    if as_list:
        return [list(r) for r in (_DP_RANKS or [[0]])]
    return _DP_GROUP


@contextmanager
def replicated():
    """Inside, this rank acts as tp=1: layers built here hold full, unsharded weights.

    For a small model that every rank of a TP group keeps a whole copy of (a
    speculative draft beside a sharded target): a layer built at tp=1 never
    communicates, so the copy runs anywhere afterwards with no collective.
    """
    global _TP_SIZE, _TP_GROUP, _TP_SHM_GROUP
    saved = _TP_SIZE, _TP_GROUP, _TP_SHM_GROUP
    _TP_SIZE, _TP_GROUP, _TP_SHM_GROUP = 1, None, None
    try:
        yield
    finally:
        _TP_SIZE, _TP_GROUP, _TP_SHM_GROUP = saved


# The names NxD's own examples use.
get_tensor_parallel_size = get_tensor_model_parallel_size
get_tensor_model_parallel_world_size = get_tensor_model_parallel_size
get_tensor_parallel_rank = get_tensor_model_parallel_rank
get_data_parallel_world_size = get_data_parallel_size
