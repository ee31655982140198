"""What each tensor parallel worker does for a traced model: export, run, save, load, replace weights.

A worker keeps its shard of every traced model in `worker_state()` under
`StateKey("traced", key)` (the model's key is the owner, so `drop_owned_by(key)`
drops it too). With weights inlined, a bucket's program is the exported module
(its weights inside). With weights separated, a bucket's program is the
export of `forward(state, *inputs)` calling `torch.func.functional_call`, so
the graph holds no tensor of the model: the rank's tensors (weights, then
state such as KV caches) are a dict passed on every call, and in-place updates
of the state land in that dict's tensors, shared by every bucket.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from . import parallel_state as ps
from . import shm_ops  # noqa: F401  (defines the nxd::shm_* operators that saved graphs may call)
from .checkpoint_read import check_keys, open_full_weights, rank_slice, tied_aliases
from .sharding import ShardSpec, get_sharding
from .trace_format import TracedModelError, graph_file, tensor_meta, to_dtype, weights_file
from .worker_process import StateKey, return_freed_memory, worker_state

_KIND = "traced"  # worker_state()[StateKey("traced", key)]: this rank's Shard of the traced model `key`
# Operators whose string arguments name a process group: c10d's and ours (shm_ops.py).
_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "nxd")
_TRACED_OUT_SPECS: list = []


class Flat(nn.Module):
    """module(*inputs) with the output flattened to a tuple of tensors; export records its structure.

    The graph then returns builtin types only, so a process can load it without
    importing the module's output class (a transformers ModelOutput); the front end rebuilds it.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *inputs):
        return self.flatten(self.module(*inputs))

    def flatten(self, out):
        leaves, spec = pytree.tree_flatten(out)
        _TRACED_OUT_SPECS.append(spec)  # while export runs forward (it undoes changes to module attributes)
        return tuple(leaves)


class Stateless(Flat):
    """Flat, with the module's tensors taken from `state`: its export holds no weights."""

    def __init__(self, module: nn.Module):
        nn.Module.__init__(self)
        object.__setattr__(self, "module", module)  # not a submodule: its tensors must not enter the graph

    def forward(self, state: dict, *inputs):
        return self.flatten(torch.func.functional_call(self.module, state, inputs))


@dataclass
class Shard:
    """One rank's traced model."""

    programs: list  # an ExportedProgram per bucket (kept to save them)
    inline: bool
    compiled: bool
    traced_group: str | None  # the process group name baked into the graphs
    tensors: dict[str, torch.Tensor] | None = None  # weights and state, when separated from the graphs
    runners: list = field(default_factory=list)

    def runner(self, bucket: int):
        """The bucket's program as a callable: its collectives pointed at this process's TP group, compiled if asked."""
        if not self.runners:
            self.runners = [None] * len(self.programs)
        if self.runners[bucket] is None:
            module = retarget_collectives(self.programs[bucket].module(), self.traced_group)
            self.runners[bucket] = torch.compile(module, dynamic=False) if self.compiled else module
        return self.runners[bucket]


def _shard(key: str) -> Shard:
    try:
        return worker_state()[StateKey(_KIND, key)]
    except KeyError:
        raise KeyError(key) from None


def _keep(key: str, shard: Shard) -> None:
    worker_state()[StateKey(_KIND, key)] = shard


def _tp_group_name() -> str | None:
    group = ps.get_tensor_model_parallel_group()
    return group.group_name if group is not None else None


def retarget_collectives(module: fx.GraphModule, traced_group: str | None) -> fx.GraphModule:
    """Point the graph's collectives at this process's TP group.

    An exported graph names its process group; a group's name depends on how
    many groups the process created before it, so a graph loaded elsewhere may
    name a group that does not exist there (or another group).
    """
    current = _tp_group_name()
    if traced_group is None or current is None or traced_group == current:
        return module
    for graph_module in module.modules():
        if not isinstance(graph_module, fx.GraphModule):
            continue
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and getattr(node.target, "namespace", None) in _COLLECTIVE_NAMESPACES:
                node.args = tuple(current if arg == traced_group else arg for arg in node.args)
                node.kwargs = {k: current if v == traced_group else v for k, v in node.kwargs.items()}
        graph_module.recompile()
    return module


# -- trace ----------------------------------------------------------------------------


def _state_names(tensors: dict, io_aliases) -> list[str]:
    """Names of the tensors io_aliases marks as state (keys: the tensors themselves, or their names)."""
    names = []
    for key in io_aliases or {}:
        if isinstance(key, str):
            name = key if key in tensors else None
        else:
            name = next((n for n, t in tensors.items() if t is key), None)
        if name is None:
            shown = key if isinstance(key, str) else f"a tensor of shape {list(key.shape)}"
            raise ValueError(f"io_aliases marks {shown} as state, but it is not a parameter or buffer of the model")
        names.append(name)
    return names


def trace_shard(key: str, func, example_sets: list[tuple], inline: bool, compiled: bool) -> dict:
    """Build this rank's model with func(), export it once per bucket; return what the front end needs."""
    built = func()
    model, io_aliases = built if isinstance(built, tuple) else (built, {})
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model function must return a torch.nn.Module or (module, io_aliases), got {type(model).__name__}")
    model.eval()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = _state_names(tensors, io_aliases)
    tensors = {name: t.detach() for name, t in tensors.items()}  # same storage: state updates reach the model too
    programs, out_specs = [], []
    with torch.no_grad():
        for inputs in example_sets:
            _TRACED_OUT_SPECS.clear()
            if inline:
                program = torch.export.export(Flat(model), tuple(inputs), strict=False)
            else:
                program = torch.export.export(Stateless(model), (tensors, *inputs), strict=False)
            program.example_inputs = None  # they would hold every weight
            programs.append(program)
            out_specs.append(pytree.treespec_dumps(_TRACED_OUT_SPECS[-1]))
    _keep(key, Shard(programs, inline, compiled, _tp_group_name(), None if inline else tensors))
    info = {
        "group_name": _tp_group_name(),
        "graph_hashes": [hashlib.sha256(p.graph_module.code.encode()).hexdigest() for p in programs],
        "out_specs": out_specs,
    }
    if ps.get_tensor_model_parallel_rank() == 0:
        sharding = {name: get_sharding(t) for name, t in model.named_parameters()}
        checkpoint_names = [n for n in model.state_dict() if n not in state]
        info["weights"] = {
            "order": list(tensors),
            "sharding": {n: s.to_json() for n, s in sharding.items() if s is not None},
            "checkpoint_names": [n for n in checkpoint_names if n not in tied_aliases(model)],
            "aliases": tied_aliases(model),
        }
        info["state"] = {name: tensor_meta(tensors[name]) for name in state}
    return info


# -- run, save, load -------------------------------------------------------------------------


def run_shard(key: str, bucket: int, inputs: list[torch.Tensor]):
    """Run one bucket's program; tp rank 0 returns the output's tensors (the others' would be the same)."""
    shard = _shard(key)
    runner = shard.runner(bucket)
    with torch.no_grad():
        out = runner(*inputs) if shard.inline else runner(shard.tensors, *inputs)
    return out if ps.get_tensor_model_parallel_rank() == 0 else None


def unsharded_digests(key: str, names: list[str]) -> dict[str, str]:
    """A checksum of each named tensor: the front end stores once those equal on every rank."""
    tensors = _shard(key).tensors
    return {n: hashlib.sha256(tensors[n].contiguous().view(-1).view(torch.uint8).numpy()).hexdigest() for n in names}


def save_shard(key: str, folder: str, state_names: list[str], replicated: list[str]) -> None:
    """Write this rank's files. Separated: graphs and the `replicated` weights by rank 0 only."""
    shard = _shard(key)
    folder, rank = Path(folder), ps.get_tensor_model_parallel_rank()
    with warnings.catch_warnings():
        # torch warns about views (KV cache slices) when it packs inlined tensors; they are saved whole.
        warnings.filterwarnings("ignore", message="No complete tensor found")
        for bucket, program in enumerate(shard.programs):
            if shard.inline or rank == 0:  # separated: one graph serves every rank
                path = folder / graph_file(bucket, rank if shard.inline else None)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.export.save(program, path)
    if shard.inline:
        return
    # State (KV caches) starts from zeros at load: only weights are written. Clones: safetensors refuses shared storage.
    weights = {n: t.clone().contiguous() for n, t in shard.tensors.items() if n not in state_names}
    (folder / weights_file(rank)).parent.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        safetensors.torch.save_file({n: weights[n] for n in replicated}, folder / weights_file(None))
    safetensors.torch.save_file({n: t for n, t in weights.items() if n not in replicated}, folder / weights_file(rank))


def _register_cpu_kernels() -> None:
    """A traced graph may call nxd's CPU kernels (the models' decode attention, bf16 and quantized
    linears): a saved program only deserializes where its operators exist, so each one this CPU can
    run is built (or loaded from the extension cache) first, as the model's own loading does."""
    from . import attention_kernel, cpu_kernels, int4_kernels, int8_kernels

    for kernels in (attention_kernel, cpu_kernels, int8_kernels, int4_kernels):
        kernels.prepare()


def load_shard(key: str, folder: str, manifest: dict, compiled: bool) -> None:
    folder, rank = Path(folder), ps.get_tensor_model_parallel_rank()
    _register_cpu_kernels()
    inline = manifest["inline_weights_to_neff"]
    buckets = len(manifest["buckets"])
    programs = [torch.export.load(folder / graph_file(b, rank if inline else None)) for b in range(buckets)]
    tensors = None
    if not inline:
        path = folder / weights_file(rank)
        weights = {**safetensors.torch.load_file(folder / weights_file(None)), **safetensors.torch.load_file(path)}
        state = manifest["state"]
        missing = [n for n in manifest["weights"]["order"] if n not in state and n not in weights]
        if missing:
            raise TracedModelError(f"{path} lacks {len(missing)} weights the graphs need ({missing[:5]}...): save the model again")
        zeros = {n: torch.zeros(meta["shape"], dtype=to_dtype(meta["dtype"])) for n, meta in state.items()}
        tensors = {n: zeros[n] if n in zeros else weights[n] for n in manifest["weights"]["order"]}
    _keep(key, Shard(programs, inline, compiled, manifest["group_name"], tensors))


def release_shard(key: str) -> None:
    if worker_state().pop(StateKey(_KIND, key), None) is not None:
        return_freed_memory()


# -- replace weights -------------------------------------------------------------------------


def rank_pieces(full: Mapping, weights: dict, rank: int, source: str) -> dict[str, torch.Tensor]:
    """This rank's slice of every weight of an unsharded state dict, through sharding.shard_tensor."""
    found = [k for k in full.keys() if k not in weights["aliases"]]
    pieces = {}
    for name in check_keys(weights["checkpoint_names"], found, source, strict=True):
        spec = weights["sharding"].get(name)
        pieces[name] = rank_slice(full[name], ShardSpec.from_json(spec) if spec else None, rank, name)
    return pieces


def replace_shard_weights(key: str, pieces: dict | None, path: str | None, weights: dict) -> None:
    """Swap this rank's weights: given pieces, or its slices of the unsharded checkpoint at path."""
    shard = _shard(key)
    if pieces is None:
        pieces = rank_pieces(open_full_weights(path, mmap=True), weights, ps.get_tensor_model_parallel_rank(), path)
    for name, piece in pieces.items():
        current = shard.tensors[name]
        if piece.shape != current.shape:
            raise ValueError(f"{name}: the new weight's slice has shape {list(piece.shape)}, the traced model's {list(current.shape)}")
        # A new tensor rather than copy_: the loaded ones may map the weights file read-only.
        shard.tensors[name] = piece.to(current.dtype).contiguous()
