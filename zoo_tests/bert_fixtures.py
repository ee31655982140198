"""Tiny BERT configs and batches shared by the BERT tests."""

import torch
from transformers import BertConfig


def tiny_bert_config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    values.update(overrides)
    return BertConfig(**values)


def tiny_batch(batch=3, seq=12, vocab=64, seed=0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 4 :] = 0  # a right-padded row
    ids[1, seq - 4 :] = 0
    types = torch.zeros(batch, seq, dtype=torch.long)
    types[:, seq // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


# -- checkpoints written with save_pretrained, for from_pretrained_parallel ------------------------

# Odd vocabulary and intermediate sizes: padded at tp 2 and 4.
ODD_SIZES = dict(vocab_size=61, intermediate_size=62)
HEADS = ("BertForSequenceClassification", "BertForMaskedLM", "BertModel")
WORDS = "the a dog cat sat on mat ran fast slow big small red blue is was and or not very good bad".split()


def save_tiny_bert(directory, head: str = "BertForSequenceClassification", seed: int = 0, **overrides):
    """Save a random tiny BERT with the given head (and a WordPiece tokenizer); return the HF model."""
    import transformers

    torch.manual_seed(seed)
    config = tiny_bert_config(**{**ODD_SIZES, "id2label": {0: "different", 1: "paraphrase"}, **overrides})
    model = getattr(transformers, head)(config).eval()
    model.save_pretrained(directory)
    save_tiny_wordpiece_tokenizer(directory)
    return model


def save_tiny_wordpiece_tokenizer(directory) -> None:
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
