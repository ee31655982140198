"""Tiny Qwen2, Qwen3, Mistral, Mixtral and Qwen3-MoE checkpoints written with save_pretrained.

Sizes are odd on purpose: vocabularies and MLP/expert widths that tp 4 does not divide (padded),
fewer KV heads than tp 4 (replicated), Qwen3's head_dim unequal to hidden_size / heads, windows
shorter than the prompts, more experts than a short batch selects.
"""

from pathlib import Path

import torch
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

_COMMON = dict(max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.2, num_hidden_layers=2)

# kind -> (HF class, config class, config)
CONFIGS = {
    # q/k/v biases, 2 KV heads (tp 4 replicates), odd vocabulary and MLP width, tied embeddings
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config,
        dict(vocab_size=101, hidden_size=64, intermediate_size=100, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    # layer 0 full attention, layer 1 a window of 4 (max_window_layers=1)
    "qwen2-window": (
        Qwen2ForCausalLM,
        Qwen2Config,
        dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=4,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
    ),
    # head_dim 16 != 48 / 4, q/k norms, attention biases on q/k/v/o
    "qwen3": (
        Qwen3ForCausalLM,
        Qwen3Config,
        dict(
            vocab_size=127,
            hidden_size=48,
            intermediate_size=80,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            attention_bias=True,
        ),
    ),
    # a window of 5, shorter than the prompts
    "mistral": (
        MistralForCausalLM,
        MistralConfig,
        dict(vocab_size=128, hidden_size=64, intermediate_size=90, num_attention_heads=8, num_key_value_heads=2, sliding_window=5),
    ),
    # 8 experts, top 2, expert width 30 (padded at tp 4), a window of 6
    "mixtral": (
        MixtralForCausalLM,
        MixtralConfig,
        dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=30,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=6,
        ),
    ),
    # layers 0 dense (mlp_only_layers), 1 and 2 sparse: 12 experts, top 3, renormalised
    "qwen3-moe": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig,
        dict(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=72,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            moe_intermediate_size=22,
            num_experts=12,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            num_hidden_layers=3,
        ),
    ),
    # decoder_sparse_step 2: layers 1 and 3 sparse, 0 and 2 dense; no renormalisation
    "qwen3-moe-step2": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig,
        dict(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=40,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            moe_intermediate_size=16,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            num_hidden_layers=4,
        ),
    ),
}

# Smaller same-family drafts for speculative decoding (same vocabulary).
DRAFTS = {
    "qwen2": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40),
    "qwen3": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40),
    "mistral": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40),
    "mixtral": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4),
    "qwen3-moe": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts=4),
}


def tiny_config(kind: str, **overrides):
    _, config_class, fields = CONFIGS[kind]
    if config_class in (MixtralConfig, Qwen3MoeConfig):
        # HF's eager loop over experts: the default grouped_mm needs 16-byte strides that tiny widths lack.
        overrides = {"experts_implementation": "eager", **overrides}
    return config_class(**{**_COMMON, **fields, **overrides})


def save_tiny(directory: Path, kind: str, seed: int = 0, **overrides):
    """Save a random tiny model of this kind (several safetensors files with an index); return the HF model."""
    torch.manual_seed(seed)
    model = CONFIGS[kind][0](tiny_config(kind, **overrides)).eval()
    model.save_pretrained(directory, max_shard_size="60KB")
    return model


def save_tiny_draft(directory: Path, kind: str):
    return save_tiny(directory, kind, seed=1, **DRAFTS[kind])
