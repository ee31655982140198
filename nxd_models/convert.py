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

from nxd_core.checkpoint import _aliases, convert_to_sharded
from nxd_core.sharding import sharding_specs

from . import hub
from .registry import family_module

# Everything but the weights travels with the sharded checkpoint.
_SIDE_FILES = ("*.json", "tokenizer*", "*.model", "*.tiktoken")


def family_specs(config) -> dict:
    """name -> ShardSpec (at tp=1) or None, for every tensor a checkpoint of this config holds."""
    family = family_module(config.model_type)
    model = family.build(config, dtype=torch.float32, device="meta")
    aliases = _aliases(model)  # tied names are not stored
    return {name: spec for name, spec in sharding_specs(model).items() if name not in aliases}


def convert(name_or_path, out_dir, tp: int, dtype: torch.dtype | None = None, progress: bool = True) -> dict:
    source = hub.resolve(name_or_path)
    config = AutoConfig.from_pretrained(source)
    family = family_module(config.model_type, str(source))
    family.check_tp(config, tp)
    specs = family_specs(config)
    out_dir = Path(out_dir)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(1 for _ in specs)
        bar = tqdm(total=total, desc=f"converting to tp={tp}", unit="tensor")
    manifest = convert_to_sharded(
        source, out_dir, tp, specs, dtype=dtype,
        progress=(lambda _: bar.update(1)) if bar else None,
        ignore=family.IGNORED_CHECKPOINT_NAMES.search,
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
