"""Parallel Mistral: Llama's parallel layers with sliding-window attention on every layer.

The KV cache keeps every slot (no rolling buffer); the mask limits each query to the `sliding_window`
slots up to its own, exactly Hugging Face's mask, in prefill and in decoding from the cache, also for
prompts longer than the window. Parameter names are Hugging Face's MistralForCausalLM.
"""

from __future__ import annotations

import torch

from . import llama
from .llama import DecoderArch, ParallelLlamaForCausalLM, sliding_windows

# The family contract (nxd_models.families.Family).
MODEL_TYPES = ("mistral",)
HANDLE = "causal"
KV_CACHE = True
IGNORED_CHECKPOINT_NAMES = llama.IGNORED_CHECKPOINT_NAMES
adapt_checkpoint = llama.adapt_checkpoint
default_max_seq_len = llama.default_max_seq_len
valid_tp_values = llama.valid_tp_values


def check_tp(config, tp: int) -> None:
    llama.check_tp(config, tp, "Mistral")


def build(config, dtype: torch.dtype = torch.float32, device=None) -> ParallelLlamaForCausalLM:
    return ParallelLlamaForCausalLM(
        config, dtype=dtype, device=device, arch=DecoderArch(windows=sliding_windows(config, by_layer_types=False))
    )
