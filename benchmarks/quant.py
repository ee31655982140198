"""Weight-only quantization: decode tokens/s of bf16, int8 and int4 weights side by side, with the roofline.

    python benchmarks/quant.py                        # 20m and 1b layouts, tp 1 and 2, all in one run
    python benchmarks/quant.py --layouts 20m --tp 1   # a quick look

Every row decodes the same prompt on the same random weights, compiled (the int8 and int4 kernels are
one call each inside the compiled step); prefill is left out (generate.py's method). The formats of
one layout and tp are loaded side by side and measured in turn, --rounds times: this machine's
memory bandwidth changes in spells of seconds, and formats measured one after another would fall in
different spells. Each rate is the best of every round; each round's ratio over bf16 is printed too.
The roofline is this machine's memory read bandwidth (generate.memory_bandwidth, on every core) over the weight bytes one decoded token reads per
rank: every weight and scale, except the embedding table (a token reads one row of it). HF rows run
in this process on every core: bf16, and int8 weight-only through torchao where it is installed.
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
from generate import REPEATS, decode_rate, memory_bandwidth, ours  # noqa: E402
from random_checkpoint import LAYOUTS, write_random_llama  # noqa: E402

GB = 1e9


def bytes_read_per_token(key) -> int:
    """(In a worker) the bytes of this rank's weights one decoded token reads: all but the embedding
    table, unless the lm_head is that table."""
    from nxd_core.worker_process import worker_state

    model = worker_state()[key]
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    total = sum(t.numel() * t.element_size() for t in unique.values())
    embedding = model.model.embed_tokens.weight
    if model.lm_head.weight is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def hf_rate(path: Path, prompt: torch.Tensor, new_tokens: int, quantize: bool) -> float | str:
    """HF generate's decode tokens/s in bf16, or int8 weight-only through torchao (a reason if absent)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    if quantize:
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError:
            return "torchao is not installed (pip install torchao)"
        quantize_(model, Int8WeightOnlyConfig())

    def seconds(n):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    with torch.inference_mode():
        seconds(4)
        long = min(seconds(new_tokens) for _ in range(REPEATS))
        short = min(seconds(1) for _ in range(REPEATS))
    return decode_rate(long, short, new_tokens)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["20m", "1b"])
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--methods", nargs="+", default=["int8", "int4-g128"], help="quantizations next to bf16; METHOD+head quantizes the lm_head too"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="times through every weight format, alternating; the best rate is kept")
    parser.add_argument("--no-hf", action="store_true", help="leave out the HF rows")
    parser.add_argument("--threads", type=int, help="threads per worker (default: all cores / tp; 1 is steadier on a shared machine)")
    parser.add_argument("--workdir", help="where to put the checkpoints (default: a temporary directory)")
    args = parser.parse_args(argv)

    from nxd_core import int4_kernels, int8_kernels

    cores = os.cpu_count() or 1
    probes = [memory_bandwidth()]  # again after every round: the fastest read is the roofline
    int8_kernels.prepare()
    int4_kernels.prepare()
    print(
        f"{cores} cores; int8 kernel: {int8_kernels.isa() or 'none (fallback)'}; int4 kernel: {int4_kernels.isa() or 'none (fallback)'}; "
        f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}; decode of {args.new_tokens} tokens after a "
        f"{args.prompt_tokens}-token prompt, compiled, best of {REPEATS} per round, {args.rounds} rounds\n"
    )
    table = []  # (layout, tp, label, best rate, ratio over bf16, per-round ratios, bytes read per rank)
    work = Path(tempfile.mkdtemp(prefix="nxd-quant-bench-", dir=args.workdir))
    try:
        for layout in args.layouts:
            path = work / layout
            write_random_llama(path, layout)
            vocab = LAYOUTS[layout]["vocab_size"]
            prompt = torch.randint(3, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
            slots = args.prompt_tokens + args.new_tokens + 1
            if not args.no_hf:
                torch.set_num_threads(cores)
                hf = hf_rate(path, prompt, args.new_tokens, quantize=False)
                table.append((layout, 1, "HF bf16", hf, None, [], None))
                ao = hf_rate(path, prompt, args.new_tokens, quantize=True)
                table.append((layout, 1, "HF torchao", ao, ao / hf if isinstance(ao, float) else None, [], None))
            for tp in args.tp:
                table += compare_formats(path, layout, tp, prompt, slots, args, probes)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bandwidth = max(probes)
    print(
        f"\nmemory read bandwidth {bandwidth / GB:.1f} GB/s, the fastest of {len(probes)} probes ({' '.join(f'{p / GB:.1f}' for p in probes)}; "
        f"{torch.get_num_threads()} threads in this process)\n"
    )
    print(
        f"{'layout':7s} {'tp':>3s} {'weights':16s} {'tokens/s':>9s} {'vs bf16':>8s} {'GB read/rank':>13s} {'roofline':>9s} {'of roofline':>12s}  each round vs bf16"
    )
    for layout, tp, label, rate, ratio, rounds, read in table:
        if isinstance(rate, str):  # not applicable, or not installed
            print(f"{layout:7s} {tp:3d} {label:16s} {rate}")
            continue
        line = f"{layout:7s} {tp:3d} {label:16s} {rate:9.1f} " + (f"{ratio:7.2f}x" if ratio else f"{'':8s}")
        if read:
            line += f" {read / GB:13.3f} {bandwidth / read:9.1f} {rate * read / bandwidth:11.0%}  " + " ".join(f"{v:.2f}x" for v in rounds)
        print(line)


def compare_formats(path: Path, layout: str, tp: int, prompt: torch.Tensor, slots: int, args, probes: list[float]) -> list[tuple]:
    """bf16 and every method loaded side by side in one worker group, measured in turn for
    args.rounds rounds (alternating the order), so that a shared machine's fast and slow spells
    fall on all of them; each round's rate of a method is compared with bf16's in the same round."""
    from nxd_core.workers import WorkerGroup
    from nxd_models import from_pretrained_parallel

    cores = os.cpu_count() or 1
    rows = []
    with WorkerGroup(tp, threads_per_worker=args.threads or max(1, cores // tp)) as group:
        models = {}
        for method in [None, *args.methods]:
            quantize = dict(quantize=method.removesuffix("+head"), quantize_lm_head=method.endswith("+head")) if method else {}
            load = dict(tp=tp, dtype=torch.bfloat16, max_seq_len=slots, workers=group, progress=False, **quantize)
            try:
                models[method or "bf16"] = from_pretrained_parallel(path, **load)
            except ValueError as exc:  # an int4 group that this layout's widths do not hold
                rows.append((layout, tp, method, f"not applicable: {exc}", None, [], None))
        rates = {label: [] for label in models}
        for number in range(args.rounds):
            order = list(models) if number % 2 == 0 else list(reversed(models))
            for label in order:
                rates[label].append(ours(models[label], prompt, args.new_tokens, compile=True)["decode_tokens_per_second"])
            probes.append(memory_bandwidth())
            print(f"{layout} tp={tp} round {number + 1}: " + ", ".join(f"{label} {rates[label][-1]:.1f}" for label in order), flush=True)
        base = max(rates["bf16"])
        for label, model in models.items():
            read = max(group.run(bytes_read_per_token, model.key))
            each = [rate / plain for rate, plain in zip(rates[label], rates["bf16"])]
            rows.append((layout, tp, label, max(rates[label]), max(rates[label]) / base, each if label != "bf16" else [], read))
            model.close()
    return rows


if __name__ == "__main__":
    main()
