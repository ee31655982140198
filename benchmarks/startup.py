"""Where a short `nxd generate` spends its wall time, from the shell to exit.

    python benchmarks/startup.py                  # best of 3 of each line
    python benchmarks/startup.py --repeats 5 --tree /path/to/another/checkout   # compare with another tree

Each line is a fresh process, timed from the shell's side, best of --repeats runs (a shared
machine's noise only ever adds time). The parts overlap in the real command (workers import while
the front end does; docs/startup.md), so they do not add up to the whole.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

COMMAND = ["generate", "demo-llama", "--tp", "2", "--max-new-tokens", "16", "--prompt", "import os"]

PARTS = [
    ("python starts and exits", "pass"),
    ("import torch", "import torch"),
    ("import transformers", "import transformers"),
    ("the front end's imports (nxd_models.cli + loading)", "import nxd_models.cli, nxd_models.loading"),
    (
        "a worker's imports (torch + the model code it preloads)",
        "import nxd_core.worker_process, nxd_models.worker_ops, nxd_models.generation.worker.decoding",
    ),
    (
        "start and close 2 workers (incl. importing nxd_core.workers)",
        "from nxd_core.workers import WorkerGroup\nwith WorkerGroup(2): pass",
    ),
    (
        "load demo-llama at tp=2 and close (incl. imports)",
        "from nxd_models import from_pretrained_parallel\nwith from_pretrained_parallel('demo-llama', tp=2, progress=False): pass",
    ),
]


def best_wall(argv: list[str], env: dict, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        done = subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True)
        seconds = time.perf_counter() - began
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:4])} ... failed:\n{done.stderr[-2000:]}")
        best = min(best, seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree", type=Path, default=None, help="another checkout to time beside this one (PYTHONPATH)")
    args = parser.parse_args()
    trees = [("this tree", Path(__file__).resolve().parents[1])]
    if args.tree:
        trees.append((str(args.tree), args.tree.resolve()))
    print(f"load average {os.getloadavg()[0]:.1f}; seconds, best of {args.repeats}, each a fresh process")
    print(f"{'':58}" + "".join(f"{name[-18:]:>20}" for name, _ in trees))
    rows = [(label, [sys.executable, "-c", code]) for label, code in PARTS]
    rows.append(("nxd " + " ".join(COMMAND[:6]) + " (shell to exit)", [sys.executable, "-m", "nxd_models.cli", *COMMAND]))
    for label, argv in rows:
        cells = []
        for _, tree in trees:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            cells.append(best_wall(argv, env, args.repeats))
        print(f"{label:58}" + "".join(f"{c:20.2f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
