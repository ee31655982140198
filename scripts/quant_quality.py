"""What quantization costs in quality: the trained demo-llama's held-out perplexity and greedy top-1
agreement, in its own dtype (bf16) and quantized, through from_pretrained_parallel.

    python scripts/quant_quality.py                 # bf16 and int8, tp=1, 32 windows of 256 tokens
    python scripts/quant_quality.py --tp 2 --windows 64

The validation text is the one scripts/train_demo_models.py held out (the first --val-files stdlib
files in its seeded order), tokenized by the demo model's own tokenizer; its windows are the same
non-overlapping windows that script evaluates on.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from train_demo_models import TARGET_NAME, encode_corpus, read_texts, stdlib_files, val_windows  # noqa: E402

DEMO = Path(__file__).parent.parent / "nxd_models" / "demo_models" / TARGET_NAME


def evaluate(model, windows: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    """(mean next-token loss, greedy predictions [windows, context]) over the windows."""
    losses, predictions = [], []
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        logits = model(chunk[:, :-1]).float()
        losses.append(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item())
        predictions.append(logits.argmax(dim=-1))
    return sum(losses) / windows[:, 1:].numel(), torch.cat(predictions)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--val-files", type=int, default=8, help="as train_demo_models.py held out")
    parser.add_argument("--seed", type=int, default=0, help="as train_demo_models.py ordered the files")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["int8"], help="quantize= values; METHOD+head quantizes the lm_head too")
    args = parser.parse_args(argv)

    from nxd_core.workers import WorkerGroup
    from nxd_models import from_pretrained_parallel

    with WorkerGroup(args.tp) as group:
        load = dict(tp=args.tp, workers=group, max_seq_len=args.context, max_batch_size=args.batch, progress=False)
        with from_pretrained_parallel(DEMO, **load) as model:
            texts = read_texts(stdlib_files(None, args.seed)[: args.val_files])
            windows = val_windows(encode_corpus(model.tokenizer, texts), args.context, args.windows)
            print(
                f"{DEMO.name} ({model.dtype}) at tp={args.tp}: {len(windows)} held-out windows of {args.context} tokens "
                f"from {args.val_files} stdlib files\n"
            )
            base_loss, base_top1 = evaluate(model, windows, args.batch)
        print(f"{'weights':14s} {'perplexity':>11s} {'change':>8s} {'top-1 = ' + str(model.dtype).removeprefix('torch.'):>16s}")
        print(f"{str(model.dtype).removeprefix('torch.'):14s} {math.exp(base_loss):11.3f} {'':>8s} {'':>16s}")
        for method in args.methods:
            head = dict(quantize=method.removesuffix("+head"), quantize_lm_head=method.endswith("+head"))
            with from_pretrained_parallel(DEMO, **head, **load) as quantized:
                loss, top1 = evaluate(quantized, windows, args.batch)
            change = math.exp(loss) / math.exp(base_loss) - 1
            agreement = (top1 == base_top1).float().mean().item()
            print(f"{method:14s} {math.exp(loss):11.3f} {change:+8.2%} {agreement:16.2%}")


if __name__ == "__main__":
    main()
