"""All-reduce and all-gather latency over a TP group on this host: shared memory (ours) next to gloo.

    python benchmarks/collectives.py                  # tp 2 and 4, 1 KB .. 4 MB, fp32
    python benchmarks/collectives.py --tp 2 --dtype bfloat16

Both paths run in the same worker processes on the same tensors, one after the other: "ours" is
what the mappings call (mappings.all_reduce_tensor_model_parallel, shared memory when the group
has it), "gloo" is torch.distributed's all_reduce / all_gather_into_tensor on the same group.
Each number is microseconds per call, the best of several batches of calls (a shared machine's
noise only ever slows a batch down). Sizes are the bytes of each rank's tensor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = [1 << 10, 8 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
BATCHES = 5


def _calls_for(nbytes: int, max_calls: int) -> int:
    return max(1, min(max_calls, (64 << 20) // max(nbytes, 1) // 8))


def _time_per_call(call, calls: int) -> float:
    """Best over BATCHES of the mean seconds per call; every rank starts each batch together."""
    import torch.distributed as dist

    from nxd_core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    for _ in range(3):
        call()  # warm-up: first touch of the buffers
    best = float("inf")
    for _ in range(BATCHES):
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def _gloo_all_gather(out, x, group):
    import torch.distributed as dist

    # all_gather_into_tensor was renamed all_gather_single in recent torch.
    return getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, x, group=group)


def measure(sizes: list[int], dtype_name: str, max_calls: int = 2000) -> list[dict]:
    """In each worker: per size, microseconds per all-reduce and all-gather, ours and gloo."""
    import torch

    return [_time_one_size(nbytes, getattr(torch, dtype_name), max_calls) for nbytes in sizes]


def _time_one_size(nbytes: int, dtype, max_calls: int) -> dict:
    import torch
    import torch.distributed as dist

    from nxd_core import parallel_state as ps
    from nxd_core.mappings import all_gather_tensor_model_parallel, all_reduce_tensor_model_parallel

    group = ps.get_tensor_model_parallel_group()
    x = torch.randn(max(1, nbytes // dtype.itemsize)).to(dtype)
    gathered = torch.empty(ps.get_tensor_model_parallel_size() * x.numel(), dtype=dtype)
    calls = _calls_for(nbytes, max_calls)
    return {
        "bytes": nbytes,
        "collectives": ps.tp_collectives(),
        "all_reduce_ours": _time_per_call(lambda: all_reduce_tensor_model_parallel(x), calls),
        "all_reduce_gloo": _time_per_call(lambda: dist.all_reduce(x.clone(), group=group), calls),
        "all_gather_ours": _time_per_call(lambda: all_gather_tensor_model_parallel(x), calls),
        "all_gather_gloo": _time_per_call(lambda: _gloo_all_gather(gathered, x, group=group), calls),
    }


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-bytes", type=int, default=SIZES[-1], help="largest size to time (default 4 MB)")
    parser.add_argument("--max-calls", type=int, default=2000, help="calls per batch for the smallest sizes (fewer: quicker, noisier)")
    args = parser.parse_args(argv)
    sizes = [n for n in SIZES if n <= args.max_bytes]

    from nxd_core.workers import WorkerGroup

    print(
        f"{os.cpu_count()} cores; {args.dtype}; microseconds per call, best of {BATCHES} batches; "
        "gloo is torch.distributed on the same group\n"
    )
    header = f"{'tp':>3s} {'size':>7s} | {'all-reduce ours':>15s} {'gloo':>9s} {'ratio':>6s} | {'all-gather ours':>15s} {'gloo':>9s} {'ratio':>6s}"
    print(header)
    print("-" * len(header))
    for tp in args.tp:
        with WorkerGroup(tp, threads_per_worker=1) as group:
            rows = group.run(measure, sizes, args.dtype, args.max_calls)
        for i, nbytes in enumerate(sizes):
            # A collective ends when its slowest rank does: report the slowest rank's time.
            worst = {key: max(r[i][key] for r in rows) * 1e6 for key in rows[0][i] if key.startswith("all_")}
            path = rows[0][i]["collectives"]
            ours = "" if path == "shm" else f" ({path})"
            print(
                f"{tp:3d} {_size(nbytes):>7s} | {worst['all_reduce_ours']:12.1f}{ours:>3s} {worst['all_reduce_gloo']:9.1f} "
                f"{worst['all_reduce_ours'] / worst['all_reduce_gloo']:5.2f}x | {worst['all_gather_ours']:15.1f} "
                f"{worst['all_gather_gloo']:9.1f} {worst['all_gather_ours'] / worst['all_gather_gloo']:5.2f}x"
            )


if __name__ == "__main__":
    main()
