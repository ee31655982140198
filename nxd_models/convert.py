"""Hugging Face checkpoint -> sharded checkpoint for tp ranks (what `nxd convert` runs).

The sharding comes from the family's parallel model, built at tp=1 on the
meta device (no weights, no processes): its ShardSpecs are retargeted to the
requested tp. The output directory also gets the config and tokenizer files,
so `from_pretrained_parallel(out_dir, tp=N)` loads it directly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig

from nxd_core.checkpoint import convert_to_sharded, open_full_checkpoint, tied_aliases
from nxd_core.quantization import (
    SCALE,
    check_group_size,
    check_lm_head_option,
    check_method,
    group_size,
    quantize_model,
    saved_quantization,
)
from nxd_core.sharding import sharding_specs

from . import hub
from .families import build_for_checkpoint, lookup

# Everything but the weights travels with the sharded checkpoint.
_SIDE_FILES = ("*.json", "tokenizer*", "*.model", "*.tiktoken")


def family_specs(config, checkpoint_names=None, quantize: str | None = None, quantize_lm_head: bool = False) -> tuple[dict, set | None]:
    """name -> ShardSpec (at tp=1) or None, for every tensor a checkpoint of this config holds; and, given
    the checkpoint's names, those the model takes (the family adapts the model to the checkpoint first:
    T5 ties lm_head when the checkpoint has none, BERT leaves out heads it does not build).
    A checkpoint saved quantized, or `quantize` (with the lm_head: quantize_lm_head), adds the quantized layers' scales."""
    if checkpoint_names is None:
        model, taken = lookup(config.model_type).build(config, dtype=torch.float32, device="meta"), None
    else:
        _, model, adapted = build_for_checkpoint(config, dict.fromkeys(checkpoint_names), torch.float32, device="meta")
        taken = set(adapted)
    method, stored = saved_quantization(checkpoint_names or {})
    if stored or quantize:
        quantize_model(model, method or quantize, stored or None, lm_head=quantize_lm_head)
    aliases = tied_aliases(model)  # tied names are not stored
    return {name: spec for name, spec in sharding_specs(model).items() if name not in aliases}, taken


def convert(
    name_or_path,
    out_dir,
    tp: int,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    quantize: str | None = None,
    quantize_lm_head: bool = False,
) -> dict:
    """quantize="int8": the linears' weights are written as int8 with their scales (nxd_core.quantization);
    quantize_lm_head: the lm_head's too."""
    check_method(quantize)
    source = hub.resolve(name_or_path)
    config = AutoConfig.from_pretrained(source)
    family = lookup(config.model_type, str(source))
    family.check_tp(config, tp)
    checkpoint = {n: t for n, t in open_full_checkpoint(source).items() if not family.IGNORED_CHECKPOINT_NAMES.search(n)}
    method, stored = saved_quantization(checkpoint)
    if stored and quantize not in (None, method):
        raise ValueError(f"{source} holds {method} weights already; convert it with --quantize {method} or without --quantize")
    check_lm_head_option(quantize, quantize_lm_head, source, getattr(config, "tie_word_embeddings", False), method, stored)
    if quantize and group_size(quantize):
        model = lookup(config.model_type).build(config, device="meta")
        check_group_size(model, quantize, tp, family.valid_tp_values(config), lm_head=quantize_lm_head)
    specs, taken = family_specs(config, checkpoint, quantize, quantize_lm_head)
    out_dir = Path(out_dir)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(1 for _ in specs)
        bar = tqdm(total=total, desc=f"converting to tp={tp}", unit="tensor")
    manifest = convert_to_sharded(
        source,
        out_dir,
        tp,
        specs,
        dtype=dtype,
        progress=(lambda _: bar.update(1)) if bar else None,
        # Heads the checkpoint has but the model lacks (a pre-training checkpoint's pooler) are left out.
        ignore=lambda name: bool(family.IGNORED_CHECKPOINT_NAMES.search(name)) or name not in taken,
        quantize_layers=[] if stored else [n[: -len(SCALE) - 1] for n in specs if n.endswith("." + SCALE)],
        quantize=quantize,
    )
    if bar:
        bar.close()
    copy_side_files(source, out_dir)
    return manifest


def copy_side_files(source, out_dir) -> None:
    """Config, generation config and tokenizer files: what a model directory needs besides weights."""
    for pattern in _SIDE_FILES:
        for file in Path(source).glob(pattern):
            if file.name not in ("model.safetensors.index.json", "manifest.json"):
                shutil.copy2(file, Path(out_dir) / file.name)
