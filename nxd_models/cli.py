"""The `nxd` command."""

from __future__ import annotations

import argparse
import sys

import torch

from nxd_core.quantization import METHODS

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _convert(args) -> None:
    from .convert import convert

    dtype = DTYPES[args.dtype] if args.dtype else None
    manifest = convert(args.model, args.out, tp=args.tp, dtype=dtype, quantize=args.quantize, quantize_lm_head=args.quantize_lm_head)
    quantized = f", {args.quantize} weights" + (" (lm_head too)" if args.quantize_lm_head else "") if args.quantize else ""
    print(f"wrote {args.out}: tp={manifest['tp']}, {len(manifest['tensors'])} tensors{quantized}, save {manifest['save_id']}")


def _consolidate(args) -> None:
    from nxd_core.checkpoint import consolidate

    files = consolidate(args.checkpoint, args.out, max_shard_size=int(args.max_shard_gb * (1 << 30)))
    print(f"wrote {len(files)} file(s) to {args.out}")


def _reshard(args) -> None:
    from nxd_core.checkpoint import reshard

    from .convert import copy_side_files

    manifest = reshard(args.checkpoint, args.out, tp=args.tp)
    copy_side_files(args.checkpoint, args.out)
    print(f"wrote {args.out}: tp={manifest['tp']}")


def _generate(args) -> None:
    from .inputs import check_generation

    # Checked before any worker starts: a bad value is an error line, not a load and a traceback.
    check_generation(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    _check_positive(tp=args.tp, num_beams=args.num_beams, num_speculative_tokens=args.num_speculative_tokens, draft_tp=args.draft_tp)
    _check_positive(prompt_lookup_max_ngram=args.prompt_lookup_max_ngram)
    if args.prompt_lookup is not None:
        _check_positive(prompt_lookup=args.prompt_lookup)
    if args.prompt_lookup and args.draft:
        raise ValueError("--prompt-lookup proposes without a draft: give it or --draft, not both")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the prompt is not valid UTF-8 text: pass it as UTF-8 (check the terminal's or the file's encoding)") from None
    if not args.prompt:
        raise ValueError("the prompt is empty: give --prompt some text")

    dtype = DTYPES[args.dtype] if args.dtype else None
    with _start_workers_early(args.tp) as workers:
        _generate_on(workers, args, dtype)


def _start_workers_early(tp: int):
    """The workers start before this process imports the front end (transformers and the models):
    they import the model code as soon as they have joined their group, while this process imports
    its own (docs/startup.md)."""
    from nxd_core.workers import start_workers

    from . import WORKER_MODULES

    return start_workers(tp, preload=WORKER_MODULES)


def _generate_on(workers, args, dtype) -> None:
    from . import from_pretrained_parallel
    from .handles import ParallelEncoderModel, ParallelSeq2SeqModel

    with from_pretrained_parallel(
        args.model,
        tp=args.tp,
        dtype=dtype,
        max_seq_len=args.max_seq_len,
        max_batch_size=args.num_beams,
        quantize=args.quantize,
        quantize_lm_head=args.quantize_lm_head,
        workers=workers,
    ) as model:
        if isinstance(model, ParallelSeq2SeqModel):
            _generate_seq2seq(model, args)
            return
        if isinstance(model, ParallelEncoderModel):
            raise ValueError(f"{args.model} is an encoder ({model.config.model_type}), it does not generate: use `nxd classify`")
        if args.num_beams > 1:
            raise ValueError("--num-beams is for encoder-decoder models (T5); causal LMs decode greedily or by sampling")
        draft = None
        if args.draft:  # in the target's workers: a whole copy in each (--draft-tp 1) or sharded like the target
            draft = from_pretrained_parallel(args.draft, tp=args.draft_tp, dtype=dtype, max_seq_len=model.max_seq_len, workers=model.group)
        sampling = _sampling(args)
        sampling["compile"] = False if args.no_compile else None
        if draft is not None:
            sampling.update(draft_model=draft, num_speculative_tokens=args.num_speculative_tokens)
        if args.prompt_lookup:
            sampling.update(prompt_lookup_num_tokens=args.prompt_lookup, max_matching_ngram_size=args.prompt_lookup_max_ngram)
        print(args.prompt, end="", flush=True)
        stats: dict = {}
        for piece in model.stream(args.prompt, max_new_tokens=args.max_new_tokens, stats=stats, **sampling):
            print(piece, end="", flush=True)
        print()
        line = "[" + _timings(stats) + f", tp={args.tp}"
        if draft is not None or args.prompt_lookup:
            line += f", acceptance rate {stats.get('acceptance_rate', 0.0):.0%}, accepted per round {stats.get('accepted_histogram')}"
        print(line + "]", file=sys.stderr)


def _timings(stats: dict) -> str:
    """Where a generation's time went: the decode rate, the prefill, and compiling when it happened."""
    new, seconds = stats.get("new_tokens", 0), stats["seconds"]
    parts = [f"{new} tokens in {seconds:.2f}s: {new / seconds:.1f} tokens/s overall"]
    if "decode_tokens_per_second" in stats:
        parts.append(f"decode {stats['decode_tokens_per_second']:.1f} tokens/s")
    parts.append(f"prefill {stats['first_chunk_seconds']:.2f}s")
    if "compile_seconds" in stats:
        precompiled = ", precompiled" if stats.get("compile_precompiled") else ""
        parts.append(f"compile {stats['compile_seconds']:.2f}s (compile cache: {stats['compile_cache']}{precompiled})")
    return ", ".join(parts)


def _serve(args) -> None:
    from .serving.server import serve

    _check_positive(tp=args.tp, max_batch_size=args.max_batch_size)
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535] (0: any free port), got {args.port}")
    dtype = DTYPES[args.dtype] if args.dtype else None
    serve(
        args.model,
        tp=args.tp,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        host=args.host,
        port=args.port,
        dtype=dtype,
        compile=args.compile,
        max_waiting=args.max_waiting,
        served_name=args.served_model_name,
        quantize=args.quantize,
        quantize_lm_head=args.quantize_lm_head,
    )


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _sampling(args) -> dict:
    return dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _generate_seq2seq(model, args) -> None:
    """An encoder-decoder prints only the output (the prompt is its input, not its beginning)."""
    if args.draft or args.prompt_lookup:
        raise ValueError("--draft and --prompt-lookup (speculative decoding) are for causal LMs")
    stats: dict = {}
    if args.num_beams > 1:  # beam search knows its best output only at the end
        result = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
        print(result.texts[0])
        stats = result.stats
    else:
        for piece in model.stream(args.prompt, max_new_tokens=args.max_new_tokens, stats=stats, **_sampling(args)):
            print(piece, end="", flush=True)
        print()
    new = stats.get("new_tokens", 0)
    beams = f", {args.num_beams} beams" if args.num_beams > 1 else ""
    print(f"[{new} tokens in {stats['seconds']:.2f}s: {new / stats['seconds']:.1f} tokens/s, tp={args.tp}{beams}]", file=sys.stderr)


def _classify(args) -> None:
    from . import from_pretrained_parallel
    from .handles import ParallelEncoderModel

    _check_positive(tp=args.tp)
    if args.text_pair and len(args.text_pair) != len(args.text):
        raise ValueError(f"give one --text-pair per --text ({len(args.text)} texts, {len(args.text_pair)} pairs)")
    with from_pretrained_parallel(args.model, tp=args.tp, max_batch_size=len(args.text)) as model:
        if not isinstance(model, ParallelEncoderModel):
            raise ValueError(f"{args.model} is not an encoder classifier (BERT); use `nxd generate` for generative models")
        results = model.classify(args.text, args.text_pair)
    for i, result in enumerate(results):
        pair = f" | {args.text_pair[i]}" if args.text_pair else ""
        probabilities = ", ".join(f"{label}={p:.4f}" for label, p in result["probabilities"].items())
        print(f"{args.text[i]}{pair}\t{result['label']}\t{probabilities}")


def _list(args) -> None:
    from .registry import MODELS

    width = max(len(name) for name in MODELS)
    for name in sorted(MODELS):
        entry = MODELS[name]
        print(f"{name:{width}s} {entry.family:9s} {entry.repo_id or '(bundled)':44s} {entry.description}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nxd", description="nxd-zoo: tensor parallel models on plain PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="a Hugging Face checkpoint (directory, repo id or zoo name) -> sharded for tp=N")
    p.add_argument("model")
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep the checkpoint's)")
    p.add_argument("--quantize", choices=METHODS, help="save the linears' weights quantized (int8: per output channel)")
    p.add_argument("--quantize-lm-head", action="store_true", help="quantize the lm_head too (it stays in the model's dtype by default)")
    p.set_defaults(run=_convert)

    p = commands.add_parser("consolidate", help="a sharded checkpoint -> one full safetensors checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="split the output above this size (HF style)")
    p.set_defaults(run=_consolidate)

    p = commands.add_parser("reshard", help="a sharded checkpoint at tp=a -> tp=b")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--tp", type=int, required=True)
    p.set_defaults(run=_reshard)

    p = commands.add_parser("generate", help="stream a completion of a prompt, then print tokens/s")
    p.add_argument("model", help="zoo name, HF repo id, or local directory")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default: the model's maximum)")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--quantize", choices=METHODS, help="quantize the weights while loading (int8)")
    p.add_argument("--quantize-lm-head", action="store_true", help="quantize the lm_head too (it stays in the model's dtype by default)")
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="decode eagerly (by default decoding switches to torch.compile mid-generation where the tokens left repay compiling)",
    )
    p.add_argument("--draft", help="a smaller model with the same tokenizer, for speculative decoding")
    p.add_argument(
        "--draft-tp",
        type=int,
        default=1,
        help="1 (default): a whole copy of the draft in every worker, no collectives in its steps; "
        "or the target's --tp to shard it too (for drafts too big to copy)",
    )
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="K",
        help="speculate without a draft: propose up to K tokens that followed the last n-gram earlier in the text",
    )
    p.add_argument("--prompt-lookup-max-ngram", type=int, default=2, metavar="N", help="the longest n-gram matched (default 2)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search (encoder-decoders such as T5)")
    p.set_defaults(run=_generate)

    p = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("model", help="zoo name, HF repo id, or local directory (a causal LM)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (KV-cache rows)")
    p.add_argument("--max-seq-len", type=int, default=None, help="prompt + completion tokens per request (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the log says which)")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--quantize", choices=METHODS, help="quantize the weights while loading (int8)")
    p.add_argument("--quantize-lm-head", action="store_true", help="quantize the lm_head too (it stays in the model's dtype by default)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile the decode step before serving (default; once per machine: later starts load it from the compile cache)",
    )
    p.add_argument("--max-waiting", type=int, default=256, help="requests queued beyond the rows; more get 429")
    p.add_argument("--served-model-name", help="the `model` clients send (default: the directory's name, or MODEL as typed)")
    p.set_defaults(run=_serve)

    p = commands.add_parser("classify", help="label texts (or text pairs) with a sequence classifier such as BERT")
    p.add_argument("model", help="zoo name, HF repo id, or local directory")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--text", action="append", required=True, help="a text to classify (repeat for a batch)")
    p.add_argument("--text-pair", action="append", help="the second text of a pair (one per --text)")
    p.set_defaults(run=_classify)

    p = commands.add_parser("list", help="the zoo's model names")
    p.set_defaults(run=_list)
    return parser


def _expected_errors() -> tuple:
    """What bad input or a bad file raises: reported as one line (a traceback is for our bugs)."""
    from safetensors import SafetensorError

    return (ValueError, OSError, KeyError, RuntimeError, SafetensorError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except _expected_errors() as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"nxd {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nxd {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
