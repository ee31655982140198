"""One kernel call per weight against one call for the weights that meet the same x (q, k and v;
gate and up), over every linear of a layout for one token, bf16, int8 and int4 kernels.

    python benchmarks/fused_calls.py                      # the 1.1B layout, 8 rounds
    python benchmarks/fused_calls.py --layout 20m         # small matrices: fixed costs weigh more
    python benchmarks/fused_calls.py --quick              # tiny shapes, 2 rounds (the test suite)

Decoding calls each linear of each layer once per token. A call has fixed costs besides its stream
of weights: the threads start and finish (the last chunk runs on one thread while the other waits),
x is prepared (int8: quantized; int4: permuted). The Llama family's layers call
`layers.column_parallel_many`, which makes q, k and v one call and gate and up another
(`*_linear_many`): 4 calls per layer instead of 7. Every weight is its own copy in huge pages, read
from memory as in a decode step. Each round times both ways for each kind, alternating which goes
first, with the read probe (this machine's bandwidth comes in spells: compare within a round); the
summary takes the fastest round of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import memory_bandwidth  # noqa: E402
from random_checkpoint import LAYOUTS  # noqa: E402

from nxd_core import cpu_kernels, huge_pages, int4_kernels, int8_kernels  # noqa: E402
from nxd_core.quantization import quantize_int4, quantize_int8  # noqa: E402

QUICK = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)


def layer_groups(fields: dict) -> list[list[tuple[int, int]]]:
    """The weights [N, K] of one token's linears, grouped as the layers call them: q/k/v, o, gate/up, down; lm_head."""
    hidden, inner = fields["hidden_size"], fields["intermediate_size"]
    head = hidden // fields["num_attention_heads"]
    kv = fields["num_key_value_heads"] * head
    layer = [[(hidden, hidden), (kv, hidden), (kv, hidden)], [(hidden, hidden)], [(inner, hidden), (inner, hidden)], [(hidden, inner)]]
    return layer * fields["num_hidden_layers"] + [[(fields["vocab_size"], hidden)]]


def int4_group(groups: list[list[tuple[int, int]]]) -> int:
    """The largest of int4's usual group sizes that divides every row length (the 20M layout's 688: 16)."""
    lengths = {k for group in groups for _, k in group}
    return next(g for g in (128, 64, 32, 16, 8) if all(k % g == 0 for k in lengths))


def weights(kind: str, n: int, k: int, generator: torch.Generator, group: int) -> tuple:
    """One weight in the kernel's form, in huge pages (as a loaded model's)."""
    w = torch.randn(n, k, generator=generator) * 0.02
    if kind == "bf16":
        return (huge_pages.huge_page_copy(w.bfloat16()),)
    q, scale = quantize_int8(w) if kind == "int8" else quantize_int4(w, group)
    return huge_pages.huge_page_copy(q), scale


def one_call_each(kind: str, x: torch.Tensor, group: list[tuple]) -> None:
    for w in group:
        if kind == "bf16":
            torch.ops.nxd.bf16_linear(x, w[0])
        elif kind == "int8":
            torch.ops.nxd.int8_linear(x, *w)
        else:
            torch.ops.nxd.int4_linear(x, *w)


def one_call(kind: str, x: torch.Tensor, group: list[tuple]) -> None:
    if len(group) == 1:
        return one_call_each(kind, x, group)
    if kind == "bf16":
        torch.ops.nxd.bf16_linear_many(x, [w[0] for w in group])
    elif kind == "int8":
        torch.ops.nxd.int8_linear_many(x, [w[0] for w in group], [w[1] for w in group])
    else:
        torch.ops.nxd.int4_linear_many(x, [w[0] for w in group], [w[1] for w in group])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="1b", choices=["1b", "20m"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = QUICK if args.quick else LAYOUTS[args.layout]
    rounds = 2 if args.quick else args.rounds
    kinds = [
        kind for kind, ready in (("bf16", cpu_kernels.prepare), ("int8", int8_kernels.prepare), ("int4", int4_kernels.prepare)) if ready()
    ]
    if not kinds:
        print("no decode kernel builds on this machine (it needs AVX2/FMA and a C++ compiler): nothing to compare")
        return
    generator = torch.Generator().manual_seed(0)
    groups = layer_groups(fields)
    group_size = int4_group(groups)
    data = {kind: [[weights(kind, n, k, generator, group_size) for n, k in group] for group in groups] for kind in kinds}
    xs = {k: torch.randn(1, k, generator=generator).bfloat16() for k in {k for group in groups for _, k in group}}
    nbytes = {kind: sum(t.numel() * t.element_size() for group in data[kind] for w in group for t in w) for kind in kinds}
    calls = sum(len(group) for group in groups), len(groups)
    print(
        f"{'quick' if args.quick else args.layout} layout, every linear for one token, one row of x, {torch.get_num_threads()} threads; "
        f"int4 g{group_size}; {calls[0]} calls one per weight, {calls[1]} with q/k/v and gate/up in one call each"
    )
    print(f"{'round':>5} {'probe GB/s':>11}" + "".join(f" {kind + ' apart':>13} {kind + ' together':>15} {'x':>6}" for kind in kinds))
    best = {(kind, way): float("inf") for kind in kinds for way in ("apart", "together")}
    for rnd in range(rounds):
        probe = memory_bandwidth() / 1e9
        line = f"{rnd:>5} {probe:>11.1f}"
        for kind in kinds:
            ways = {"apart": one_call_each, "together": one_call}
            seconds = {}
            for way in ways if rnd % 2 == 0 else list(ways)[::-1]:
                fastest = float("inf")
                for _ in range(3):
                    start = time.perf_counter()
                    for group in data[kind]:
                        ways[way](kind, xs[group[0][0].shape[1] * (2 if kind == "int4" else 1)], group)
                    fastest = min(fastest, time.perf_counter() - start)
                seconds[way] = fastest
                best[kind, way] = min(best[kind, way], fastest)
            line += (
                f" {seconds['apart'] * 1e3:>10.2f} ms {seconds['together'] * 1e3:>12.2f} ms {seconds['apart'] / seconds['together']:>5.2f}x"
            )
        print(line, flush=True)
    print("fastest round of each (ms; GB/s of weights and scales read):")
    for kind in kinds:
        apart, together = best[kind, "apart"], best[kind, "together"]
        print(
            f"  {kind}: one call per weight {apart * 1e3:.2f} ms ({nbytes[kind] / apart / 1e9:.1f} GB/s), "
            f"q/k/v and gate/up together {together * 1e3:.2f} ms ({nbytes[kind] / together / 1e9:.1f} GB/s): {apart / together:.2f}x"
        )


if __name__ == "__main__":
    main()
