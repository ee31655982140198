"""Decode attention: the C++ kernel (nxd_core/attention_kernel.py) next to the Python path it replaces.

    python benchmarks/attention.py                      # per call, then decoding: demo-llama and the 20M layout
    python benchmarks/attention.py --layouts 1b         # decoding on the 1.1B layout (a 2.2 GB checkpoint)
    python benchmarks/attention.py --calls-only

Per call: one layer's attention for a decode step (1 query) and a verification (5 queries), with
TinyLlama's heads (32 over 4 KV heads, head size 64), over caches of 1024 and 4096 slots filled to
128 or to the end; the Python path compiled as the models run it (torch.compile), the kernel called
as the compiled step calls it. Decoding: compiled greedy generation through `generate` (decode
tokens/s, prefill left out), the kernel switched on and off in the same workers, runs alternating
(best of --repeats each: a shared machine's noise only slows a run down).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import DEMO_PROMPT  # noqa: E402
from random_checkpoint import LAYOUTS, write_random_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nxd_core import attention_kernel  # noqa: E402
from nxd_models.llama import attention_mask_for, few_query_attention  # noqa: E402


def best_seconds(fn, calls: int, repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def per_call(dtype: torch.dtype) -> None:
    heads, kv_heads, dim = 32, 4, 64
    print(
        f"one layer's attention, {heads} heads over {kv_heads} KV heads, head size {dim}, {str(dtype).removeprefix('torch.')}, us per call"
    )
    print(f"{'queries':>7} {'slots':>6} {'filled':>6} {'python (compiled)':>18} {'kernel':>8} {'x':>6}")
    python = torch.compile(few_query_attention, dynamic=False)
    for queries in (1, 5):
        for slots in (1024, 4096):
            for filled in (128, slots):
                q = torch.randn(1, heads, queries, dim).to(dtype)
                k, v = (torch.randn(1, kv_heads, slots, dim).to(dtype) for _ in range(2))
                mask = attention_mask_for(None, torch.arange(filled - queries, filled), slots, 1)
                args = (q, k, v, mask, dim**-0.5)
                with torch.inference_mode():
                    attention_kernel.disable()
                    slow = best_seconds(functools.partial(python, *args), 50)
                    attention_kernel.enable()
                    fast = best_seconds(functools.partial(attention_kernel.decode_attention, *args), 50)
                print(f"{queries:>7} {slots:>6} {filled:>6} {slow * 1e6:>18.1f} {fast * 1e6:>8.1f} {slow / fast:>5.2f}x")
    print()


def _switch(on: bool) -> None:
    """In each worker: the kernel on or off from the next compiled step (and the environment the cache key reads)."""
    os.environ[attention_kernel.ENV] = "1" if on else "0"
    if on:
        attention_kernel.enable()
    else:
        attention_kernel.disable()


def decoding(name: str, path, dtype: torch.dtype, slots: int, new_tokens: int, repeats: int, group) -> None:
    from nxd_models import from_pretrained_parallel

    model = from_pretrained_parallel(str(path), tp=1, dtype=dtype, max_seq_len=slots, workers=group, progress=False)
    prompt = model.tokenizer(DEMO_PROMPT)["input_ids"] if model.has_tokenizer else [1] + list(range(5, 36))
    rates = {False: [], True: []}
    try:
        for repeat in range(repeats + 1):  # the first round compiles (or loads) both steps
            for on in (True, False) if repeat % 2 else (False, True):
                os.environ[attention_kernel.ENV] = "1" if on else "0"  # the front end's compile cache key
                group.run(_switch, on)
                result = model.generate([prompt], max_new_tokens=new_tokens, eos_token_id=[], compile=True)
                if repeat:
                    rates[on].append(result.stats["decode_tokens_per_second"])
    finally:
        os.environ.pop(attention_kernel.ENV, None)
        group.run(_switch, True)
        model.close()
    off, on = max(rates[False]), max(rates[True])
    print(f"{name:<28} {slots:>6} {len(prompt) + new_tokens:>7} {off:>12.1f} {on:>12.1f} {on / off:>6.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layouts", nargs="*", default=["demo", "20m"], help="demo (the bundled demo-llama) or a random layout (20m, 1b, ...)"
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls-only", action="store_true")
    args = parser.parse_args(argv)
    unknown = [layout for layout in args.layouts if layout != "demo" and layout not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}: demo or one of {sorted(LAYOUTS)}")
    if not attention_kernel.prepare():
        print("the decode attention kernel does not run here (no AVX2/FMA, no compiler or NXD_ATTENTION_KERNEL=0): nothing to compare")
        return
    per_call(torch.bfloat16)
    if args.calls_only:
        return
    from nxd_core.workers import WorkerGroup

    print(f"compiled greedy decoding, tp=1, decode tokens/s, best of {args.repeats}, kernel off and on alternating")
    print(f"{'model':<28} {'slots':>6} {'tokens':>7} {'python path':>12} {'kernel':>12} {'x':>7}")
    with tempfile.TemporaryDirectory() as work, WorkerGroup(1) as group:
        for layout in args.layouts:
            if layout == "demo":
                for dtype in (torch.float32, torch.bfloat16):
                    name = f"demo-llama {str(dtype).removeprefix('torch.')}"
                    decoding(name, ROOT / "nxd_models/demo_models/demo-llama", dtype, 1024, args.new_tokens, args.repeats, group)
                continue
            path = Path(work) / layout
            write_random_llama(path, layout)
            for slots in (256, 2048):
                decoding(f"{layout} layout bf16", path, torch.bfloat16, slots, args.new_tokens, args.repeats, group)


if __name__ == "__main__":
    main()
