"""Autograd-aware collectives over the tensor parallel group, named by what they do.

Each is the identity at tp=1. They use functional collectives so that a model
built from them can be traced by torch.export (see DESIGN.md, "Tracing").
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from . import parallel_state as ps

# all_gather_tensor was renamed all_gather_single in recent torch; keep working on both.
_all_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if ps.get_tensor_model_parallel_size() == 1:
        return x
    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", ps.get_tensor_model_parallel_group()))


def _all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if ps.get_tensor_model_parallel_size() == 1:
        return x
    gathered = _all_gather_dim0(x.contiguous(), 0, ps.get_tensor_model_parallel_group())
    gathered = funcol.wait_tensor(gathered)
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


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce (the input feeds every rank's shard)."""
    return _CopyToRegion.apply(x)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: all-reduce (sum of partial results). Backward: identity."""
    return _ReduceFromRegion.apply(x)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: keep this rank's chunk of the last dim. Backward: all-gather."""
    return _ScatterToRegion.apply(x)


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward: all-gather along the last dim. Backward: keep this rank's chunk."""
    return _GatherFromRegion.apply(x)
