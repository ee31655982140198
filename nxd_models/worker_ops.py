"""Worker side of every handle: load a shard, run a forward pass, release a model.

These functions run on every rank that holds a shard (the worker processes in driver mode, each
rank's own process under torchrun); the front end (loading.py, handles.py) sends them by reference
through `group.run`. Nothing here imports front-end code. What a model owns in `worker_state()`
(the model, its generation sessions, its compiled steps) is keyed by `StateKey(kind, owner)` with
the model's number as owner, so that release drops all of it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

from nxd_core import parallel_state as ps
from nxd_core.checkpoint import (
    MANIFEST,
    check_keys,
    load,
    load_state_dict_from_full,
    open_full_checkpoint,
    open_sharded_checkpoint,
    read_manifest,
    tied_aliases,
)
from nxd_core.huge_pages import move_to_huge_pages
from nxd_core.quantization import prepare_kernels, quantize_model, quantized_sources, saved_quantization
from nxd_core.worker_process import StateKey, drop_owned_by, return_freed_memory, worker_state

from .families import build_for_checkpoint


def model_key(owner: int) -> StateKey:
    """Where a model's shard lives in worker_state(); a handle's `key`."""
    return StateKey("model", owner)


def owned_key(key: StateKey, kind: str) -> StateKey:
    """Where something the model at `key` owns lives (kind: "session", "compiled", ...)."""
    return StateKey(kind, key.owner)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def on_device(device, *tensors) -> list:
    return [t.to(device) if t is not None else None for t in tensors]


def load_shard(
    key: StateKey,
    path: str,
    dtype,
    max_batch_size: int,
    max_seq_len: int,
    device: str,
    progress: bool,
    replicated: bool = False,
    quantize: str | None = None,
    quantize_lm_head: bool = False,
) -> int:
    """In each rank: build the shard on the meta device, stream in its slices, allocate the KV cache;
    returns the shard's bytes. replicated: build and load a whole copy (tp=1) in every rank of the group.
    quantize ("int8"): quantize the linears' weights as their slices stream in (a checkpoint saved
    quantized loads as it is); quantize_lm_head: the lm_head too."""
    progress = progress and ps.get_tensor_model_parallel_rank() == 0
    with ps.replicated() if replicated else contextlib.nullcontext():
        config = AutoConfig.from_pretrained(path)
        description = f"loading {Path(path).name} at tp={ps.get_tensor_model_parallel_size()}"
        if (Path(path) / MANIFEST).exists():
            manifest = read_manifest(path)
            prefix = manifest["model_prefix"]
            entries = {name[len(prefix) :]: entry for name, entry in manifest["tensors"].items() if name.startswith(prefix)}
            saved = list(entries)
            # Adapting to the saved names ties the model as the checkpoint was.
            family, model, _ = build_for_checkpoint(config, dict.fromkeys(saved), dtype, device="meta")
            method, stored = saved_quantization(entries)
            if stored or not quantize:
                if stored:
                    quantize_model(model, method, stored)
                # Tied names (T5's embed_tokens, a tied lm_head) are not stored: check the others, then load leniently.
                aliases = tied_aliases(model)
                check_keys([n for n in model.state_dict() if n not in aliases], saved, path)
                load(path, model, sharded=True, strict=False)
            else:  # quantized from the unquantized pieces: a row-parallel scale needs every rank's part of its rows
                tensors = quantized_sources(
                    open_sharded_checkpoint(path), quantize_model(model, quantize, lm_head=quantize_lm_head), quantize
                )
                load_state_dict_from_full(model, _with_progress(tensors, description) if progress else tensors, source=path)
        else:
            # Legacy names, heads the checkpoint has but the model lacks, tying: the family adapts them.
            family, model, tensors = build_for_checkpoint(config, open_full_checkpoint(path), dtype, device="meta")
            method, stored = saved_quantization(tensors)
            if stored:
                quantize_model(model, method, stored)
            elif quantize:
                tensors = quantized_sources(tensors, quantize_model(model, quantize, lm_head=quantize_lm_head), quantize)
            if progress:
                tensors = _with_progress(tensors, description)
            load_state_dict_from_full(model, tensors, source=path)
        model.to(device)
        prepare_kernels(model)  # the quantized layers' kernels, now that the weights are on their device
        move_to_huge_pages(model)  # CPU weights of 2 MB and more: decoding streams them (nxd_core/huge_pages.py)
        if family.KV_CACHE:
            model.allocate_kv_cache(max_batch_size, max_seq_len)
        model.eval()
        worker_state()[key] = model
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class _ProgressMapping(dict):
    """A name -> tensor mapping that advances a progress bar as tensors are read."""

    def __init__(self, tensors, bar):
        super().__init__(tensors)
        self._bar = bar

    def __getitem__(self, name):
        value = super().__getitem__(name)
        self._bar.update(1)
        if self._bar.n == self._bar.total:
            self._bar.close()
        return value


def _with_progress(tensors: dict, description: str):
    from tqdm.auto import tqdm

    return _ProgressMapping(tensors, tqdm(total=len(tensors), desc=description, unit="tensor", file=sys.stderr))


def forward(key: StateKey, method: str, every_rank: bool, *args, **kwargs):
    """model.<method>(*args, **kwargs) on this rank's shard ("__call__": its forward), the tensors moved
    to the model's device; the output on the CPU. Every rank holds the same gathered output; in driver
    mode one copy crosses back (every_rank: under torchrun each rank's script wants its own)."""
    model = worker_state()[key]
    device = device_of(model)
    with torch.inference_mode():
        args, values = on_device(device, *args), on_device(device, *kwargs.values())
        out = getattr(model, method)(*args, **dict(zip(kwargs, values))).cpu()
    return out if every_rank or ps.get_tensor_model_parallel_rank() == 0 else None


def release(key: StateKey) -> None:
    """Drop a model and all it owns (sessions, compiled steps) from this worker."""
    drop_owned_by(key.owner)
    return_freed_memory()


def end_session(key: StateKey, kind: str) -> None:
    """Forget the model's session of this kind (its KV cache stays, for the next one)."""
    worker_state().pop(owned_key(key, kind), None)
