"""Peak memory and throughput of `nxd convert` on a Llama-2-7B-layout checkpoint.

    python benchmarks/convert_memory.py                 # 7B layout (~13.5 GB bf16) to tp=8; needs ~30 GB of disk
    python benchmarks/convert_memory.py --layout small  # ~0.3 GB, for a quick check
    python benchmarks/convert_memory.py --source DIR    # an existing HF checkpoint (a real download, or --keep's)

Generates random bf16 weights in the layout (HF shards with an index), measures
the disk's sequential read bandwidth on those files with the page cache
evicted (before and after, as it drifts; the better one is the reference),
and converts them to tp=N in a child process that reports its baseline and
peak RSS. Prints both numbers and the ratio.
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

sys.path.insert(0, str(Path(__file__).parent))
from random_checkpoint import LAYOUTS, evict_from_page_cache, write_random_llama  # noqa: E402

GiB = 1 << 30


def read_bandwidth(directory: Path, block: int = 64 << 20) -> float:
    """Bytes per second of a plain sequential read of every weights file, page cache evicted first."""
    evict_from_page_cache(directory)
    buffer = bytearray(block)
    total, start = 0, time.perf_counter()
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / (time.perf_counter() - start)


CHILD = """
import json, sys, time
sys.path.insert(0, {bench!r})
from random_checkpoint import peak_rss_bytes, rss_bytes
from nxd_models.convert import convert
import nxd_models.llama, transformers.models.llama.configuration_llama  # imports are not conversion
baseline = rss_bytes()
start = time.perf_counter()
convert({source!r}, {out!r}, tp={tp}, progress=False)
elapsed = time.perf_counter() - start
print(json.dumps({{"baseline": baseline, "peak": peak_rss_bytes(), "seconds": elapsed}}))
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="7b")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--workdir", help="where to put the checkpoints (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--source", help="convert this HF checkpoint directory instead of generating one")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="nxd-convert-bench-", dir=args.workdir))
    source, out = (Path(args.source) if args.source else work / "hf"), work / f"tp{args.tp}"
    try:
        if args.source:
            weights = sum(p.stat().st_size for p in source.glob("*.safetensors"))
            print(f"source {source}: {weights / GiB:.2f} GiB")
        else:
            start = time.perf_counter()
            weights = write_random_llama(source, args.layout)
            print(f"layout {args.layout}: {weights / GiB:.2f} GiB of bf16 weights generated in {time.perf_counter() - start:.0f}s")
        before = read_bandwidth(source)

        evict_from_page_cache(source)
        code = CHILD.format(bench=str(Path(__file__).parent), source=str(source), out=str(out), tp=args.tp)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        after = read_bandwidth(source)
        # This disk's bandwidth drifts between runs: compare against the better of two measurements.
        bandwidth = max(before, after)
        print(f"disk sequential read (page cache evicted): {before / GiB:.2f} GiB/s before, {after / GiB:.2f} GiB/s after")
        throughput = weights / report["seconds"]
        growth = report["peak"] - report["baseline"]
        print(
            f"convert to tp={args.tp}: {report['seconds']:.1f}s, {throughput / GiB:.2f} GiB/s "
            f"= {throughput / bandwidth:.0%} of the disk's read bandwidth"
        )
        print(
            f"convert process RSS: baseline {report['baseline'] / GiB:.2f} GiB, peak {report['peak'] / GiB:.2f} GiB, "
            f"growth {growth / GiB:.2f} GiB (target < 2 GiB)"
        )
        written = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
        print(f"wrote {written / GiB:.2f} GiB in {args.tp} shard files")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
