"""Decode-shaped bf16 linears on this CPU: nxd's bf16 kernel on each SIMD path next to ATen's F.linear.

    python benchmarks/bf16_kernel.py                 # 1.1B Llama shapes, one row of x, every path
    python benchmarks/bf16_kernel.py --rows 1 4 8    # speculative verification / small batches
    python benchmarks/bf16_kernel.py --quick         # one small shape, few runs (the test suite)

Each number is the fastest single call among a few hundred (a shared machine's noise only ever
slows a call down). Every call reads a different copy of the weight, enough
copies to overflow the last-level cache, so the weights come from memory as in a real decode step.
GB/s is the weight bytes read per second; the memory read line (generate.memory_bandwidth) is the roofline's
bandwidth, printed next to a copy's (read + write).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import memory_bandwidth  # noqa: E402

from nxd_core import cpu_kernels  # noqa: E402

# (name, N, K) of W [N, K]: the 1.1B layout (TinyLlama) decode step
SHAPES = [
    ("q/o proj", 2048, 2048),
    ("k/v proj", 256, 2048),
    ("gate/up", 5632, 2048),
    ("down", 2048, 5632),
    ("lm_head", 32000, 2048),
]
QUICK_SHAPES = [("small", 512, 1024)]
CACHE_BYTES = 96 << 20  # more than this machine's L3 (copies rotate through at least this much)


def best_seconds(call, copies: int, batches: int, min_calls: int) -> float:
    """The fastest single call over batches x max(min_calls, copies) calls: on a shared machine a
    call the scheduler interrupted only ever takes longer (with 2 threads on 2 busy cores, most
    batches of calls hold one)."""
    calls = max(min_calls, copies)
    for i in range(copies):
        call(i)  # warm-up: first touch
    best = float("inf")
    for _ in range(batches):
        for i in range(calls):
            start = time.perf_counter()
            call(i % copies)
            best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(quick: bool, batches: int) -> float:
    src = torch.empty(16 << 20 if quick else 256 << 20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    return 2 * src.numel() / best_seconds(lambda i: dst.copy_(src), 1, batches, 3) / 1e9  # read + write


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of x (1: one token)")
    parser.add_argument("--batches", type=int, default=7, help="batches of calls; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="one small shape, few batches (a smoke test)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    batches = 2 if args.quick else args.batches
    paths = cpu_kernels.available_paths() if cpu_kernels.prepare() else []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print("kernel paths: " + ", ".join(f"{k}: {v}" for k, v in cpu_kernels.path_support().items()))
    read = memory_bandwidth(16 << 20 if args.quick else 1 << 30, batches)
    print(
        f"default path here: {cpu_kernels.path()}; memory read: {read / 1e9:.1f} GB/s; "
        f"memory copy: {copy_bandwidth(args.quick, batches):.1f} GB/s (read + write)"
    )
    columns = ["ATen F.linear"] + [f"nxd {p}" for p in paths]
    print(f"\nms per call, fastest (GB/s of weights read)\n{'rows  W [N, K]':30}" + "".join(f"{c:>22}" for c in columns))
    for rows in args.rows:
        for name, n, k in shapes:
            copies = 2 if args.quick else max(2, -(-CACHE_BYTES // (n * k * 2)))
            generator = torch.Generator().manual_seed(n * k)
            weights = [(torch.randn(n, k, generator=generator) * 0.02).bfloat16() for _ in range(copies)]
            x = torch.randn(rows, k, generator=generator).bfloat16()
            line = f"{rows:<5} {name + f' [{n}, {k}]':24}"
            with torch.inference_mode():
                for column in columns:
                    if column.startswith("nxd "):
                        cpu_kernels.use_path(column[4:])
                        call = lambda i, x=x, weights=weights: torch.ops.nxd.bf16_linear(x, weights[i])
                    else:
                        call = lambda i, x=x, weights=weights: F.linear(x, weights[i])
                    seconds = best_seconds(call, copies, batches, 20)
                    line += f"{seconds * 1e3:9.3f} ({n * k * 2 / seconds / 1e9:5.1f} GB/s)"
            print(line, flush=True)
    if paths:
        cpu_kernels.use_path(paths[0])
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
