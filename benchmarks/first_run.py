"""What a user waits for the first time: a generation's wall time, eager only, with the old policy
(compile from the start for 64 tokens or more) and with the new one (start eagerly, switch to
compiled steps where it pays), with the compile cache cold (an empty cache folder) and warm.

    python benchmarks/first_run.py                              # demo model and 20M layout, tp 1 and 2
    python benchmarks/first_run.py --models demo --tp 2 --lengths 96 1024
    python benchmarks/first_run.py --quick                      # the smoke test's tiny setting

Each number is one `generate` call (eager and the new policy: best of --repeats) in a fresh worker group (a new process is what pays the compile;
worker start-up and loading are the same for every policy and are left out), a 4-token prompt,
eos ignored so that every run makes all its tokens. A cold run gets an empty NXD_CACHE_DIR (torch's
inductor cache inside it, so its compiler probes run again too); a warm run gets a folder where the step
was compiled once before (by a compile=True run per model and tp, whose compile time is printed).
Single runs on a shared machine: compare within a row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from random_checkpoint import write_random_llama  # noqa: E402

PROMPT = [[1, 5, 9, 14]]  # token ids: the random layout has no tokenizer
# name -> (zoo name, or None for the random 20M layout; the KV cache's length)
MODELS = {"demo": ("demo-llama", 1100), "20m": (None, 1100)}


def one_generation(model_path: str, tp: int, max_seq_len: int, tokens: int, compile, cache: Path) -> tuple[float, dict]:
    """(seconds of one generate call in a fresh worker group, its stats) with the compile cache in `cache`."""
    from nxd_models import from_pretrained_parallel

    os.environ["NXD_CACHE_DIR"] = str(cache)  # the workers read it when they start
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)  # so theirs goes inside it
    with from_pretrained_parallel(model_path, tp=tp, max_seq_len=max_seq_len, progress=False) as model:
        began = time.perf_counter()
        result = model.generate(PROMPT, max_new_tokens=tokens, eos_token_id=[], compile=compile)
        return time.perf_counter() - began, result.stats


def row(model_path: str, tp: int, max_seq_len: int, tokens: int, workdir: Path, warm: Path, repeats: int) -> dict:
    """Eager, old policy and new policy, each with a cold cache (a fresh folder) and a warm one (`warm`).
    Eager and the new policy are the best of `repeats` runs; the old policy's cold compile runs once."""
    old = tokens >= 64  # the old policy: compile=None meant compile from the start at 64 tokens or more
    times: dict = {}
    for _ in range(repeats):
        for policy, compile, state in (("eager", False, ""), ("new", None, "cold"), ("new", None, "warm")):
            name = f"{policy} {state}".strip()
            cache = Path(tempfile.mkdtemp(prefix=f"{policy}-", dir=workdir)) if state == "cold" else warm
            seconds, stats = one_generation(model_path, tp, max_seq_len, tokens, compile, cache)
            if seconds < times.get(name, float("inf")):
                times[name], times[f"{name} how"] = seconds, _how(stats)
    for state in ("cold", "warm"):
        cache = Path(tempfile.mkdtemp(prefix="old-", dir=workdir)) if state == "cold" else warm
        times[f"old {state}"], stats = one_generation(model_path, tp, max_seq_len, tokens, old, cache)
        times[f"old {state} how"] = _how(stats)
    return times


def fill(model_path: str, tp: int, max_seq_len: int, cache: Path) -> str:
    """Compile the decode step once into `cache` (what "warm" means: this machine has compiled it before)."""
    _, stats = one_generation(model_path, tp, max_seq_len, 8, True, cache)
    return f"{stats['compile_seconds']:.2f}s, {stats['compile_cpu_seconds']:.2f}s CPU ({_cache(stats)})"


def _how(stats: dict) -> str:
    if "compiled_from_token" not in stats:
        return "eager"
    return (
        f"compiled from token {stats['compiled_from_token']} ({_cache(stats)}, {stats['compile_seconds']:.2f}s, "
        f"{stats['compile_cpu_seconds']:.2f}s CPU)"
    )


def _cache(stats: dict) -> str:
    return stats["compile_cache"] + (", precompiled" if stats.get("compile_precompiled") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["demo", "20m"])
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--lengths", nargs="+", type=int, default=[16, 64, 256, 1024])
    parser.add_argument("--workdir", type=Path, default=None, help="where the random checkpoint and the caches go")
    parser.add_argument("--repeats", type=int, default=3, help="eager and the new policy: the best of this many runs")
    parser.add_argument("--quick", action="store_true", help="the demo model at tp=1, 8 and 64 tokens (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.models, args.tp, args.lengths, args.repeats = ["demo"], [1], [8, 64], 1
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        print(f"load average {os.getloadavg()[0]:.1f}; seconds of one generate call (start-up and loading left out)")
        header = f"{'model':5} {'tp':>2} {'tokens':>6} {'eager':>7} {'old cold':>9} {'old warm':>9} {'new cold':>9} {'new warm':>9}  new/eager (cold, warm)"
        print(header)
        for name in args.models:
            path, max_seq_len = MODELS[name]
            if path is None:
                path = str(workdir / name)
                write_random_llama(Path(path), "20m", seed=0)
            for tp in args.tp:
                warm = Path(tempfile.mkdtemp(prefix="warm-", dir=workdir))
                print(f"{name} tp={tp}: compiling the step once into the warm cache took {fill(path, tp, max_seq_len, warm)}")
                for tokens in args.lengths:
                    t = row(path, tp, max_seq_len, tokens, workdir, warm, args.repeats)
                    ratios = f"{t['new cold'] / t['eager']:.2f}x, {t['new warm'] / t['eager']:.2f}x"
                    print(
                        f"{name:5} {tp:>2} {tokens:>6} {t['eager']:7.2f} {t['old cold']:9.2f} {t['old warm']:9.2f} "
                        f"{t['new cold']:9.2f} {t['new warm']:9.2f}  {ratios}   new: {t['new cold how']}; {t['new warm how']}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
