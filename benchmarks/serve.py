"""Serving throughput and latency: concurrent streaming clients of the serving Engine, next to
one-at-a-time model.generate and Hugging Face's static batched generate, on the same requests.

    python benchmarks/serve.py                       # the 20M layout (bf16) at tp=1, 1/4/16/32 clients
    python benchmarks/serve.py --tp 1 2 --demo       # the bundled demo-llama (fp32) at tp=1 and tp=2
    python benchmarks/serve.py --layout tiny --clients 1 4 --requests 8   # a quick look
    python benchmarks/serve.py --compile             # compiled decode steps (compiled before timing)

Clients are threads that stream from the Engine in this process (the HTTP layer adds the same
small cost to every setting and is left out). Requests mix prompt lengths (16-200 tokens) and
completion lengths (32-128 tokens), the same list for every setting; each client sends its share
one after another. The engine has as many rows as the most clients, so every setting decodes
the same fixed-shape batch (that is what makes it batch invariant). Numbers are the best of
--repeats runs (a shared machine only ever slows a run down).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from random_checkpoint import write_random_llama  # noqa: E402

DEMO = Path(__file__).parent.parent / "nxd_models" / "demo_models" / "demo-llama"


def make_requests(n: int, vocab: int, seed: int = 0, prompt_range=(16, 200), new_range=(32, 128)) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([1] + [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_range) - 1)], rng.randint(*new_range)) for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_clients(engine, requests, clients: int) -> dict:
    """Every client streams its share of the requests one after another; aggregate numbers."""
    ttft, itl, tokens = [], [], [0]
    lock = threading.Lock()

    def client(share):
        for prompt, new in share:
            began = last = time.perf_counter()
            first = True
            for output in engine.submit(prompt, max_tokens=new):
                now = time.perf_counter()
                if output.token_ids:
                    with lock:
                        if first:
                            ttft.append(now - began)
                        else:
                            itl.extend([(now - last) / len(output.token_ids)] * len(output.token_ids))
                        tokens[0] += len(output.token_ids)
                    first, last = False, now

    shares = [requests[i::clients] for i in range(clients)]
    threads = [threading.Thread(target=client, args=(s,)) for s in shares]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    return dict(
        tok_s=tokens[0] / seconds,
        ttft50=percentile(ttft, 50),
        ttft99=percentile(ttft, 99),
        itl50=percentile(itl, 50),
        itl99=percentile(itl, 99),
    )


def one_at_a_time(model, requests, compile: bool = False) -> float:
    began, tokens = time.perf_counter(), 0
    for prompt, new in requests:
        tokens += len(model.generate(input_ids=[prompt], max_new_tokens=new, eos_token_id=[], compile=compile).tokens[0])
    return tokens / (time.perf_counter() - began)


def hf_static(path: Path, requests, batch: int, dtype) -> float:
    """HF generate on static batches (left padding); each batch runs until its longest request ends,
    and only the tokens each request asked for count."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    began, useful = time.perf_counter(), 0
    for i in range(0, len(requests), batch):
        group = requests[i : i + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
        new = max(n for _, n in group)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        useful += sum(n for _, n in group)
    return useful / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="20m")
    parser.add_argument("--demo", action="store_true", help="the bundled demo-llama instead of a random layout")
    parser.add_argument("--tp", type=int, nargs="+", default=[1])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--compile", action="store_true", help="compiled decode steps (the engine's and generate's), compiled before timing"
    )
    args = parser.parse_args()

    from nxd_models import from_pretrained_parallel
    from nxd_models.serving import Engine

    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        if args.demo:
            path, dtype = DEMO, torch.float32
        else:
            path, dtype = work / args.layout, torch.bfloat16
            write_random_llama(path, args.layout, dtype=dtype)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        prompt_range = (min(16, config.max_position_embeddings // 8), min(200, config.max_position_embeddings // 4))
        new_range = (min(32, config.max_position_embeddings // 8), min(128, config.max_position_embeddings // 4))
        requests = make_requests(args.requests, config.vocab_size, prompt_range=prompt_range, new_range=new_range)
        seq = prompt_range[1] + new_range[1]
        rows = max(args.clients)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        name = "demo-llama" if args.demo else f"{args.layout} layout"
        print(f"{name}, {dtype}, {len(requests)} requests (prompts {prompt_range}, completions {new_range} tokens), {rows} rows")
        print(
            f"best of {args.repeats} runs; ITL: the time between tokens of one stream; {'compiled' if args.compile else 'eager'} decode steps"
        )
        hf = max(hf_static(path, requests, rows, dtype) for _ in range(args.repeats))
        print(f"{'':28s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'ITL p50':>8s} {'ITL p99':>8s}")
        print(f"{f'HF static batches of {rows}':28s} {hf:8.1f}")
        for tp in args.tp:
            with from_pretrained_parallel(path, tp=tp, dtype=dtype, max_batch_size=rows, max_seq_len=seq, progress=False) as model:
                alone_requests = requests[: max(4, len(requests) // 8)]
                if args.compile:
                    one_at_a_time(model, alone_requests[:1], compile=True)  # compiles outside the timing
                alone = max(one_at_a_time(model, alone_requests, args.compile) for _ in range(args.repeats))
                print(f"{f'tp={tp} generate, one at a time':28s} {alone:8.1f}")
                with Engine(model, compile=args.compile) as engine:
                    engine.eos = []  # every request runs to its max_tokens: the same work in every setting
                    run_clients(engine, requests[:2], 2)  # warm-up: first calls of every kernel
                    single = None
                    for clients in args.clients:
                        share = requests if clients > 1 else alone_requests  # one stream: fewer requests, same kinds
                        runs = [run_clients(engine, share, clients) for _ in range(args.repeats)]
                        best = max(runs, key=lambda r: r["tok_s"])
                        single = single or best
                        ratio = f"  {best['tok_s'] / single['tok_s']:.1f}x one stream, {best['tok_s'] / hf:.2f}x HF"
                        print(
                            f"{f'tp={tp} serve, {clients} clients':28s} {best['tok_s']:8.1f} {best['ttft50'] * 1e3:7.1f}ms "
                            f"{best['ttft99'] * 1e3:7.1f}ms {best['itl50'] * 1e3:6.1f}ms {best['itl99'] * 1e3:6.1f}ms{ratio}"
                        )
                    print(f"{'':28s} ITL p99 at {args.clients[-1]} clients: {best['itl99'] / single['itl99']:.2f}x one stream's")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
