"""Front end: from_pretrained_parallel, and the checks it makes before any process starts.

Driver mode (a script or a notebook): a WorkerGroup of tp processes holds the
shards; each builds its shard on the meta device and streams only its own
slices from the checkpoint (worker_ops.load_shard). SPMD mode (torchrun): the
same loading runs in every rank's own process. The family's `HANDLE` says
which handle fits it (handles.py); for a causal LM the handle's call returns
rank 0's gathered full-vocabulary logits.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from transformers import AutoConfig

from nxd_core.checkpoint import MANIFEST, open_full_checkpoint, read_manifest
from nxd_core.quantization import SCALE, check_group_size, check_lm_head_option, check_method, group_size, saved_quantization
from nxd_core.safetensors_stream import DTYPE_NAMES, check_complete
from nxd_core.workers import Group, start_workers

from . import WORKER_MODULES, hub
from .families import lookup
from .handles import HANDLES, ParallelHandle
from .worker_ops import load_shard, model_key

_OWNERS = itertools.count()  # each loaded model's number: the owner of what it keeps in the workers
_DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}  # a manifest's "BF16" -> torch.bfloat16


def _check_weights(path: Path) -> None:
    """Fail in the front end, before any process starts, when the weights are not all there."""
    if (path / MANIFEST).exists():
        return
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index} is not a valid weights index ({exc}); download it again") from None
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists weights files that are missing: {missing}; download them again")
    else:
        files = [p.name for p in sorted(path.glob("*.safetensors"))]
    if not files:
        legacy = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pth")]
        hint = f" (found {legacy}: nxd-zoo reads safetensors only; convert them)" if legacy else ""
        raise FileNotFoundError(f"no weights file in {path}: expected model.safetensors or model.safetensors.index.json{hint}")
    for file in files:
        check_complete(path / file)


def _check_quantization(path: Path, quantize: str | None, quantize_lm_head: bool, tied: bool) -> None:
    """A checkpoint saved quantized loads as saved: asking for another quantization is an error (and
    the lm_head's quantization: check_lm_head_option)."""
    tensors = read_manifest(path)["tensors"] if (path / MANIFEST).exists() else open_full_checkpoint(path)
    saved, layers = saved_quantization(tensors)
    if saved is not None and quantize not in (None, saved):
        raise ValueError(
            f"{path} holds {saved} weights; it cannot be loaded with quantize={quantize!r}: pass quantize=None "
            f"(or {saved!r}), or convert the original checkpoint with --quantize {quantize}"
        )
    check_lm_head_option(quantize, quantize_lm_head, path, tied, saved, layers)


def _default_dtype(config, path: Path) -> torch.dtype:
    if (path / MANIFEST).exists():  # the dtype it was saved in: its first tensor that is not int8 or a scale
        entries = read_manifest(path)["tensors"]
        dtypes = [_DTYPES_BY_NAME[e["dtype"]] for name, e in entries.items() if not name.endswith(SCALE) and e["dtype"] not in ("I8", "U8")]
        if dtypes:
            return dtypes[0]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def from_pretrained_parallel(
    name_or_path,
    tp: int = 1,
    dtype: torch.dtype | None = None,
    max_batch_size: int = 1,
    max_seq_len: int | None = None,
    device: str = "cpu",
    workers: Group | None = None,
    progress: bool = True,
    quantize: str | None = None,
    quantize_lm_head: bool = False,
) -> ParallelHandle:
    """Load a zoo model, Hugging Face repo id, local HF directory or `nxd convert` output, sharded over tp.

    In a plain process this starts tp worker processes (or uses `workers`, a
    WorkerGroup of size tp, shared with other models; tp=1 on a larger group
    keeps a whole copy in every worker, as for a speculative draft); under torchrun it uses
    the existing process group. quantize="int8" quantizes the linears' weights while they
    load (docs/quantization.md), and quantize_lm_head=True the lm_head's too; a checkpoint saved
    quantized loads as saved. Everything that
    can be checked is checked here first, so bad input fails before a process starts.
    """
    check_method(quantize)
    path = hub.resolve(name_or_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}: not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path / 'config.json'} cannot be read as a model config ({exc}); download or write it again") from None
    family = lookup(config.model_type, str(path))
    family.check_tp(config, tp)
    if quantize and family.HANDLE != "causal":
        raise ValueError(f"quantize={quantize!r} is for causal language models; {config.model_type} is not one: load it without quantize")
    _check_weights(path)
    _check_quantization(path, quantize, quantize_lm_head, tied=getattr(config, "tie_word_embeddings", False))
    if group_size(quantize or "int8"):
        check_group_size(family.build(config, device="meta"), quantize, tp, family.valid_tp_values(config), lm_head=quantize_lm_head)
    if (path / MANIFEST).exists():
        saved_tp = read_manifest(path)["tp"]
        if saved_tp != tp:
            raise ValueError(f"{path} was converted for tp={saved_tp}, not tp={tp}: run `nxd reshard {path} OUT --tp {tp}`")
    dtype = dtype or _default_dtype(config, path)
    max_seq_len = max_seq_len or family.default_max_seq_len(config)
    # tp=1 on a larger group: every worker holds a whole copy (a small speculative draft: no collectives).
    replicated = workers is not None and tp == 1 and workers.tp > 1
    if workers is not None and workers.tp != tp and not replicated:
        raise ValueError(
            f"the worker group runs tp={workers.tp}, but tp={tp} was asked for: use tp={workers.tp} to shard "
            "over it, or tp=1 for a whole copy in every worker"
        )

    owns_group = workers is None
    group = workers if workers is not None else start_workers(tp, device=device, preload=WORKER_MODULES)
    key = model_key(next(_OWNERS))
    try:
        group.run(load_shard, key, str(path), dtype, max_batch_size, max_seq_len, device, progress, replicated, quantize, quantize_lm_head)
    except BaseException:
        if owns_group:
            group.close()
        raise
    return HANDLES[family.HANDLE](group, key, config, path, tp, dtype, max_batch_size, max_seq_len, owns_group)
