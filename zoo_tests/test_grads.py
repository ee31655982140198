"""clip_grad_norm over TP shards equals torch.nn.utils.clip_grad_norm_ on the unsharded gradients."""

import math

import pytest
import torch
from torch import nn

from nxd_core import parallel_state as ps
from nxd_core.grads import clip_grad_norm
from nxd_core.sharding import ShardSpec, set_sharding, shard_tensor


def clip_case(norm_type, max_norm):
    tp, rank = ps.get_tensor_model_parallel_size(), ps.get_tensor_model_parallel_rank()
    torch.manual_seed(0)
    layouts = [
        ((12, 6), ShardSpec(dim=0, full_size=12, tp=tp)),  # column-style
        ((5, 10), ShardSpec(dim=1, full_size=10, tp=tp, pad=True)),  # row-style, padded at tp=4
        ((8, 4), ShardSpec(dim=0, full_size=8, tp=tp, max_parts=2, unit=4)),  # 2 KV heads, replicated at tp=4
        ((7,), None),  # replicated (a LayerNorm bias)
    ]
    reference = [nn.Parameter(torch.zeros(shape)) for shape, _ in layouts]
    for p in reference:
        p.grad = torch.randn_like(p) * 3
    local = []
    for ref, (_, spec) in zip(reference, layouts):
        if spec is None:
            p = nn.Parameter(ref.detach().clone())
            p.grad = ref.grad.clone()
        else:
            p = nn.Parameter(shard_tensor(ref.detach(), spec, rank))
            p.grad = shard_tensor(ref.grad, spec, rank).clone()  # at tp=1 the slice is a view
            set_sharding(p, spec)
        local.append(p)
    ref_total = torch.nn.utils.clip_grad_norm_(reference, max_norm, norm_type)
    total = clip_grad_norm(local, max_norm, norm_type)
    grad_error = 0.0
    for ref, p, (_, spec) in zip(reference, local, layouts):
        expected = shard_tensor(ref.grad, spec, rank) if spec else ref.grad
        grad_error = max(grad_error, (p.grad - expected).abs().max().item())
    return ref_total.item(), total.item(), grad_error


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("norm_type", [2, 1, math.inf])
def test_clip_grad_norm_matches_torch(tp_runner, tp, norm_type):
    for ref_total, total, grad_error in tp_runner.run(tp, clip_case, norm_type, 0.5):
        assert ref_total > 0.5, "the case must actually clip"
        assert total == pytest.approx(ref_total, rel=1e-5)
        assert grad_error < 1e-6


def test_clip_grad_norm_leaves_small_gradients_alone():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([0.1, 0.2, 0.2])
    total = clip_grad_norm([p], max_norm=10.0)
    assert total.item() == pytest.approx(0.3)
    assert torch.allclose(p.grad, torch.tensor([0.1, 0.2, 0.2]))
