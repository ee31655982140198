"""Reading full (unsharded) checkpoints into parallel models: each rank reads only its slices.

A full checkpoint is a .safetensors file, a Hugging Face directory of them
(model.safetensors, or shards listed by model.safetensors.index.json), or a
torch file holding {model_key: state_dict}. Safetensors tensors are opened
lazily (`_LazySlice`): a rank reads its rows of a tensor, not the checkpoint.
Every slice goes through `sharding.shard_tensor`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from . import parallel_state as ps
from .safetensors_stream import TORCH_DTYPES, read_header, read_tensor
from .sharding import ShardSpec, copy_sharding_attributes, get_sharding, shard_tensor

__all__ = ["check_keys", "tied_aliases", "load_state_dict_from_full", "open_full_checkpoint", "open_full_weights"]


# -- names and errors --------------------------------------------------------------


def _describe_names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_keys(expected, found, source: str, strict: bool = True) -> list[str]:
    """The expected names present in `found`; with strict, an error listing missing and unexpected names."""
    expected, found = list(expected), set(found)
    missing = [k for k in expected if k not in found]
    unexpected = sorted(found - set(expected))
    if strict and (missing or unexpected):
        raise KeyError(
            f"checkpoint {source} does not match the model: "
            f"missing {len(missing)} [{_describe_names(missing)}], "
            f"unexpected {len(unexpected)} [{_describe_names(unexpected)}]. "
            "The checkpoint's names must equal the model's state_dict names (or pass strict=False)."
        )
    return [k for k in expected if k in found]


# -- putting tensors into a model -----------------------------------------------------


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Copy value into the tensor called `name`; on the meta device, replace it (in every module
    that shares it, so tied weights stay tied)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    current = getattr(owner, attr)
    if current.shape != value.shape:
        raise ValueError(f"{name}: checkpoint slice has shape {list(value.shape)}, model expects {list(current.shape)}")
    if not current.is_meta:
        with torch.no_grad():
            current.copy_(value)
        return
    value = value.to(current.dtype)
    if attr in owner._parameters:
        replacement = nn.Parameter(value, requires_grad=current.requires_grad)
        copy_sharding_attributes(current, replacement)
        for module in model.modules():
            for key, param in module._parameters.items():
                if param is current:
                    module._parameters[key] = replacement
    else:
        owner._buffers[attr] = value


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Tied names (a second name for a tensor already listed) -> the first name, e.g. lm_head.weight."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def rank_slice(full, spec: ShardSpec | None, rank: int, name: str) -> torch.Tensor:
    """Rank's piece of a full tensor (or lazy view of one): its shard, or all of it when replicated."""
    return shard_tensor(full, spec, rank, name) if spec is not None else _read_whole(full)


def load_state_dict_from_full(model: nn.Module, full_state: Mapping, strict: bool = True, source: str = "state dict") -> None:
    """Load an unsharded state dict (tensors or lazy safetensors slices) into a parallel model, in place.

    A tied name (lm_head.weight tied to the embedding) may be absent: it is filled through its twin.
    """
    rank = ps.get_tensor_model_parallel_rank()
    tp = ps.get_tensor_model_parallel_size()
    aliases = tied_aliases(model)
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in aliases}
    found = [k for k in full_state.keys() if k not in aliases]
    for name in check_keys(targets, found, source, strict):
        spec = get_sharding(targets[name])
        if spec is not None and spec.tp != tp:
            raise ValueError(f"{name} was built for tp={spec.tp} but the current tensor parallel size is {tp}")
        _assign(model, name, rank_slice(full_state[name], spec, rank, name))


def _read_whole(full) -> torch.Tensor:
    if isinstance(full, torch.Tensor):
        return full
    return full.read() if hasattr(full, "read") else full[:]


# -- unsharded checkpoints, read lazily -------------------------------------------------


class _LazySlice:
    """One tensor of a safetensors file, read only when asked: a slice through safetensors'
    lazy view, or the whole tensor with plain sequential reads."""

    def __init__(self, path: str, name: str, data_start: int, entry: dict):
        self.path, self.name, self._data_start, self._entry = path, name, data_start, entry
        self.shape, self.dtype = tuple(entry["shape"]), TORCH_DTYPES[entry["dtype"]]

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        first = index[0] if index else slice(None)
        if isinstance(first, slice) and first.step in (None, 1) and all(i == slice(None) for i in index[1:]):
            start, stop, _ = first.indices(self.shape[0])  # a row range: one exact read
            return read_tensor(self.path, self._data_start, self._entry, rows=(start, max(start, stop)))
        # Other slices through safetensors' lazy view, copied so no mapping of the file outlives the read.
        with safe_open(self.path, framework="pt") as handle:
            return handle.get_slice(self.name)[index].clone()

    @property
    def nbytes(self) -> int:
        begin, end = self._entry["data_offsets"]
        return end - begin

    def read(self, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return read_tensor(self.path, self._data_start, self._entry, buffer)


def open_full_checkpoint(path) -> dict:
    """name -> lazy tensor for an unsharded checkpoint: a .safetensors file, or a directory of
    Hugging Face safetensors shards (with model.safetensors.index.json) or one model.safetensors."""
    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
            if missing:
                raise FileNotFoundError(f"{index} lists files that are missing: {missing}; download them again")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no safetensors weights in {path}: expected model.safetensors or model.safetensors.index.json")
        paths = [str(path / f) for f in files]
    elif path.suffix == ".safetensors":
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        paths = [str(path)]
    else:
        raise ValueError(f"{path} is neither a .safetensors file nor a directory of them")
    tensors = {}
    for file in paths:
        data_start, header = read_header(file)
        for name, entry in header.items():
            tensors[name] = _LazySlice(file, name, data_start, entry)
    return tensors


def open_full_weights(path, model_key: str = "model", mmap: bool | None = None) -> Mapping:
    """name -> tensor (or lazy slice) of an unsharded checkpoint: safetensors file or HF directory,
    or a torch file holding {model_key: state_dict} (torch.load with weights_only=True, and mmap as given)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path) or str(path).endswith(".safetensors"):
        return open_full_checkpoint(path)
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    state = data.get(model_key, data) if isinstance(data, dict) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict under '{model_key}'")
    return state


def _load_unsharded(path: str, model: nn.Module, model_key: str, strict: bool) -> None:
    load_state_dict_from_full(model, open_full_weights(path, model_key), strict, source=path)
