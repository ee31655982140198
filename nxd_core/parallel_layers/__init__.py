"""`neuronx_distributed.parallel_layers`, laid out as in NxD over the zoo's own modules.

A script written against NxD's guides runs after renaming the package in its
import lines (`from nxd_core.parallel_layers import layers, parallel_state`,
`nxd_core.parallel_layers.load(...)`): docs/migrating-from-nxd.md has the
whole table. Nothing here is a copy. The submodules are the very module
objects of nxd_core (registered under both names in sys.modules), because
parallel_state keeps the process's groups in module globals: a second copy of
it would answer tp=1 to the layers built through the other name.
"""

import sys

from .. import checkpoint as checkpointing
from .. import grads, layers, mappings, parallel_state
from ..checkpoint import load, save
from ..grads import clip_grad_norm
from ..layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, move_model_to_device

for _name, _module in {
    "checkpointing": checkpointing,
    "grads": grads,
    "layers": layers,
    "mappings": mappings,
    "parallel_state": parallel_state,
}.items():
    sys.modules[f"{__name__}.{_name}"] = _module

__all__ = [
    "ColumnParallelLinear",
    "ParallelEmbedding",
    "RowParallelLinear",
    "checkpointing",
    "clip_grad_norm",
    "grads",
    "layers",
    "load",
    "mappings",
    "move_model_to_device",
    "parallel_state",
    "save",
]
