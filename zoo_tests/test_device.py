"""Moving models between devices keeps the tensor parallel attributes; nccl runs the same code on CUDA."""

import pytest
import torch
from torch import nn

from nxd_core.layers import ColumnParallelLinear, RowParallelLinear, move_model_to_device
from nxd_core.sharding import get_sharding
from nxd_core.workers import WorkerGroup


def test_move_model_to_device_keeps_sharding_metadata():
    model = nn.Sequential(ColumnParallelLinear(8, 16, gather_output=False), RowParallelLinear(16, 8, input_is_parallel=True))
    specs = {name: get_sharding(p) for name, p in model.named_parameters()}
    move_model_to_device(model, torch.device("cpu"))
    model.to(torch.float64)  # even a dtype change keeps the Parameter objects, and so the metadata
    for name, p in model.named_parameters():
        assert get_sharding(p) == specs[name]
        if specs[name] is not None:
            assert p.tensor_model_parallel and p.partition_dim == specs[name].dim


def test_xla_device_is_optional_and_says_how_to_get_it():
    import importlib.util

    if importlib.util.find_spec("torch_xla") is None:
        with pytest.raises(ImportError, match=r'pip install "nxd-zoo\[xla\]"'):
            move_model_to_device(nn.Linear(2, 2), "xla")
    else:
        model = move_model_to_device(ColumnParallelLinear(4, 8), "xla")
        assert model.weight.device.type == "xla" and get_sharding(model.weight) is not None


def cuda_mlp_error():
    torch.manual_seed(0)
    from nxd_core.checkpoint import load_state_dict_from_full

    reference = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).cuda()
    parallel = nn.Sequential(
        ColumnParallelLinear(16, 32, gather_output=False, device="cuda"),
        nn.GELU(),
        RowParallelLinear(32, 16, input_is_parallel=True, device="cuda"),
    )
    load_state_dict_from_full(parallel, reference.state_dict())
    x = torch.randn(2, 4, 16, device="cuda")
    return (parallel(x) - reference(x)).abs().max().item(), torch.distributed.get_backend()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_worker_group_on_cuda():
    with WorkerGroup(2, device="cuda") as group:
        for error, backend in group.run(cuda_mlp_error):
            assert backend == "nccl" and error < 1e-5
