"""Parallel Qwen2 / Qwen2.5 and Qwen3: Llama's parallel layers with Qwen's differences, by config.

    Qwen2   biases on q/k/v (sharded like their weights, head by head), none on o_proj
    Qwen3   RMSNorm over each head of q and k after the projection, before RoPE (replicated: it acts
            inside a head); `head_dim` independent of hidden_size / heads; attention_bias on q/k/v/o
    both    sliding-window layers where `layer_types` says so (use_sliding_window / max_window_layers);
            tied embeddings (the small sizes) as in Llama

Parameter names are Hugging Face's Qwen2ForCausalLM / Qwen3ForCausalLM, so the sharding plan is
llama.py's and load, convert, reshard and consolidate need nothing of their own.
"""

from __future__ import annotations

import torch

from . import llama
from .llama import DecoderArch, ParallelLlamaForCausalLM, sliding_windows

# The family contract (nxd_models.families.Family).
MODEL_TYPES = ("qwen2", "qwen3")
HANDLE = "causal"
KV_CACHE = True
IGNORED_CHECKPOINT_NAMES = llama.IGNORED_CHECKPOINT_NAMES
adapt_checkpoint = llama.adapt_checkpoint
default_max_seq_len = llama.default_max_seq_len
valid_tp_values = llama.valid_tp_values

_NAMES = {"qwen2": "Qwen2", "qwen3": "Qwen3"}


def check_tp(config, tp: int) -> None:
    llama.check_tp(config, tp, _NAMES[config.model_type])


def arch(config) -> DecoderArch:
    if config.model_type == "qwen2":  # Qwen2Attention: bias=True on q/k/v, False on o_proj
        return DecoderArch(qkv_bias=True, o_bias=False, windows=sliding_windows(config, by_layer_types=True))
    bias = config.attention_bias
    return DecoderArch(qkv_bias=bias, o_bias=bias, qk_norm=True, windows=sliding_windows(config, by_layer_types=True))


def build(config, dtype: torch.dtype = torch.float32, device=None) -> ParallelLlamaForCausalLM:
    return ParallelLlamaForCausalLM(config, dtype=dtype, device=device, arch=arch(config))
