"""Decode speed with the weights in huge pages and in 4 KB pages: the same model loaded both ways
into the same workers, generations alternating, in one run.

    python benchmarks/huge_pages.py                    # 1.1B layout, bf16, tp=1, compiled steps
    python benchmarks/huge_pages.py --quantize int8    # int8 weights
    python benchmarks/huge_pages.py --layout 20m --tp 2

Both copies run in the same processes at the same moments, one generation each in turn, so a
shared machine's slow and fast spells fall on both alike; each side reports its best and its median
over --repeats generations. nxd_core/huge_pages.py says why the pages matter.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_checkpoint import LAYOUTS, write_random_llama  # noqa: E402

from nxd_core import huge_pages  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="1b")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--quantize", choices=["int8", "int4-g128"], default=None)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=6, help="generations per side, alternating")
    parser.add_argument("--eager", action="store_true", help="eager steps instead of compiled")
    parser.add_argument("--workdir", help="where to put the checkpoint (default: a temporary directory)")
    args = parser.parse_args(argv)
    if not huge_pages.available():
        sys.exit("this OS gives no transparent huge pages (not Linux, or THP 'never'): nothing to compare")

    from nxd_core.workers import WorkerGroup
    from nxd_models import from_pretrained_parallel

    work = Path(tempfile.mkdtemp(prefix="nxd-huge-pages-bench-", dir=args.workdir))
    try:
        write_random_llama(work / "model", args.layout)
        vocab = LAYOUTS[args.layout]["vocab_size"]
        prompt = torch.randint(3, vocab, (1, 32), generator=torch.Generator().manual_seed(0))
        threads = max(1, (os.cpu_count() or 1) // args.tp)
        load = dict(tp=args.tp, dtype=torch.bfloat16, max_seq_len=32 + args.new_tokens, progress=False, quantize=args.quantize)
        with WorkerGroup(args.tp, threads_per_worker=threads) as group:
            models = {}
            for label, on in (("4 KB pages", False), ("huge pages", True)):
                group.run(huge_pages.set_enabled, on)
                models[label] = from_pretrained_parallel(work / "model", workers=group, **load)
            rates = {label: [] for label in models}
            run = dict(input_ids=prompt, max_new_tokens=args.new_tokens, eos_token_id=[], compile=not args.eager)
            for model in models.values():
                model.generate(**run)  # warm-up: compiles once (both share the step)
            for i in range(args.repeats):
                for label in list(models) if i % 2 else reversed(list(models)):
                    rates[label].append(models[label].generate(**run).stats["decode_tokens_per_second"])
        what = f"{args.layout}, tp={args.tp}, {args.quantize or 'bf16'}, {'eager' if args.eager else 'compiled'}"
        print(f"decode tokens/s ({what}), {args.repeats} alternating generations of {args.new_tokens} tokens each")
        base = next(iter(rates.values()))  # 4 KB pages
        for label, values in rates.items():
            ratio = f"{max(values) / max(base):.2f}x / {statistics.median(values) / statistics.median(base):.2f}x"
            print(f"{label:12s} best {max(values):7.1f}  median {statistics.median(values):7.1f}  {ratio} (best / median vs 4 KB pages)")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
