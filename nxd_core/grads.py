"""Gradient clipping across tensor parallel ranks."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from . import parallel_state as ps
from .mappings import all_reduce_tensor_model_parallel
from .sharding import get_sharding


def clip_grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, norm_type: float = 2) -> torch.Tensor:
    """Clip gradients by their total norm over the whole (unsharded) model; return that norm.

    Sharded parameters contribute their local piece and are summed across the
    TP group; a piece replicated on k ranks (KV heads when tp > heads) counts
    1/k per rank. Replicated parameters hold the same gradient on every rank
    and count once. Data-parallel gradients are expected to be averaged
    already, as after DDP. Matches torch.nn.utils.clip_grad_norm_ on the
    unsharded model.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if not params:
        return torch.tensor(0.0)
    device = params[0].grad.device
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    replicated = torch.zeros((), dtype=torch.float32, device=device)
    tp = ps.get_tensor_model_parallel_size()

    for p in params:
        grad = p.grad.detach().float()
        spec = get_sharding(p)
        if norm_type == math.inf:
            value = grad.abs().max()
            if spec is not None and tp > 1:
                sharded = torch.maximum(sharded, value)
            else:
                replicated = torch.maximum(replicated, value)
        else:
            value = grad.norm(norm_type) ** norm_type
            if spec is not None and tp > 1:
                sharded = sharded + value * (spec.parts / spec.tp)
            else:
                replicated = replicated + value

    if tp > 1:
        sharded = all_reduce_tensor_model_parallel(sharded, "max" if norm_type == math.inf else "sum")
    if norm_type == math.inf:
        total = torch.maximum(sharded, replicated)
    else:
        total = (sharded + replicated) ** (1.0 / norm_type)

    clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.detach().mul_(clip_coef.to(p.grad.dtype))
    return total


def average_data_parallel_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Average gradients over the data parallel group, as DDP or the guide's
    `xm.optimizer_step(optimizer, groups=get_data_parallel_group(as_list=True))` do."""
    _average_gradients(parameters, ps.get_data_parallel_group(), ps.get_data_parallel_size())


def _average_gradients(parameters: Iterable[torch.Tensor], group, size: int) -> None:
    if size == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective, not one per parameter
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def optimizer_step(optimizer: torch.optim.Optimizer, barrier: bool = False, optimizer_args: dict | None = None, groups=None):
    """torch_xla's `xm.optimizer_step`, which NxD's training guide calls: average the gradients over
    `groups`, then `optimizer.step(**optimizer_args)`; returns what step returns.

    groups: the replica groups as lists of ranks; NxD passes
    `parallel_state.get_data_parallel_group(as_list=True)`. None means the whole world, as in
    torch_xla, which is only right at tp=1: with tp > 1 it would average different shards, so it is
    refused. barrier is accepted for the same signature; there is no lazy graph to cut here.
    """
    del barrier
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tp = ps.get_tensor_model_parallel_size()
    if groups is None and tp > 1:
        raise ValueError(
            f"optimizer_step without groups averages over every rank, which mixes the {tp} tensor parallel shards: "
            "pass groups=parallel_state.get_data_parallel_group(as_list=True)"
        )
    if groups is not None and [list(g) for g in groups] != ps.get_data_parallel_group(as_list=True):
        raise ValueError(
            f"optimizer_step groups={groups} are not this world's data parallel groups "
            f"{ps.get_data_parallel_group(as_list=True)}: pass parallel_state.get_data_parallel_group(as_list=True)"
        )
    if groups is None and dist.is_initialized():
        _average_gradients(params, None, dist.get_world_size())
    else:
        _average_gradients(params, ps.get_data_parallel_group(), ps.get_data_parallel_size())
    return optimizer.step(**(optimizer_args or {}))
