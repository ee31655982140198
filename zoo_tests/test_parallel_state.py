"""Process group layout: contiguous TP groups, DP across them, clear errors."""

import pytest
import torch
import torch.distributed as dist

from nxd_core import parallel_state as ps


def layout():
    return {
        "rank": dist.get_rank(),
        "tp": ps.get_tensor_model_parallel_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "dp": ps.get_data_parallel_size(),
        "dp_rank": ps.get_data_parallel_rank(),
        "tp_groups": ps.get_tensor_model_parallel_group(as_list=True),
        "dp_groups": ps.get_data_parallel_group(as_list=True),
        "tp_group_ranks": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
        "dp_group_ranks": dist.get_process_group_ranks(ps.get_data_parallel_group()),
        "aliases": (ps.get_tensor_parallel_size(), ps.get_data_parallel_world_size()),
    }


def test_tp2_dp2_layout(tp_runner):
    for info in tp_runner.run(2, layout, dp=2):
        rank = info["rank"]
        assert info["tp"] == 2 and info["dp"] == 2
        assert info["tp_rank"] == rank % 2 and info["dp_rank"] == rank // 2
        assert info["tp_groups"] == [[0, 1], [2, 3]]
        assert info["dp_groups"] == [[0, 2], [1, 3]]
        assert info["tp_group_ranks"] == info["tp_groups"][rank // 2]
        assert info["dp_group_ranks"] == info["dp_groups"][rank % 2]
        assert info["aliases"] == (2, 2)


def test_tp4_layout(tp_runner):
    for info in tp_runner.run(4, layout):
        assert info["tp_groups"] == [[0, 1, 2, 3]] and info["dp_groups"] == [[0], [1], [2], [3]]
        assert info["tp_rank"] == info["rank"] and info["dp"] == 1


def bad_tp():
    ps.initialize_model_parallel(3)


def test_tp_that_does_not_divide_world_is_a_clear_error(tp_runner):
    with pytest.raises(ValueError, match=r"world size 4 is not divisible by tensor_model_parallel_size 3.*\[1, 2, 4\]"):
        tp_runner.run(4, bad_tp)
    # the failed call left the previous layout in place: the group still works
    assert [i["tp"] for i in tp_runner.run(4, layout)] == [4] * 4


def test_single_process_without_a_process_group():
    assert not dist.is_initialized()
    assert ps.get_tensor_model_parallel_size() == 1 and ps.get_tensor_model_parallel_rank() == 0
    assert ps.get_data_parallel_size() == 1 and ps.get_tensor_model_parallel_group() is None
    ps.initialize_model_parallel(1)
    try:
        assert ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_size() == 1
    finally:
        ps.destroy_model_parallel()
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group"):
        ps.initialize_model_parallel(2)


def _replicated_layers(x):
    from nxd_core.layers import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(0)
    with ps.replicated():
        inside = ps.get_tensor_model_parallel_size(), ps.get_tensor_model_parallel_rank()
        up, down = ColumnParallelLinear(8, 16, gather_output=False), RowParallelLinear(16, 8, input_is_parallel=True)
    # built whole: runs outside the context with no collective, like the same layers at tp=1
    return inside, ps.get_tensor_model_parallel_size(), tuple(up.weight.shape), down(up(x))


def test_replicated_builds_whole_layers_inside_a_tp_group(tp_runner):
    x = torch.randn(3, 8)
    results = tp_runner.run(2, _replicated_layers, x)
    local = _replicated_layers(x)
    for inside, after, shape, y in results:
        assert inside == (1, 0) and after == 2 and shape == (16, 8)
        torch.testing.assert_close(y, local[3], rtol=0, atol=0)
