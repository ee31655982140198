"""Load time and peak RSS: from_pretrained_parallel next to Hugging Face from_pretrained, same checkpoint.

    python benchmarks/load.py                      # TinyLlama-1.1B layout, bf16, tp=2
    python benchmarks/load.py --layout 7b --tp 8   # Llama-2-7B layout (needs ~30 GB of disk)
    python benchmarks/load.py --source DIR --tp 8  # an existing HF checkpoint (bf16)

Writes random weights in the layout, then measures, each in a fresh state and
counting the time to touch every weight once (Hugging Face maps safetensors lazily):
  1. HF AutoModelForCausalLM.from_pretrained in a child process (time, peak RSS);
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
from transformers import AutoModelForCausalLM
baseline = rss_bytes()
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained({source!r}, dtype=torch.bfloat16)
touched = sum(float(p.float().sum()) for p in model.parameters())  # weights may be mapped lazily: read them
print(json.dumps({{"seconds": time.perf_counter() - start, "baseline": baseline, "peak": peak_rss_bytes()}}))
"""


def import_model_code():
    import nxd_models.llama  # noqa: F401  (transformers' Llama modules: seconds of imports)


def worker_memory():
    return {"rss": rss_bytes(), "peak": peak_rss_bytes()}


def touch_weights(key):
    """Read every weight once, so lazily mapped data would be counted (ours is already in memory)."""
    from nxd_core.workers import worker_state

    return sum(float(p.detach().float().sum()) for p in worker_state()[key].parameters())


def load_ours(path: Path, tp: int) -> dict:
    from nxd_core.workers import WorkerGroup
    from nxd_models import from_pretrained_parallel

    start = time.perf_counter()
    group = WorkerGroup(tp)
    group.run(import_model_code)  # counted as start-up, as HF's import is not in its load time
    started = time.perf_counter()
    baseline = group.run(worker_memory)
    try:
        model = from_pretrained_parallel(path, tp=tp, dtype=torch.bfloat16, max_seq_len=256, workers=group, progress=False)
        group.run(touch_weights, model._key)
        loaded = time.perf_counter()
        memory = group.run(worker_memory)
        model.close()
    finally:
        group.close()
    return {
        "start": started - start,
        "load": loaded - started,
        "peaks": [m["peak"] for m in memory],
        "growth": [m["peak"] - b["rss"] for m, b in zip(memory, baseline)],
    }


def warm_loads(hf_dir: Path, sharded_dir: Path, tp: int, repeats: int = 3) -> dict:
    """Median load time of each format with the files in the page cache: the format's own cost, not the disk's."""
    import statistics

    from nxd_core.workers import WorkerGroup
    from nxd_models import from_pretrained_parallel

    times = {"hf": [], "sharded": []}
    with WorkerGroup(tp) as group:
        group.run(import_model_code)
        for _ in range(repeats):
            for label, path in (("hf", hf_dir), ("sharded", sharded_dir)):
                start = time.perf_counter()
                model = from_pretrained_parallel(path, tp=tp, dtype=torch.bfloat16, max_seq_len=256, workers=group, progress=False)
                times[label].append(time.perf_counter() - start)
                model.close()
    return {label: statistics.median(values) for label, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="1b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--workdir", help="where to put the checkpoints (default: a temporary directory)")
    parser.add_argument("--source", help="use this HF checkpoint directory instead of generating one")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="nxd-load-bench-", dir=args.workdir))
    try:
        hf_dir, sharded_dir = (Path(args.source) if args.source else work / "hf"), work / f"tp{args.tp}"
        if args.source:
            weights = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
        else:
            weights = write_random_llama(hf_dir, args.layout)
        print(
            f"{args.source or 'layout ' + args.layout}: {weights / GiB:.2f} GiB of bf16 weights; tp={args.tp}; page cache evicted before each load\n"
        )

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

        warm = warm_loads(hf_dir, sharded_dir, args.tp)

        print(f"{'':44s} {'load s':>8s} {'peak RSS per process':>24s}")
        print(f"{'HF from_pretrained (1 process)':44s} {hf['seconds']:8.1f} {hf['peak'] / GiB:20.2f} GiB")
        for label, run in (("from_pretrained_parallel, HF directory", ours), ("from_pretrained_parallel, nxd convert output", sharded)):
            peaks = ", ".join(f"{p / GiB:.2f}" for p in run["peaks"])
            print(f"{label:44s} {run['load']:8.1f} {peaks:>20s} GiB   (+{run['start']:.1f}s worker start-up and imports)")
        growth = ", ".join(f"{g / GiB:.2f}" for g in ours["growth"])
        print(f"\nworker RSS growth while loading from the HF directory: {growth} GiB (shard = {weights / args.tp / GiB:.2f} GiB)")
        print(f"nxd convert to tp={args.tp}: {convert_seconds:.1f}s (once)")
        print(f"warm page cache, median of 3 loads: HF directory {warm['hf']:.2f}s, nxd convert output {warm['sharded']:.2f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
