"""Tiny Llama checkpoints written with save_pretrained (the real on-disk layout)."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=128,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
)

CONFIGS = {
    "mha": {},
    "gqa": {"num_key_value_heads": 4},  # tp 2 splits KV heads, tp 8 replicates them
    "gqa-replicated": {"num_key_value_heads": 2},
    "mqa": {"num_key_value_heads": 1},
    "odd-vocab": {"vocab_size": 101, "intermediate_size": 100},  # padded at every tp > 1
    "tied": {"tie_word_embeddings": True},
    "rope-linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    "rope-llama3": {
        "rope_parameters": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 500000.0,
        }
    },
}


def tiny_llama_config(kind: str = "gqa", **overrides) -> LlamaConfig:
    return LlamaConfig(**{**BASE, **CONFIGS[kind], **overrides})


def save_tiny_llama(directory: Path, kind: str = "gqa", seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Save a random tiny Llama (split into several safetensors files with an index); return the HF model."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(kind, **overrides)).eval()
    model.save_pretrained(directory, max_shard_size="60KB")
    return model


def save_tiny_tokenizer(directory: Path, vocab_size: int = 128) -> None:
    """A sentencepiece BPE tokenizer trained on the Python standard library's own source (offline),
    saved as a Llama checkpoint ships it: tokenizer.model + tokenizer_config.json."""
    import inspect
    import json
    import os

    import sentencepiece as spm

    lines = [line for line in inspect.getsource(os).splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (directory / "tokenizer.vocab").unlink()
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def left_padded_batch():
    """(input_ids, attention_mask): three prompts of lengths 8, 5 and 3, left padded with 0."""
    ids = torch.randint(3, 128, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def save_tiny_llama_pair(root: Path) -> tuple[Path, Path]:
    """A tiny random target and a smaller draft with the same vocabulary and tokenizer (speculative decoding)."""
    save_tiny_llama(root / "target", "gqa", initializer_range=0.2)
    save_tiny_llama(
        root / "draft",
        "gqa",
        seed=1,
        initializer_range=0.2,
        num_hidden_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    for model in ("target", "draft"):
        save_tiny_tokenizer(root / model)
    return root / "target", root / "draft"
