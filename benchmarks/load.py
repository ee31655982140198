"""Load time and peak RSS: from_pretrained_parallel next to Hugging Face from_pretrained, same checkpoint.

    python benchmarks/load.py                      # TinyLlama-1.1B layout, bf16, tp=2
    python benchmarks/load.py --layout 7b --tp 8   # Llama-2-7B layout (needs ~30 GB of disk)

Writes random weights in the layout, then measures, each in a fresh state:
  1. HF LlamaForCausalLM.from_pretrained in a child process (time, peak RSS);
  2. from_pretrained_parallel from the HF directory (worker start-up, load, peak RSS of every worker);
  3. `nxd convert` to a sharded checkpoint, then from_pretrained_parallel from it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from random_checkpoint import LAYOUTS, evict_from_page_cache, peak_rss_bytes, rss_bytes, write_random_llama  # noqa: E402

GiB = 1 << 30

HF_CHILD = """
import json, sys, time, torch
sys.path.insert(0, {bench!r})
from random_checkpoint import peak_rss_bytes, rss_bytes
from transformers import LlamaForCausalLM
baseline = rss_bytes()
start = time.perf_counter()
model = LlamaForCausalLM.from_pretrained({source!r}, dtype=torch.bfloat16)
print(json.dumps({{"seconds": time.perf_counter() - start, "baseline": baseline, "peak": peak_rss_bytes()}}))
"""


def worker_memory():
    return {"rss": rss_bytes(), "peak": peak_rss_bytes()}


def load_ours(path: Path, tp: int) -> dict:
    from nxd_core.workers import WorkerGroup
    from nxd_models import from_pretrained_parallel

    start = time.perf_counter()
    group = WorkerGroup(tp)
    started = time.perf_counter()
    baseline = group.run(worker_memory)
    try:
        model = from_pretrained_parallel(path, tp=tp, dtype=torch.bfloat16, max_seq_len=256, workers=group, progress=False)
        loaded = time.perf_counter()
        memory = group.run(worker_memory)
        model.close()
    finally:
        group.close()
    return {
        "start": started - start, "load": loaded - started,
        "peaks": [m["peak"] for m in memory], "growth": [m["peak"] - b["rss"] for m, b in zip(memory, baseline)],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="1b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--workdir", help="where to put the checkpoints (default: a temporary directory)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="nxd-load-bench-", dir=args.workdir))
    try:
        hf_dir, sharded_dir = work / "hf", work / f"tp{args.tp}"
        weights = write_random_llama(hf_dir, args.layout)
        print(f"layout {args.layout}: {weights / GiB:.2f} GiB of bf16 weights; tp={args.tp}; page cache evicted before each load\n")

        evict_from_page_cache(hf_dir)
        code = HF_CHILD.format(bench=str(Path(__file__).parent), source=str(hf_dir))
        hf = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()[-1])

        evict_from_page_cache(hf_dir)
        ours = load_ours(hf_dir, args.tp)

        from nxd_models.convert import convert

        start = time.perf_counter()
        convert(hf_dir, sharded_dir, tp=args.tp, progress=False)
        convert_seconds = time.perf_counter() - start
        evict_from_page_cache(sharded_dir)
        sharded = load_ours(sharded_dir, args.tp)

        print(f"{'':44s} {'load s':>8s} {'peak RSS per process':>24s}")
        print(f"{'HF from_pretrained (1 process)':44s} {hf['seconds']:8.1f} {hf['peak'] / GiB:20.2f} GiB")
        for label, run in (("from_pretrained_parallel, HF directory", ours), ("from_pretrained_parallel, nxd convert output", sharded)):
            peaks = ", ".join(f"{p / GiB:.2f}" for p in run["peaks"])
            print(f"{label:44s} {run['load']:8.1f} {peaks:>20s} GiB   (+{run['start']:.1f}s worker start-up)")
        growth = ", ".join(f"{g / GiB:.2f}" for g in ours["growth"])
        print(f"\nworker RSS growth while loading from the HF directory: {growth} GiB (shard = {weights / args.tp / GiB:.2f} GiB)")
        print(f"nxd convert to tp={args.tp}: {convert_seconds:.1f}s (once)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
