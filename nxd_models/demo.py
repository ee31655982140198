"""`make demo`: a tiny BERT with the NxD guide's parallel self-attention, run at tp=2 on a
worker group, against the same unsharded model in this process.

    python -m nxd_models.demo [--tp 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from nxd_core.checkpoint import load
from nxd_core.workers import WorkerGroup
from nxd_models.bert import parallelize_self_attention


def _tiny_config() -> BertConfig:
    return BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=8, intermediate_size=512,
        max_position_embeddings=128, num_labels=2,
    )


def parallel_logits(config, checkpoint, input_ids, attention_mask):
    model = parallelize_self_attention(BertForSequenceClassification(config))
    load(checkpoint, model, sharded=False)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args(argv)

    config = _tiny_config()
    torch.manual_seed(0)
    reference = BertForSequenceClassification(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (4, 64))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1:, 48:] = 0
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "bert.pt")
        torch.save({"model": reference.state_dict()}, checkpoint)
        start = time.perf_counter()
        with WorkerGroup(args.tp) as group:
            print(f"started {group}")
            logits = group.run(parallel_logits, config, checkpoint, input_ids, attention_mask)[0]
        elapsed = time.perf_counter() - start

    params = sum(p.numel() for p in reference.parameters())
    error = (logits - expected).abs().max().item()
    print(f"tiny BERT ({params / 1e6:.2f}M parameters), tp={args.tp}, {elapsed:.1f}s including worker start-up")
    print(f"max |parallel - unsharded| logit difference: {error:.2e}")
    print(f"argmax agrees on {int((logits.argmax(-1) == expected.argmax(-1)).sum())}/{len(expected)} rows")
    if error > 1e-4:
        raise SystemExit("parallel and unsharded logits disagree")


if __name__ == "__main__":
    main()
