"""Decode-shaped linears on this CPU: the int8 and int4 weight-only kernels next to bf16 (ATen and nxd's kernel).

    python benchmarks/int8_kernel.py                 # 1.1B Llama and 7B shapes, one row of x
    python benchmarks/int8_kernel.py --rows 4        # speculative verification: 4 rows
    python benchmarks/int8_kernel.py --quick         # small shapes, few runs (the test suite)
    python benchmarks/int8_kernel.py --shapes 1.1B --threads 1   # one core: robust on a shared machine

Each number is the best over several batches of calls (a shared machine's noise only ever slows a
batch down) of the mean time per call. Every call reads a different copy of the weight, enough
copies to overflow the last-level cache, so the weights come from memory as in a real decode step.
GB/s is the weight bytes (plus scales) read per second. The kernels' lower SIMD paths run in child
processes (the choice is read once per process): int4 with NXD_INT4_KERNEL=avx512 (where this CPU's
best is avx512bf16) and, with int8's, =avx2. int4 is group-wise (g32, g128: one bf16 scale per 32 or
128 inputs). The prefill table compares the ways int8_kernels could compute many rows without the
kernel (its fallback).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nxd_core import cpu_kernels, int4_kernels, int8_kernels  # noqa: E402
from nxd_core.quantization import quantize_int4, quantize_int8  # noqa: E402

# (name, N, K) of W [N, K]
SHAPES = [
    ("1.1B q/o proj", 2048, 2048),
    ("1.1B gate/up", 5632, 2048),
    ("1.1B down", 2048, 5632),
    ("7B q/o proj", 4096, 4096),
    ("7B gate/up", 11008, 4096),
]
QUICK_SHAPES = [("small", 512, 1024)]
INT4_GROUPS = [32, 128]
CACHE_BYTES = 96 << 20  # more than this machine's L3 (copies rotate through at least this much)


def _best_seconds(call, copies: int, batches: int, min_calls: int) -> float:
    calls = max(min_calls, copies)
    for i in range(copies):
        call(i)  # warm-up: first touch
    best = float("inf")
    for _ in range(batches):
        start = time.perf_counter()
        for i in range(calls):
            call(i % copies)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def _copies(nbytes: int, quick: bool) -> int:
    return 2 if quick else max(2, -(-CACHE_BYTES // nbytes))


def _weights(n: int, k: int, quick: bool):
    """Random bf16 weights and their int8 quantization, in enough copies to overflow the cache."""
    generator = torch.Generator().manual_seed(n * k)
    base = torch.randn(n, k, generator=generator) * 0.02
    q, scale = quantize_int8(base)
    bf16 = [base.bfloat16() for _ in range(_copies(n * k * 2, quick))]
    int8 = [(q.clone(), scale.clone()) for _ in range(_copies(n * k, quick))]
    return bf16, int8


def _int4_weights(n: int, k: int, group: int, quick: bool):
    """The same random weights as _weights, int4 with `group`, in enough copies to overflow the cache."""
    generator = torch.Generator().manual_seed(n * k)
    packed, scale = quantize_int4(torch.randn(n, k, generator=generator) * 0.02, group)
    return [(packed.clone(), scale.clone()) for _ in range(_copies(n * k // 2, quick))]


def _int4_bytes(n: int, k: int, group: int) -> int:
    return n * k // 2 + n * (k // group) * 2


def int8_rows(rows: int, shapes, batches: int, quick: bool, int4_only: bool = False) -> dict:
    """Seconds per call of the int8 and int4 kernels in this process (their ISAs as chosen here), per shape."""
    if not int8_kernels.prepare():
        return {}
    out = {}
    for name, n, k in [] if int4_only else shapes:
        _, int8 = _weights(n, k, quick)
        x = torch.randn(rows, k).bfloat16()
        out[name] = _best_seconds(lambda i, x=x, int8=int8: int8_kernels.int8_linear(x, *int8[i]), len(int8), batches, 20)
    result = {"isa": int8_kernels.isa(), "seconds": out}
    if int4_kernels.prepare():
        int4 = {}
        for group in INT4_GROUPS:
            for name, n, k in shapes:
                w = _int4_weights(n, k, group, quick)
                x = torch.randn(rows, k).bfloat16()
                call = lambda i, x=x, w=w: int4_kernels.int4_linear(x, *w[i])
                int4[f"{group} {name}"] = _best_seconds(call, len(w), batches, 20)
        result.update(int4_isa=int4_kernels.isa(), int4=int4)
    return result


def _child(rows: int, shapes, batches: int, quick: bool, env: dict, int4_only: bool = False) -> dict:
    """int8_rows in a child process with these NXD_*_KERNEL variables (read once per process)."""
    args = [
        sys.executable,
        __file__,
        "--int8-only",
        "--rows",
        str(rows),
        "--batches",
        str(batches),
        "--threads",
        str(torch.get_num_threads()),
    ]
    args += ["--shapes", *[name for name, _, _ in shapes]] + (["--quick"] if quick else []) + (["--int4-only"] if int4_only else [])
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env}, timeout=1200)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _copy_bandwidth(quick: bool, batches: int) -> float:
    src = torch.empty(16 << 20 if quick else 256 << 20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda i: dst.copy_(src), 1, batches, 3)
    return 2 * src.numel() / seconds / 1e9  # read + write


def decode_table(rows: int, shapes, batches: int, quick: bool) -> None:
    have_bf16 = cpu_kernels.prepare()
    have_int8 = int8_kernels.prepare()
    here = int8_rows(rows, shapes, batches, quick) if have_int8 else {}
    # The AVX-512 paths below this CPU's best (int4's fp32 one below BF16, int8's below VNNI), then both at AVX2.
    vnni = here.get("isa") == "avx512vnni"
    lower = (
        _child(rows, shapes, batches, quick, {"NXD_INT4_KERNEL": "avx512", "NXD_INT8_KERNEL": "avx512"}, not vnni)
        if here.get("int4_isa") == "avx512bf16" or vnni
        else {}
    )
    avx2 = (
        _child(rows, shapes, batches, quick, {"NXD_INT8_KERNEL": "avx2", "NXD_INT4_KERNEL": "avx2"})
        if have_int8 and here.get("isa") != "avx2"
        else {}
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, x [{rows}, K] bf16; ms per call (GB/s of weights read); "
        f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    print(f"memory copy of a large buffer: {_copy_bandwidth(quick, batches):.1f} GB/s (read + write)")
    columns = ["ATen bf16 F.linear", "nxd bf16_linear"]
    if here:
        columns.append(f"int8 kernel ({here['isa']})")
    if lower.get("seconds"):
        columns.append(f"int8 kernel ({lower['isa']})")
    if avx2:
        columns.append(f"int8 kernel ({avx2['isa']})")
    columns += ["int8 fallback", "_weight_int8pack_mm"]
    int4_runs = [run for run in (here, lower, avx2) if "int4" in run]
    columns += [f"int4 g{g} ({run['int4_isa']})" for g in INT4_GROUPS for run in int4_runs]
    ratios = ["int8/bf16_linear"] + [f"int4 g{g}/bf16_linear" for g in INT4_GROUPS if int4_runs]
    print(f"{'W [N, K]':28}" + "".join(f"{c:>24}" for c in columns) + "".join(f"{r:>22}" for r in ratios))
    for name, n, k in shapes:
        bf16, int8 = _weights(n, k, quick)
        x = torch.randn(rows, k).bfloat16()
        bf16_bytes, int8_bytes = n * k * 2, n * k + n * 4
        cells = {}
        with torch.inference_mode():
            cells["ATen bf16 F.linear"] = (
                _best_seconds(lambda i, x=x, bf16=bf16: F.linear(x, bf16[i]), len(bf16), batches, 20),
                bf16_bytes,
            )
            if have_bf16:
                cells["nxd bf16_linear"] = (
                    _best_seconds(lambda i, x=x, bf16=bf16: cpu_kernels.linear(x, bf16[i]), len(bf16), batches, 20),
                    bf16_bytes,
                )
            if here:
                cells[f"int8 kernel ({here['isa']})"] = (here["seconds"][name], int8_bytes)
            if lower.get("seconds"):
                cells[f"int8 kernel ({lower['isa']})"] = (lower["seconds"][name], int8_bytes)
            if avx2:
                cells[f"int8 kernel ({avx2['isa']})"] = (avx2["seconds"][name], int8_bytes)
            cells["int8 fallback"] = (
                _best_seconds(lambda i, x=x, int8=int8: int8_kernels._fallback(x, *int8[i]), len(int8), batches, 5),
                int8_bytes,
            )
            try:
                bscale = [s.bfloat16() for _, s in int8]
                pack = lambda i, x=x, int8=int8, bscale=bscale: torch._weight_int8pack_mm(x, int8[i][0], bscale[i])
                cells["_weight_int8pack_mm"] = (_best_seconds(pack, len(int8), batches, 20), int8_bytes)
            except RuntimeError:
                pass
            for g in INT4_GROUPS:
                for run in int4_runs:
                    cells[f"int4 g{g} ({run['int4_isa']})"] = (run["int4"][f"{g} {name}"], _int4_bytes(n, k, g))
        line = f"{name + f' [{n}, {k}]':28}"
        for c in columns:
            if c in cells:
                seconds, nbytes = cells[c]
                line += f"{seconds * 1e3:9.3f} ({nbytes / seconds / 1e9:5.1f} GB/s) "
            else:
                line += f"{'-':>24}"
        # Each kernel at this CPU's own ISA, as a speed-up over nxd's bf16 kernel.
        fast = [cells.get(f"int8 kernel ({here.get('isa')})")]
        fast += [cells.get(f"int4 g{g} ({here.get('int4_isa')})") for g in INT4_GROUPS if int4_runs]
        for f in fast:
            ratio = f"{cells['nxd bf16_linear'][0] / f[0]:.2f}x" if f and "nxd bf16_linear" in cells else "-"
            line += f"{ratio:>22}"
        print(line)


def prefill_table(batches: int, quick: bool) -> None:
    """Many rows (prefill): what int8_kernels' fallback could do, and how far each is from the fp32 sum."""
    n, k = (512, 1024) if quick else (5632, 2048)
    generator = torch.Generator().manual_seed(0)
    q, scale = quantize_int8(torch.randn(n, k, generator=generator))
    ways = {
        "fp32 F.linear, * scale, round once": lambda x: (F.linear(x.float(), q.float()) * scale).bfloat16(),
        "dequantize to bf16, F.linear (the fallback)": lambda x: int8_kernels._fallback(x, q, scale),
        "F.linear on q.bfloat16(), * scale": lambda x: F.linear(x, q.bfloat16()) * scale.bfloat16(),
        "_weight_int8pack_mm (bf16 scale)": lambda x: torch._weight_int8pack_mm(x, q, scale.bfloat16()),
    }
    if int8_kernels.prepare():
        ways[f"int8 kernel ({int8_kernels.isa()})"] = lambda x: torch.ops.nxd.int8_linear(x, q, scale)
    print(f"\nprefill, W [{n}, {k}] int8, x bf16: ms per call; max error against the fp32 sum, in bf16 ulps of the output's largest value")
    row_counts = [32] if quick else [128, 512]
    print(f"{'':46}" + "".join(f"{f'{m} rows':>22}" for m in row_counts))
    for label, way in ways.items():
        line = f"{label:46}"
        for m in row_counts:
            x = torch.randn(m, k, generator=generator).bfloat16()
            exact = x.double() @ (q.double() * scale.double()[:, None]).T
            ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().max())) - 7)
            try:
                with torch.inference_mode():
                    err = (way(x).double() - exact).abs().max() / ulp
                    seconds = _best_seconds(lambda i, way=way, x=x: way(x), 1, batches, 2)
                line += f"{seconds * 1e3:10.2f} ({err:5.2f} ulp)"
            except RuntimeError:
                line += f"{'-':>22}"
        print(line)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help="rows of x (1: one token)")
    parser.add_argument("--batches", type=int, default=7, help="batches of calls; the best is reported")
    parser.add_argument("--quick", action="store_true", help="one small shape, few batches (a smoke test)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--shapes", nargs="+", help="only the shapes whose names start with one of these (e.g. 1.1B)")
    parser.add_argument("--no-prefill", action="store_true", help="leave out the prefill table")
    parser.add_argument("--int8-only", action="store_true", help=argparse.SUPPRESS)  # a child: kernels only (int8 and int4)
    parser.add_argument("--int4-only", action="store_true", help=argparse.SUPPRESS)  # a child: leave int8 out
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [s for s in shapes if any(s[0].startswith(prefix) for prefix in args.shapes)]
    batches = 2 if args.quick else args.batches
    if args.int8_only:
        print(json.dumps(int8_rows(args.rows, shapes, batches, args.quick, args.int4_only)))
        return
    decode_table(args.rows, shapes, batches, args.quick)
    if not args.no_prefill:
        prefill_table(batches, args.quick)


if __name__ == "__main__":
    main()
