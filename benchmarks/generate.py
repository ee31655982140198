"""Decode speed: HF generate next to ours (eager and compiled), the roofline, and speculative decoding.

    python benchmarks/generate.py                  # ~20M-parameter Llama layout, bf16, tp=1
    python benchmarks/generate.py --layout 1b      # ~1.1B parameters, where decoding is memory-bound
    python benchmarks/generate.py --demo --tp 2    # the bundled demo pair: speculative vs target-only
    python benchmarks/generate.py --tp 2           # adds tp=2 next to tp=1 (and tp=2 on gloo), with ratios
    python benchmarks/generate.py --layout moe-1b  # a Qwen3-MoE (no speculation: the draft's vocabulary differs)

Everything runs on the same random weights and the same number of threads, one after another;
each number is the best of three runs.
The roofline is the memory read bandwidth measured here (memory_bandwidth: a reduction over 1 GiB on
the benchmark's threads) over the weight bytes read per decoded token
(in a MoE, the experts a token's router did not choose are not read). It is printed twice: counting
the whole embedding table, and counting the one row of it a token reads (the honest one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from random_checkpoint import LAYOUTS, decode_bytes_per_token, write_random_llama  # noqa: E402

GB = 1e9


def memory_bandwidth(size: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of reading a large buffer once: the roofline's bandwidth (decoding only reads
    its weights). A reduction (amax) over `size` bytes of float32 on torch's threads, best of `repeats`.
    A copy would count each byte read and written; a read stream goes faster than that on this machine
    (llama.cpp came out at 149% of a copy's roofline). The buffer sits in huge pages where the OS gives
    them, as the loaded weights do (nxd_core.huge_pages): 4 KB pages read slower."""
    from nxd_core import huge_pages

    source = torch.ones(size // 4, dtype=torch.float32)
    if huge_pages.enabled():
        source = huge_pages.huge_page_copy(source)
    source.amax()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        source.amax()
        best = min(best, time.perf_counter() - start)
    return size / best


# Each time is the best of this many runs: a shared VM's noise only ever slows a run down.
REPEATS = 3


def kernel_path() -> str:
    """The bf16 kernel's SIMD path the workers take (they inherit NXD_BF16_KERNEL), or F.linear."""
    from nxd_core import cpu_kernels

    return cpu_kernels.path() if cpu_kernels.prepare() else "none (F.linear)"


def decode_rate(long_seconds: float, short_seconds: float, new_tokens: int) -> float:
    """Decode tokens per second with the prompt's prefill left out: the extra tokens of a generation
    of new_tokens over a one-token one, divided by the extra time."""
    return (new_tokens - 1) / (long_seconds - short_seconds)


def hf_decode_rate(path: Path, prompt: torch.Tensor, new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()

    def seconds(n):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    with torch.inference_mode():
        seconds(4)  # warm-up
        long = min(seconds(new_tokens) for _ in range(REPEATS))
        short = min(seconds(1) for _ in range(REPEATS))
        return decode_rate(long, short, new_tokens)


def ours(model, prompt, new_tokens, **kwargs) -> dict:
    """The stats of the fastest of REPEATS generations of new_tokens, with "decode_tokens_per_second"
    (prefill left out)."""

    def run(n):
        return model.generate(input_ids=prompt, max_new_tokens=n, eos_token_id=[], **kwargs).stats

    run(8)  # warm-up (compiles where asked)
    fastest = min((run(new_tokens) for _ in range(REPEATS)), key=lambda stats: stats["seconds"])
    short = min(run(1)["seconds"] for _ in range(REPEATS))
    return {**fastest, "decode_tokens_per_second": decode_rate(fastest["seconds"], short, new_tokens)}


DEMO_PROMPT = "import os\n\n\nclass Reader:\n    def __init__(self, path):\n        "


def demo_pair(args) -> None:
    """Target-only against speculative decoding on the bundled pair, compiled and eager, same prompt."""
    from nxd_models import from_pretrained_parallel

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.tp)
    print(
        f"demo-llama at tp={args.tp} ({threads} threads per worker), demo-llama-draft copied into each worker, "
        f"k={args.k}, {args.new_tokens} new tokens\n"
    )
    from nxd_core.workers import WorkerGroup

    with WorkerGroup(args.tp, threads_per_worker=threads) as group:
        load = dict(workers=group, max_seq_len=512, progress=False)
        target = from_pretrained_parallel("demo-llama", tp=args.tp, **load)
        draft = from_pretrained_parallel("demo-llama-draft", tp=1, **load)
        print(f"{'':22s} {'target only':>12s} {'speculative':>12s} {'speedup':>8s} {'acceptance':>11s}  rounds that accepted 0..k")
        for compile in (False, True):
            common = dict(max_new_tokens=args.new_tokens, eos_token_id=[], compile=compile)
            for kwargs in ({}, dict(draft_model=draft, num_speculative_tokens=args.k)):
                target.generate(DEMO_PROMPT, **{**common, **kwargs, "max_new_tokens": 8})  # warm-up (compiles)
            plain = target.generate(DEMO_PROMPT, **common)
            spec = target.generate(DEMO_PROMPT, **common, draft_model=draft, num_speculative_tokens=args.k)
            assert spec.tokens == plain.tokens, "speculative greedy output must equal target-only greedy output"
            a, b = plain.stats["tokens_per_second"], spec.stats["tokens_per_second"]
            print(
                f"{'compiled' if compile else 'eager':22s} {a:9.1f} t/s {b:9.1f} t/s {b / a:7.2f}x "
                f"{spec.stats['acceptance_rate']:10.0%}  {spec.stats['accepted_histogram']}"
            )
        print("\n" + DEMO_PROMPT + plain.texts[0])


def eager_and_compiled(path: Path, prompt, new_tokens: int, tp: int, threads: int, slots: int, collectives: str) -> tuple:
    """Decode tokens/s (eager, compiled) of the target in a fresh worker group."""
    from nxd_core.workers import WorkerGroup
    from nxd_models import from_pretrained_parallel

    with WorkerGroup(tp, threads_per_worker=threads, collectives=collectives) as group:
        model = from_pretrained_parallel(path, tp=tp, dtype=torch.bfloat16, max_seq_len=slots, workers=group, progress=False)
        return tuple(ours(model, prompt, new_tokens, compile=c)["decode_tokens_per_second"] for c in (False, True))


def tp_comparison(args, path: Path, prompt, slots: int, at_tp: tuple) -> None:
    """tp=N (shared-memory collectives, measured above) next to tp=1 and tp=N on gloo, all on every core."""
    cores = os.cpu_count() or 1
    single = eager_and_compiled(path, prompt, args.new_tokens, 1, args.threads or cores, slots, "auto")
    gloo = eager_and_compiled(path, prompt, args.new_tokens, args.tp, args.threads or max(1, cores // args.tp), slots, "gloo")
    print(f"\n{'decode tokens/s, same run':40s} {'eager':>8s} {'compiled':>9s} {'eager/tp1':>10s} {'compiled/tp1':>13s}")
    for label, (eager, compiled) in (
        ("tp=1", single),
        (f"tp={args.tp}, shared-memory collectives", at_tp),
        (f"tp={args.tp}, gloo collectives", gloo),
    ):
        print(f"{label:40s} {eager:8.1f} {compiled:9.1f} {eager / single[0]:9.2f}x {compiled / single[1]:12.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="20m")
    parser.add_argument("--draft-layout", choices=sorted(LAYOUTS), default="draft")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=4, help="speculative tokens per round")
    parser.add_argument("--threads", type=int, default=None, help="threads for HF and for each worker (default: all cores / tp)")
    parser.add_argument("--workdir", help="where to put the checkpoints (default: a temporary directory)")
    parser.add_argument("--demo", action="store_true", help="time the bundled demo-llama pair instead (speculative vs target-only)")
    args = parser.parse_args(argv)
    if args.demo:
        return demo_pair(args)

    from nxd_core.workers import WorkerGroup
    from nxd_models import from_pretrained_parallel

    vocab = LAYOUTS[args.layout]["vocab_size"]
    with_draft = LAYOUTS[args.draft_layout]["vocab_size"] == vocab
    if not with_draft:
        print(f"(no speculative rows: --draft-layout {args.draft_layout} has another vocabulary than --layout {args.layout})")
    work = Path(tempfile.mkdtemp(prefix="nxd-generate-bench-", dir=args.workdir))
    try:
        weight_bytes = write_random_llama(work / "target", args.layout)
        if with_draft:
            write_random_llama(work / "draft", args.draft_layout, seed=1)
        read_bytes = decode_bytes_per_token(args.layout, weight_bytes)
        read_one_row = decode_bytes_per_token(args.layout, weight_bytes, whole_embedding=False)
        prompt = torch.randint(3, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.tp)
        torch.set_num_threads(threads)
        print(
            f"layout {args.layout}: {weight_bytes / 2 / 1e6:.0f}M parameters ({weight_bytes / GB:.2f} GB bf16), "
            f"tp={args.tp}, {threads} threads, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
            f"bf16 kernel path {kernel_path()}, load average {os.getloadavg()[0]:.2f}\n"
        )

        bandwidth = memory_bandwidth()
        roofline = bandwidth / (read_bytes / args.tp)  # each rank reads its shard once per token
        honest = bandwidth / (read_one_row / args.tp)
        hf = hf_decode_rate(work / "target", prompt, args.new_tokens)

        slots = args.prompt_tokens + args.new_tokens + args.k + 1
        load = dict(tp=args.tp, dtype=torch.bfloat16, max_seq_len=slots, progress=False)
        with WorkerGroup(args.tp, threads_per_worker=threads) as group:
            target = from_pretrained_parallel(work / "target", workers=group, **load)
            drafts = {}
            if with_draft:
                drafts["same"] = from_pretrained_parallel(work / "target", workers=group, **load)
                drafts["small"] = from_pretrained_parallel(work / "draft", workers=group, **{**load, "tp": 1})  # a copy per worker
            eager = ours(target, prompt, args.new_tokens, compile=False)
            start = time.perf_counter()
            target.generate(input_ids=prompt, max_new_tokens=2, compile=True)
            compile_seconds = time.perf_counter() - start
            compiled = ours(target, prompt, args.new_tokens, compile=True)
            speculative = {}
            for label, drafter in drafts.items():
                kwargs = dict(draft_model=drafter, num_speculative_tokens=args.k, compile=True)
                speculative[label] = ours(target, prompt, args.new_tokens, **kwargs)

        print(f"{'decode (prefill left out)':40s} {'tokens/s':>10s} {'vs HF eager':>12s}")
        rows = [
            ("HF generate (eager)", hf),
            ("ours, eager", eager["decode_tokens_per_second"]),
            ("ours, compiled", compiled["decode_tokens_per_second"]),
        ]
        spec_labels = {"same": "draft = target", "small": f"{args.draft_layout} draft"}
        rows += [(f"ours, speculative k={args.k}, {spec_labels[k]}", v["decode_tokens_per_second"]) for k, v in speculative.items()]
        for label, value in rows:
            print(f"{label:40s} {value:10.1f} {value / hf:11.2f}x")
        print(f"\n(compiling the decode step took {compile_seconds:.1f}s, once per model and batch size)")
        print(
            f"memory read bandwidth {bandwidth / GB:.1f} GB/s ({torch.get_num_threads()} threads); roofline {honest:.1f} tokens/s reading one embedding row per token "
            f"({read_one_row / args.tp / GB:.3f} GB of weights per token per rank), {roofline:.1f} counting the whole "
            f"embedding table ({read_bytes / args.tp / GB:.3f} GB)"
        )
        for label, stats in (("compiled", compiled), ("eager", eager)):
            rate = stats["decode_tokens_per_second"]
            print(f"ours {label} reaches {rate / honest:.0%} of the roofline ({rate / roofline:.0%} counting the whole embedding table)")
        for key, stats in speculative.items():
            print(
                f"speculative, {spec_labels[key]}: speedup {stats['decode_tokens_per_second'] / compiled['decode_tokens_per_second']:.2f}x over compiled "
                f"decoding, acceptance {stats['acceptance_rate']:.0%}, rounds that accepted 0..{args.k}: {stats['accepted_histogram']}"
            )
        if args.tp > 1:
            at_tp = (eager["decode_tokens_per_second"], compiled["decode_tokens_per_second"])
            tp_comparison(args, work / "target", prompt, slots, at_tp)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
