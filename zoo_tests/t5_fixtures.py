"""Tiny T5 checkpoints written with save_pretrained (the real on-disk layout), v1.0 and v1.1 style."""

from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

BASE = dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    d_ff=50,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
# d_ff=50 is padded at tp 4. initializer_factor and seed are picked so that greedy outputs vary
# (at 1.0 tiny T5s decode into one repeated token) and beam search differs from greedy.
CONFIGS = {
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True, initializer_factor=5.0),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, initializer_factor=2.0),
}
SEEDS = {"v1.0": 1, "v1.1": 0}


def tiny_t5_config(kind: str = "v1.0", **overrides) -> T5Config:
    return T5Config(**{**BASE, **CONFIGS[kind], **overrides})


def save_tiny_t5(directory: Path, kind: str = "v1.0", seed: int | None = None, **overrides) -> T5ForConditionalGeneration:
    """Save a random tiny T5 (several safetensors files and an index); return the HF model.

    v1.1 gets its own lm_head, as the Flan-T5 checkpoints have (transformers 5 ties it by default)."""
    torch.manual_seed(SEEDS[kind] if seed is None else seed)
    model = T5ForConditionalGeneration(tiny_t5_config(kind, **overrides)).eval()
    if kind == "v1.1":
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(directory, max_shard_size="100KB")
    return model


def save_tiny_t5_tokenizer(directory: Path, vocab_size: int = 96) -> None:
    """A sentencepiece unigram model trained on the Python standard library's own source (offline), saved
    with T5Tokenizer's files beside spiece.model (pad 0, eos 1, unk 2, no extra ids)."""
    import inspect
    import os

    import sentencepiece as spm
    from transformers import T5Tokenizer

    lines = [line for line in inspect.getsource(os).splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(directory / "spiece"),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (directory / "spiece.vocab").unlink()
    model = spm.SentencePieceProcessor(model_file=str(directory / "spiece.model"))
    vocab = [(model.id_to_piece(i), model.get_score(i)) for i in range(model.get_piece_size())]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(directory)


def padded_batch():
    """(input_ids, attention_mask): three sources of lengths 9, 6 and 4, right padded with 0, ending in eos."""
    ids = torch.randint(3, 96, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    for row, length in enumerate((9, 6, 4)):
        ids[row, length - 1] = 1
    return ids, mask
