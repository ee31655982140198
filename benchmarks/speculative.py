"""Speculative decoding on the bundled demo pair: target-only, a draft model, and prompt lookup.

    python benchmarks/speculative.py                 # tp=1 and tp=2, eager and compiled, three tasks
    python benchmarks/speculative.py --tp 1 --new-tokens 512
    python benchmarks/speculative.py --target DIR    # another target with the pair's tokenizer (train_demo_models.py --models large)

Three tasks: free generation (DEMO_PROMPT, code the model writes from a class header, greedy), an
input-grounded one (a file given in the prompt, then its first lines again: the answer can repeat
much of the prompt, as editing code does; greedy), and sampled free generation (temperature 1),
which rarely repeats itself. Every greedy speculative output is compared with the target-only
one (bf16 rounding can flip a near-tie; the run says where). Each rate is the best of five runs (a shared VM's noise only ever slows a run down), the three
methods interleaved run by run; prefill is counted, as a user waits for it, and the decode
column leaves it out (the speed-up of the part speculation changes; the grounded prompt's long
prefill weighs on its end-to-end ratio).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from generate import DEMO_PROMPT  # noqa: E402  (the demo pair's prompt, as benchmarks/generate.py --demo uses it)

SOURCE = '''import json
import os


class Store:
    """A folder of JSON records, one file per key."""

    def __init__(self, root):
        self.root = root
        os.makedirs(root, exist_ok=True)

    def path(self, key):
        return os.path.join(self.root, key + ".json")

    def get(self, key, default=None):
        try:
            with open(self.path(key)) as f:
                return json.load(f)
        except FileNotFoundError:
            return default

    def put(self, key, value):
        with open(self.path(key), "w") as f:
            json.dump(value, f)

    def keys(self):
        return sorted(name[:-5] for name in os.listdir(self.root) if name.endswith(".json"))
'''
GROUNDED_PROMPT = SOURCE + "\n\n" + SOURCE[:120]
# (task, prompt, sampling): greedy tasks check that every method gives the same tokens; the sampled
# one is text that rarely repeats, where prompt lookup has little to find and must not cost much.
TASKS = [
    ("free generation", DEMO_PROMPT, {}),
    ("grounded (the file again)", GROUNDED_PROMPT, {}),
    ("sampled, temperature 1", DEMO_PROMPT, dict(do_sample=True, temperature=1.0, seed=0)),
]
REPEATS = 5


def best_of(model, prompt, methods: dict, **common) -> dict:
    """The fastest of REPEATS generations per method, the methods interleaved run by run, so that a
    slow spell of the machine hits them all alike."""
    for kwargs in methods.values():
        model.generate(prompt, **common, **kwargs)  # warm-up: compiles every shape the run will meet
    fastest: dict = {}
    best_decode = dict.fromkeys(methods, 0.0)  # the best decode rate may come from another run than the fastest
    for _ in range(REPEATS):
        for name, kwargs in methods.items():
            result = model.generate(prompt, **common, **kwargs)
            if name not in fastest or result.stats["tokens_per_second"] > fastest[name].stats["tokens_per_second"]:
                fastest[name] = result
            best_decode[name] = max(best_decode[name], result.stats.get("decode_tokens_per_second", 0.0))
    for name, result in fastest.items():
        result.stats["best_decode_tokens_per_second"] = best_decode[name]
    return fastest


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--target", default="demo-llama", help="the target model, a zoo name or a directory (the draft is demo-llama-draft)"
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--k", type=int, default=4, help="draft tokens per round")
    # 7: a verification of 8 rows stays on the bf16 decode kernel on every path, which computes each
    # row alike at any row count; wider ones than a path takes go to ATen's GEMM, whose rounding can
    # flip a near-tie (docs/generation.md).
    parser.add_argument("--lookup-k", type=int, default=7, help="prompt-lookup tokens per round")
    parser.add_argument("--compile", choices=["both", "eager", "compiled"], default="both")
    args = parser.parse_args()

    from nxd_core.workers import WorkerGroup
    from nxd_models import from_pretrained_parallel

    modes = {"both": (False, True), "eager": (False,), "compiled": (True,)}[args.compile]
    print(f"{args.target}, draft demo-llama-draft (a copy in each worker), {args.new_tokens} new tokens, best of {REPEATS}")
    print(f"draft k={args.k}, prompt lookup k={args.lookup_k} (n-grams up to 2)\n")
    header = (
        f"{'tp':>2s} {'step':8s} {'task':27s} {'target':>9s} {'draft':>9s} {'x':>6s} {'decode':>7s} {'acc':>5s}"
        f" {'lookup':>9s} {'x':>6s} {'decode':>7s} {'acc':>5s}"
    )
    print(header + "\n" + "-" * len(header))
    notes: list[str] = []
    for tp in args.tp:
        threads = max(1, (os.cpu_count() or 1) // tp)
        with WorkerGroup(tp, threads_per_worker=threads) as group:
            load = dict(workers=group, max_seq_len=1024, progress=False)
            target = from_pretrained_parallel(args.target, tp=tp, **load)
            draft = from_pretrained_parallel("demo-llama-draft", tp=1, **load)
            for compile in modes:
                for task, prompt, sampling in TASKS:
                    common = dict(max_new_tokens=args.new_tokens, eos_token_id=[], compile=compile, **sampling)
                    methods = {
                        "target": {},
                        "draft": dict(draft_model=draft, num_speculative_tokens=args.k),
                        "lookup": dict(prompt_lookup_num_tokens=args.lookup_k),
                    }
                    fastest = best_of(target, prompt, methods, **common)
                    plain, drafted, looked = fastest["target"], fastest["draft"], fastest["lookup"]
                    rate, decode_rate = plain.stats["tokens_per_second"], plain.stats["best_decode_tokens_per_second"]
                    cells = []
                    for method, result in (("draft", drafted), ("lookup", looked)):
                        r, decode = result.stats["tokens_per_second"], result.stats["best_decode_tokens_per_second"]
                        cells.append(f"{r:9.1f} {r / rate:5.2f}x {decode / decode_rate:6.2f}x {result.stats['acceptance_rate']:5.0%}")
                        at = first_difference(result.tokens[0], plain.tokens[0])
                        if not sampling and at is not None:
                            notes.append(f"tp={tp} {'compiled' if compile else 'eager'} {task}: {method} left greedy at token {at}")
                    print(f"{tp:2d} {'compiled' if compile else 'eager':8s} {task:27s} {rate:9.1f} {cells[0]} {cells[1]}")
    print(
        "\ntokens/s per column, prefill included; x: over target-only in the same row; decode: the same ratio of"
        " decode rates (after the first token: prefill left out); acc: proposed tokens accepted"
    )
    # bf16 rounding depends on the shape a kernel sees, and verification passes are wider than plain
    # steps: a near-tie can flip (docs/generation.md says where greedy output is exact).
    for note in notes or ["every greedy speculative output equals target-only greedy output"]:
        print(note)


if __name__ == "__main__":
    main()
