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
    with torch.no_grad():  # HF starts biases at 0 and norms at 1: random ones show their sharding and names matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)
            elif "norm" in name:
                param.normal_(1.0, 0.2)
    model.save_pretrained(directory, max_shard_size="60KB")
    return model


def save_tiny_draft(directory: Path, kind: str):
    return save_tiny(directory, kind, seed=1, **DRAFTS[kind])


# -- checks both test files run on every family ------------------------------------------------

TOL = 1e-4


def ids_for(vocab: int, batch: int = 2, seq: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def left_padded(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 12 and 8 tokens (longer than the fixtures' windows), the second left padded."""
    ids = ids_for(vocab, batch=2, seq=12, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


def assert_logits_match(model, reference) -> None:
    """Plain and left-padded forwards equal Hugging Face's within TOL."""
    ids = ids_for(reference.config.vocab_size)
    padded, mask = left_padded(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(ids).logits
        expected_padded = reference(padded, attention_mask=mask).logits
    logits = model(ids)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < TOL
    real = mask.bool()
    assert (model(padded, attention_mask=mask)[real] - expected_padded[real]).abs().max().item() < TOL


def assert_cached_decoding_matches(model, reference, prefill: int = 4) -> None:
    """Prefill `prefill` tokens into the KV cache, then decode one token at a time: the logits equal
    Hugging Face's full forward (left padding included)."""
    ids, mask = left_padded(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
    steps = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], cache_position=torch.arange(prefill))]
    for t in range(prefill, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache_position=torch.tensor([t])))
    real = mask.bool()
    assert (torch.cat(steps, dim=1)[real] - expected[real]).abs().max().item() < TOL


def assert_generation_matches(target, draft, reference, max_new_tokens: int = 16) -> None:
    """Greedy tokens equal Hugging Face generate's; speculative greedy with a same-family draft equals greedy."""
    ids, mask = left_padded(reference.config.vocab_size)
    with torch.no_grad():
        hf = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    expected = hf[:, ids.shape[1] :]
    greedy = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens)
    got = torch.tensor([row + [0] * (expected.shape[1] - len(row)) for row in greedy.tokens])
    assert torch.equal(got, expected)
    assert all(len(set(row)) > 3 for row in greedy.tokens), "outputs must vary for the comparison to mean something"
    spec = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, draft_model=draft, num_speculative_tokens=3)
    assert spec.tokens == greedy.tokens
    assert sum(spec.stats["accepted_histogram"]) > 0
