"""Run under torchrun: the same nxd_core code paths as driver mode, in SPMD.

Each rank writes OUT_DIR/rank<r>.json: its rank, the TP layout, and the error
of a Column -> Row MLP against the unsharded torch.nn MLP. Usage: spmd_check.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

from nxd_core import parallel_state as ps
from nxd_core.checkpoint import load_state_dict_from_full
from nxd_core.layers import ColumnParallelLinear, RowParallelLinear
from nxd_core.workers import LocalGroup, start_workers


def mlp_error():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    parallel = nn.Sequential(
        ColumnParallelLinear(16, 32, gather_output=False), nn.GELU(), RowParallelLinear(32, 16, input_is_parallel=True)
    )
    load_state_dict_from_full(parallel, reference.state_dict())
    x = torch.randn(2, 4, 16)
    return (parallel(x) - reference(x)).abs().max().item()


group = start_workers(tp=2)
(error,) = group.run(mlp_error)
rank = torch.distributed.get_rank()
Path(sys.argv[1], f"rank{rank}.json").write_text(
    json.dumps(
        {
            "rank": rank,
            "local_group": isinstance(group, LocalGroup),
            "tp": ps.get_tensor_model_parallel_size(),
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "collectives": ps.tp_collectives(),
            "error": error,
        }
    )
)
group.close()
torch.distributed.destroy_process_group()
