"""parallel_model_trace / save / load on a BERT for sequence classification: times, sizes, per-call latency.

    python benchmarks/trace.py                                   # tiny BERT, seq 128, tp=2
    python benchmarks/trace.py --hidden 768 --layers 12 --heads 12 --intermediate 3072   # BERT-base layout
    python benchmarks/trace.py --tp 4 --calls 50

Prints: trace time (weights inlined and separated), saved size of each folder,
load time, and the per-call latency of the loaded model run eager and compiled
(torch.compile in each worker; its first call, which compiles, is reported apart).
Random weights; the model follows the NxD inference guide (parallel self-attention).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).parent.parent))
from nxd_core.trace import parallel_model_load, parallel_model_save, parallel_model_trace  # noqa: E402
from nxd_core.trace_format import folder_size  # noqa: E402
from nxd_core.workers import WorkerGroup  # noqa: E402

MiB = 1 << 20


def get_model(config, checkpoint):
    """The guide's get_model: HF BERT with parallel self-attention, loaded from the unsharded checkpoint."""
    from nxd_core.checkpoint import load
    from nxd_models.bert import parallelize_self_attention

    model = parallelize_self_attention(BertForSequenceClassification(config))
    load(checkpoint, model, sharded=False)
    return model


def import_model_code() -> None:
    """Import what get_model needs, so the first trace does not count the imports."""
    import nxd_models.bert  # noqa: F401


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def per_call_ms(model, inputs, calls: int) -> float:
    """Median latency of `calls` calls after one warm-up call."""
    model(*inputs)
    times = []
    for _ in range(calls):
        _, seconds = timed(model, *inputs)
        times.append(seconds * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 4 x hidden")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per mode (median reported)")
    parser.add_argument("--workdir", default=None, help="where the checkpoint and saved folders go (removed afterwards)")
    args = parser.parse_args()

    config = BertConfig(
        vocab_size=30522,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate or 4 * args.hidden,
        max_position_embeddings=max(512, args.seq),
        num_labels=2,
    )
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator),
        torch.ones(args.batch, args.seq, dtype=torch.long),
        torch.zeros(args.batch, args.seq, dtype=torch.long),
    )
    workdir = Path(tempfile.mkdtemp(prefix="nxd-trace-bench-", dir=args.workdir))
    rows: list[tuple[str, str]] = []
    try:
        torch.manual_seed(0)
        checkpoint = workdir / "bert.pt"
        torch.save({"model": BertForSequenceClassification(config).state_dict()}, checkpoint)
        build = functools.partial(get_model, config, str(checkpoint))

        workers, seconds = timed(WorkerGroup, args.tp)
        rows.append(("worker start-up", f"{seconds:.2f} s"))
        with workers:
            _, seconds = timed(workers.run, import_model_code)
            rows.append(("worker imports (transformers)", f"{seconds:.2f} s"))
            for inline, label in ((True, "inlined"), (False, "separated")):
                model, seconds = timed(
                    parallel_model_trace, build, inputs, tp_degree=args.tp, inline_weights_to_neff=inline, workers=workers
                )
                rows.append((f"trace, weights {label}", f"{seconds:.2f} s"))
                _, seconds = timed(parallel_model_save, model, workdir / label)
                rows.append((f"save, weights {label}", f"{seconds:.2f} s"))
                model.close()
            for label in ("inlined", "separated"):
                rows.append((f"saved size, weights {label}", f"{folder_size(workdir / label) / MiB:.2f} MiB"))

            for compiled, mode in ((False, "eager"), (True, "compiled")):
                model, seconds = timed(parallel_model_load, workdir / "separated", compiled=compiled, workers=workers)
                rows.append((f"load, weights separated ({mode})", f"{seconds:.2f} s"))
                if compiled:
                    _, seconds = timed(model, *inputs)
                    rows.append(("first call, compiled (compiles)", f"{seconds:.2f} s"))
                rows.append((f"per call, {mode}", f"{per_call_ms(model, inputs, args.calls):.2f} ms"))
                model.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"BERT for sequence classification: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"seq {args.seq}, batch {args.batch}, tp {args.tp} (torch {torch.__version__}, {os.cpu_count()} cores)"
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>10}")


if __name__ == "__main__":
    main()
