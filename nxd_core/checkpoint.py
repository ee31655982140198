"""Loading checkpoints into tensor parallel models.

`load(path, model, sharded=False)` reads one unsharded checkpoint and copies
into each parameter only this rank's slice (via `sharding.shard_tensor`).
Safetensors files are opened lazily, so a rank reads just its slices.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from safetensors import safe_open
from torch import nn

from . import parallel_state as ps
from .sharding import copy_sharding_attributes, get_sharding, shard_tensor


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


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Copy value into the tensor called `name`, or replace it when it lives on the meta device."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    current = getattr(owner, attr)
    if current.shape != value.shape:
        raise ValueError(f"{name}: checkpoint slice has shape {list(value.shape)}, model expects {list(current.shape)}")
    if current.is_meta:
        value = value.to(current.dtype)
        if attr in owner._parameters:
            param = nn.Parameter(value, requires_grad=current.requires_grad)
            copy_sharding_attributes(current, param)
            owner._parameters[attr] = param
        else:
            owner._buffers[attr] = value
        return
    with torch.no_grad():
        current.copy_(value)


def load_state_dict_from_full(model: nn.Module, full_state: Mapping, strict: bool = True, source: str = "state dict") -> None:
    """Load an unsharded state dict (tensors or lazy safetensors slices) into a parallel model, in place."""
    rank = ps.get_tensor_model_parallel_rank()
    tp = ps.get_tensor_model_parallel_size()
    targets = model.state_dict(keep_vars=True)
    for name in check_keys(targets, full_state.keys(), source, strict):
        spec = get_sharding(targets[name])
        if spec is not None and spec.tp != tp:
            raise ValueError(f"{name} was built for tp={spec.tp} but the current tensor parallel size is {tp}")
        full = full_state[name]
        piece = shard_tensor(full, spec, rank, name) if spec is not None else _read_whole(full)
        _assign(model, name, piece)


def _read_whole(full) -> torch.Tensor:
    return full if isinstance(full, torch.Tensor) else full[:]


class _SafetensorsSlices(Mapping):
    """A read-only mapping name -> lazy slice over one safetensors file."""

    def __init__(self, handle):
        self._handle = handle
        self._keys = list(handle.keys())

    def __getitem__(self, name):
        return self._handle.get_slice(name)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def load(load_dir, model: nn.Module | None = None, model_key: str = "model", sharded: bool = True, strict: bool = True):
    """Load a checkpoint into `model` (in place).

    sharded=False reads one unsharded checkpoint: a torch file holding
    {model_key: state_dict} (read with weights_only=True) or a .safetensors file.
    """
    path = os.fspath(load_dir)
    if sharded:
        raise NotImplementedError("sharded checkpoints (tp_rank_XX folders) are not supported yet")
    if model is None:
        raise ValueError("load(..., sharded=False) needs the model to load into: load(path, model, sharded=False)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as handle:
            load_state_dict_from_full(model, _SafetensorsSlices(handle), strict, source=path)
        return model
    data = torch.load(path, map_location="cpu", weights_only=True)
    state = data.get(model_key, data) if isinstance(data, dict) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict under '{model_key}'")
    load_state_dict_from_full(model, state, strict, source=path)
    return model
