"""Memory per rank vs tp for parallel BERT and T5: each rank holds about 1/tp of the weights.

    python benchmarks/memory.py                                  # tiny BERT and T5 layouts, tp 1 2 4
    python benchmarks/memory.py --bert base --t5 small --tp 1 2 4 8
    python benchmarks/memory.py --t5 3b --dtype bf16 --tp 4 8 --families t5

Each rank of a worker group builds its shard of a random model in the layout
(on the meta device, then only its own pieces are allocated and filled), and
reports the bytes of its parameters (a tied tensor counted once) and how much
its resident memory grew. Replicated pieces (layer norms, position tables,
BERT's pooler and classifier) keep the fraction a little above 1/tp.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from random_checkpoint import rss_bytes  # noqa: E402

MiB = 1 << 20
BERT_LAYOUTS = {
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=256),
    "base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
T5_LAYOUTS = {
    "tiny": dict(vocab_size=1000, d_model=64, d_kv=8, d_ff=256, num_layers=2, num_heads=8),
    "small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "base": dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "large": dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
    "3b": dict(vocab_size=32128, d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32),
    "flan-xl": dict(
        vocab_size=32128,
        d_model=2048,
        d_kv=64,
        d_ff=5120,
        num_layers=24,
        num_heads=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def config_for(family: str, layout: str):
    if family == "bert":
        from transformers import BertConfig

        return BertConfig(**BERT_LAYOUTS[layout], architectures=["BertForSequenceClassification"])
    from transformers import T5Config

    return T5Config(**T5_LAYOUTS[layout])


def _tied_names(model) -> dict[str, str]:
    """Second names of a shared parameter -> the first name."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.update({name: first[id(p)]} if id(p) in first else {})
        first.setdefault(id(p), name)
    return tied


def shard_memory(family: str, layout: str, dtype) -> dict:
    """In a rank: build this rank's shard with random values; its parameter bytes and RSS growth."""
    from nxd_models.families import lookup

    config = config_for(family, layout)
    module = lookup(config.model_type)
    before = rss_bytes()
    model = module.build(config, dtype=dtype, device="meta")
    tied = _tied_names(model)
    model.to_empty(device="cpu")
    for name, first in tied.items():  # to_empty gives every name its own tensor: tie them again
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    unique = {id(p): p for p in model.parameters()}.values()  # tied weights once
    with torch.no_grad():
        for p in unique:
            p.normal_()  # touch every page
    result = {"param_bytes": sum(p.numel() * p.element_size() for p in unique), "rss_growth": rss_bytes() - before}
    del model
    return result


def full_bytes(family: str, layout: str, dtype) -> int:
    """The whole model's parameter bytes: its tp=1 build on the meta device (no memory, no processes)."""
    from nxd_models.families import lookup

    config = config_for(family, layout)
    model = lookup(config.model_type).build(config, dtype=dtype, device="meta")
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def main(argv=None) -> None:
    from nxd_core.workers import WorkerGroup

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=["bert", "t5"], default=["bert", "t5"])
    parser.add_argument("--bert", choices=sorted(BERT_LAYOUTS), default="tiny", help="BERT layout")
    parser.add_argument("--t5", choices=sorted(T5_LAYOUTS), default="tiny", help="T5 layout")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    rows = []
    for tp in args.tp:
        with WorkerGroup(tp) as group:  # one group per tp serves every family
            for family in args.families:
                ranks = group.run(shard_memory, family, getattr(args, family), dtype)
                rows.append((family, tp, max(r["param_bytes"] for r in ranks), max(r["rss_growth"] for r in ranks)))
    full = {family: full_bytes(family, getattr(args, family), dtype) for family in args.families}
    print(f"{'family':6s} {'layout':8s} {'tp':>3s} {'params/rank MiB':>16s} {'of full':>8s} {'x tp':>6s} {'RSS growth/rank MiB':>20s}")
    for family, tp, per_rank, rss in sorted(rows):
        print(
            f"{family:6s} {getattr(args, family):8s} {tp:3d} {per_rank / MiB:16.2f} {per_rank / full[family]:8.3f} "
            f"{per_rank * tp / full[family]:6.3f} {rss / MiB:20.2f}"
        )


if __name__ == "__main__":
    main()
