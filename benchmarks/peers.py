"""Decode speed side by side with llama.cpp, HF and ours, on the same random weights in the same run.

    python benchmarks/peers.py --layout 1b --threads 2 --llama-python /tmp/llvenv/bin/python
    python benchmarks/peers.py --quick             # tiny layout, few tokens, ours eager only (the test suite)

llama.cpp runs through llama-cpp-python, in the interpreter --llama-python names (default: this
one), so it can live in its own virtual environment: `pip install nxd-zoo[bench]` or
`python -m venv /tmp/llvenv && CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llvenv/bin/pip install llama-cpp-python`
(it builds llama.cpp from source, ~5 min on 2 cores). The random HF checkpoint is converted to GGUF
(bf16 and q8_0) by llama.cpp's own convert_hf_to_gguf.py: from --llama-cpp-dir, or else from the
llama-cpp-python sdist of the installed version, downloaded once by pip into ~/.cache/nxd-zoo. It
runs in this interpreter (it needs torch, transformers and sentencepiece, which nxd-zoo has) and
needs a tokenizer: the checkpoint gets a tiny sentencepiece model (the converter pads the vocabulary).
Where llama-cpp-python is not installed, this says so and measures the rest.

Every rate is decode tokens/s with the prompt's prefill left out (best of --repeats runs, and of --rounds
rounds: each round runs every engine once, llama.cpp and ours in turn, and the per-round ratios are printed). The roofline is the
memory read bandwidth measured here (generate.memory_bandwidth, on --threads threads, before the first round
and after each: the fastest) over the bytes a token reads in that format (one embedding row, not
the table).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from nxd_core.cpu_kernels import path_support

sys.path.insert(0, str(Path(__file__).parent))
import generate  # noqa: E402
from generate import GB, hf_decode_rate, kernel_path, memory_bandwidth, ours  # noqa: E402
from quant import bytes_read_per_token  # noqa: E402
from random_checkpoint import LAYOUTS, decode_bytes_per_token, write_random_llama  # noqa: E402

CACHE = Path.home() / ".cache" / "nxd-zoo"

# Run in --llama-python: decode tokens/s of a GGUF file (prefill left out, best of REPEATS), and the bytes
# a token reads (all tensors but the embedding table, plus one of its rows).
LLAMA_RUN = r"""
import json, sys, time
import numpy as np
import llama_cpp
from gguf import GGUFReader
path, threads, prompt_tokens, new_tokens, repeats = sys.argv[1], *map(int, sys.argv[2:6])
tensors = {t.name: (int(t.n_bytes), int(t.shape[-1])) for t in GGUFReader(path).tensors}
embedding, rows = tensors["token_embd.weight"]
read = sum(n for n, _ in tensors.values()) - embedding + embedding // rows
slots = prompt_tokens + new_tokens + 8
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=slots, n_batch=slots, verbose=False)
prompt = [int(t) for t in np.random.default_rng(0).integers(3, llm.n_vocab(), prompt_tokens)]
best = float("inf")
for _ in range(repeats):
    llm.reset()
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(new_tokens - 1):  # greedy, as the others
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    best = min(best, time.perf_counter() - start)
print(json.dumps(dict(rate=(new_tokens - 1) / best, read=read, version=llama_cpp.__version__)))
"""


def measured(label: str, rate: float, read: int) -> tuple:
    """A row, printed as soon as it is measured (a long run keeps what it has); the table follows."""
    print(f"measured: {label} {rate:.1f} tokens/s (load average {os.getloadavg()[0]:.2f})", flush=True)
    return label, rate, read


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def llama_cpp_version(python: str) -> str | None:
    """llama-cpp-python's version in that interpreter, or None where it is not installed."""
    code = "import llama_cpp, gguf; print(llama_cpp.__version__)"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def converter_dir(python: str, version: str, given: str | None) -> Path:
    """A llama.cpp directory holding convert_hf_to_gguf.py (and its gguf-py and conversion/), the
    given one or the installed version's sdist, fetched once by pip."""
    if given:
        return Path(given)
    target = CACHE / f"llama.cpp-{version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as download:
        pip = [python, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps", "--no-binary", ":all:", "-d", download]
        subprocess.run(pip, check=True, capture_output=True)
        (sdist,) = Path(download).glob("llama_cpp_python-*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and member.isfile() and name.startswith(wanted):
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    (target / name).write_bytes(tar.extractfile(member).read())
    return target


def add_tokenizer(path: Path) -> None:
    """A tiny sentencepiece tokenizer.model (the converter needs one; it pads the vocabulary)."""
    import sentencepiece

    text = (f"the quick brown fox jumps over the lazy dog {i}" for i in range(200))
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=text, model_writer=model, vocab_size=40, hard_vocab_limit=False, minloglevel=2
    )
    (path / "tokenizer.model").write_bytes(model.getvalue())


def llama_cpp_models(args, path: Path, work: Path) -> list[tuple[str, Path]]:
    """(label, GGUF file) for bf16 and q8_0, converted once by llama.cpp's converter; [] without llama.cpp."""
    version = llama_cpp_version(args.llama_python)
    if version is None:
        print(f"llama.cpp: not measured, llama-cpp-python (and gguf) are not installed in {args.llama_python} (see --help)\n")
        return []
    source = converter_dir(args.llama_python, version, args.llama_cpp_dir)
    add_tokenizer(path)
    models = []
    for outtype in ("bf16", "q8_0"):
        gguf = work / f"model-{outtype}.gguf"
        convert = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(path), "--outtype", outtype, "--outfile", str(gguf)]
        subprocess.run(convert, check=True, capture_output=True)
        models.append((f"llama.cpp {version} {outtype}", gguf))
    return models


def llama_cpp_rate(args, gguf: Path, threads: int) -> tuple[float, int]:
    """(decode tokens/s, bytes a token reads) of one GGUF file, in a fresh llama.cpp process."""
    run = [
        args.llama_python,
        "-c",
        LLAMA_RUN,
        str(gguf),
        str(threads),
        str(args.prompt_tokens),
        str(args.new_tokens),
        str(generate.REPEATS),
    ]
    done = subprocess.run(run, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["rate"], result["read"]


@contextlib.contextmanager
def ours_models(path: Path, args, threads: int, honest_bf16: int):
    """(label, model, compile, bytes a token reads) for ours: bf16 eager and compiled, int8 compiled,
    loaded once into one worker group for every round."""
    from nxd_core import int8_kernels
    from nxd_core.workers import WorkerGroup
    from nxd_models import from_pretrained_parallel

    slots = args.prompt_tokens + args.new_tokens + 1
    int8_kernels.prepare()
    with WorkerGroup(1, threads_per_worker=threads) as group:
        runs = []
        for method in (None, "int8"):
            load = dict(tp=1, dtype=torch.bfloat16, max_seq_len=slots, workers=group, progress=False, quantize=method)
            model = from_pretrained_parallel(path, **load)
            # bf16: the checkpoint's bytes, one embedding row; int8: the rank's tensors without the table
            read = honest_bf16 if method is None else max(group.run(bytes_read_per_token, model.key))
            label = f"ours bf16 ({kernel_path()})" if method is None else f"ours int8 ({int8_kernels.isa() or 'fallback'})"
            modes = (False,) if args.quick else (False, True) if method is None else (True,)
            runs += [(f"{label}, {'compiled' if compile else 'eager'}", model, compile, read) for compile in modes]
        yield runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="1b")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--llama-python", default=sys.executable, help="the interpreter with llama-cpp-python and gguf")
    parser.add_argument("--llama-cpp-dir", help="a llama.cpp source tree (convert_hf_to_gguf.py), instead of the sdist")
    parser.add_argument("--repeats", type=int, default=generate.REPEATS, help="runs per measurement; the best is kept")
    parser.add_argument("--rounds", type=int, default=1, help="times through every engine, alternating; the best is kept")
    parser.add_argument("--no-hf", action="store_true", help="leave out HF generate")
    parser.add_argument("--quick", action="store_true", help="tiny layout, 8 new tokens, ours eager only (a smoke test)")
    parser.add_argument("--workdir", help="where to put the checkpoints (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.quick:
        args.layout, args.new_tokens, args.prompt_tokens = "tiny", 8, 8
    torch.set_num_threads(args.threads)
    generate.REPEATS = args.repeats  # ours() and hf_decode_rate() read it
    work = Path(tempfile.mkdtemp(prefix="nxd-peers-bench-", dir=args.workdir))
    try:
        path = work / "model"
        weight_bytes = write_random_llama(path, args.layout)
        honest = decode_bytes_per_token(args.layout, weight_bytes, whole_embedding=False)
        whole = decode_bytes_per_token(args.layout, weight_bytes)
        vocab = LAYOUTS[args.layout]["vocab_size"]
        prompt = torch.randint(3, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        print(
            f"{cpu_name()}, bf16 kernel path {kernel_path()} ({', '.join(f'{k}: {v}' for k, v in path_support().items())})\n"
            f"layout {args.layout} ({weight_bytes / GB:.2f} GB bf16), {args.threads} threads, prompt {args.prompt_tokens} tokens, "
            f"{args.new_tokens} new tokens, greedy; load average {os.getloadavg()[0]:.2f}"
        )
        probes = [memory_bandwidth()]  # once more in every round: the fastest read is the roofline
        # Rounds alternate llama.cpp and ours, so a shared machine's slow and fast spells fall on both.
        ggufs = llama_cpp_models(args, path, work)
        rounds: list[dict] = []
        with ours_models(path, args, args.threads, honest) as runs:
            for number in range(args.rounds):
                this = {label: llama_cpp_rate(args, gguf, args.threads) for label, gguf in ggufs}
                if not args.no_hf and number == 0:
                    this["HF generate bf16 (eager)"] = (hf_decode_rate(path, prompt, args.new_tokens), honest)
                for label, model, compile, read in runs:
                    this[label] = (ours(model, prompt, args.new_tokens, compile=compile)["decode_tokens_per_second"], read)
                for label, (rate, read) in this.items():
                    measured(f"{label} (round {number + 1})", rate, read)
                rounds.append(this)
                probes.append(memory_bandwidth())
        bandwidth = max(probes)
        print(
            f"\nmemory read bandwidth {bandwidth / GB:.1f} GB/s, the fastest of {len(probes)} probes ({' '.join(f'{p / GB:.1f}' for p in probes)}; "
            f"{args.threads} threads); bf16 roofline {bandwidth / honest:.1f} tokens/s ({honest / GB:.3f} GB per token: one embedding row), "
            f"{bandwidth / whole:.1f} counting the whole table\n"
        )
        rows = [(label, max(r[label][0] for r in rounds if label in r), read) for label, (_, read) in rounds[0].items()]
        base = rows[0][1]
        print(
            f"{'decode (prefill left out)':44s} {'tokens/s':>9s} {'vs ' + rows[0][0].split(' (')[0]:>28s} {'GB/token':>9s} {'of roofline':>12s}"
        )
        for label, rate, read in rows:
            print(f"{label:44s} {rate:9.1f} {rate / base:27.2f}x {read / GB:9.3f} {rate * read / bandwidth:11.0%}")
        if len(rounds) > 1:
            first = rows[0][0]
            print(f"\neach round's rate over {first} in the same round:")
            for label, _, _ in rows[1:]:
                ratios = [r[label][0] / r[first][0] for r in rounds if label in r]
                print(f"  {label:44s} " + " ".join(f"{v:.2f}x" for v in ratios))
        print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
