"""Tiny BERT configs and batches shared by the BERT tests."""

import torch
from transformers import BertConfig


def tiny_bert_config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
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
