"""Autograd-aware collectives over the tensor parallel group, named by what they do.

Each is the identity at tp=1. A TP group on one host and on CPU exchanges through
shared memory (the nxd::shm_* operators, shm_ops.py); any other group uses its
backend's functional collectives. Both are single graph nodes, so a model built
from them can be traced by torch.export (docs/design.md, "Tracing" and rule 11).
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from . import parallel_state as ps
from . import shm_ops

# all_gather_tensor was renamed all_gather_single in recent torch; keep working on both.
_all_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def all_reduce_tensor_model_parallel(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The sum (or "max", "min") of x over the TP group, as a new tensor; no autograd."""
    shm = ps.tp_shared_memory_group()
    if shm is not None:
        return shm_ops.all_reduce(x, op, shm)
    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), op, ps.get_tensor_model_parallel_group()))


def all_gather_tensor_model_parallel(x: torch.Tensor) -> torch.Tensor:
    """The TP ranks' x stacked along dim 0, in rank order; no autograd."""
    shm = ps.tp_shared_memory_group()
    if shm is not None:
        return shm_ops.all_gather(x, ps.get_tensor_model_parallel_size(), shm)
    return funcol.wait_tensor(_all_gather_dim0(x.contiguous(), 0, ps.get_tensor_model_parallel_group()))


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if ps.get_tensor_model_parallel_size() == 1:
        return x
    return all_reduce_tensor_model_parallel(x)


def _all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if ps.get_tensor_model_parallel_size() == 1:
        return x
    gathered = all_gather_tensor_model_parallel(x)
    # all_gather stacks the shards along dim 0; move them onto the last dim.
    return torch.cat(gathered.chunk(ps.get_tensor_model_parallel_size(), dim=0), dim=-1)


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    tp = ps.get_tensor_model_parallel_size()
    if tp == 1:
        return x
    size = ps.divide(x.shape[-1], tp, "last dimension")
    return x.narrow(-1, ps.get_tensor_model_parallel_rank() * size, size).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_dim(grad)


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


def _needs_grad(x: torch.Tensor) -> bool:
    # Without autograd the forward alone runs: skipping Function.apply saves ~10 us per call on a
    # small CPU, several times per layer in eager decoding (compiled graphs never see the difference).
    return torch.is_grad_enabled() and x.requires_grad


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce (the input feeds every rank's shard)."""
    return _CopyToRegion.apply(x) if _needs_grad(x) else x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: all-reduce (sum of partial results). Backward: identity."""
    return _ReduceFromRegion.apply(x) if _needs_grad(x) else _all_reduce(x)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: keep this rank's chunk of the last dim. Backward: all-gather."""
    return _ScatterToRegion.apply(x) if _needs_grad(x) else _split_last_dim(x)


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: all-gather along the last dim. Backward: keep this rank's chunk."""
    return _GatherFromRegion.apply(x) if _needs_grad(x) else _all_gather_last_dim(x)
