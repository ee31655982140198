"""The model-family contract, family lookup by config.json's model_type, and building a family's
model for a checkpoint.

A family is a module (llama.py, bert.py, t5.py, qwen.py, mistral.py, moe.py) that provides every member of `Family`; the
optional parts have explicit defaults in each module, so callers never probe with hasattr.
Both sides use it: the front end checks a config before any process starts, the workers build
their shards.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import Literal, Protocol

import torch
from torch import nn

from .registry import list_models

# config.json's model_type -> the module that holds the family's parallel architecture.
FAMILY_MODULES = {
    "llama": "nxd_models.llama",
    "bert": "nxd_models.bert",
    "t5": "nxd_models.t5",
    "qwen2": "nxd_models.qwen",
    "qwen3": "nxd_models.qwen",
    "mistral": "nxd_models.mistral",
    "mixtral": "nxd_models.moe",
    "qwen3_moe": "nxd_models.moe",
}

# Relatives of the supported families that need more than they have: model_type -> what is missing.
NOT_SUPPORTED = {
    "qwen2_vl": "Qwen2-VL's vision encoder and multimodal rotary positions (M-RoPE)",
    "qwen2_5_vl": "Qwen2.5-VL's vision encoder and multimodal rotary positions (M-RoPE)",
    "qwen3_vl": "Qwen3-VL's vision encoder and interleaved multimodal rotary positions",
    "qwen3_vl_moe": "Qwen3-VL's vision encoder and interleaved multimodal rotary positions",
    "qwen2_moe": "Qwen2-MoE's shared expert and its sigmoid gate",
    "qwen2_audio": "Qwen2-Audio's audio encoder",
    "qwen3_next": "Qwen3-Next's gated linear attention (Gated DeltaNet) layers and shared expert",
    "mistral3": "Mistral 3's vision encoder and multimodal projector",
    "pixtral": "Pixtral's vision encoder",
}


class Family(Protocol):
    MODEL_TYPES: tuple[str, ...]  # config.json model_type values this family builds
    HANDLE: Literal["causal", "encoder", "seq2seq"]  # which handle from_pretrained_parallel returns
    KV_CACHE: bool  # whether the built model preallocates a KV cache (allocate_kv_cache)
    IGNORED_CHECKPOINT_NAMES: re.Pattern  # checkpoint names never loaded (recomputed buffers, unused heads)

    def check_tp(self, config, tp: int) -> None:
        """Raise ValueError, naming the valid values, when tp cannot shard this config."""

    def build(self, config, dtype: torch.dtype = torch.float32, device=None) -> nn.Module:
        """The parallel model for config at the current tp (device="meta": no memory)."""

    def adapt_checkpoint(self, tensors: dict, model: nn.Module) -> dict:
        """Checkpoint names -> the model's (legacy names, heads the model lacks); may tie the model
        as the checkpoint is. Families with nothing to adapt return tensors unchanged."""

    def default_max_seq_len(self, config) -> int:
        """The KV cache's length when from_pretrained_parallel is given none."""


def lookup(model_type: str, where: str = "the checkpoint") -> Family:
    """The family module for a config's model_type, or a clear error for other architectures."""
    if model_type in NOT_SUPPORTED:
        raise ValueError(
            f"{where} is a '{model_type}' model, which from_pretrained_parallel does not support yet: it needs "
            f"{NOT_SUPPORTED[model_type]}. Supported model types: {sorted(FAMILY_MODULES)}"
        )
    for module in dict.fromkeys(FAMILY_MODULES.values()):
        family = importlib.import_module(module)
        if model_type in family.MODEL_TYPES:
            return family
    raise ValueError(
        f"{where} is a '{model_type}' model; from_pretrained_parallel supports the model types "
        f"{sorted(FAMILY_MODULES)} (zoo names: {', '.join(list_models())})"
    )


def build_for_checkpoint(config, checkpoint: Mapping, dtype: torch.dtype, device=None) -> tuple[Family, nn.Module, dict]:
    """The family's model for config, built on device and adapted to a checkpoint (name -> tensor, or
    name -> None for names only): (family, model, what the model takes of the checkpoint), the
    ignored names left out and the family's adaptation applied (renames, heads it lacks, tying)."""
    family = lookup(config.model_type)
    model = family.build(config, dtype=dtype, device=device)
    kept = {name: value for name, value in checkpoint.items() if not family.IGNORED_CHECKPOINT_NAMES.search(name)}
    return family, model, family.adapt_checkpoint(kept, model)
