"""Train the bundled demo Llama pair (a target and a speculative-decoding draft).

Both models are Hugging Face `LlamaForCausalLM`s trained from scratch with plain
PyTorch on the Python standard library's own source files (CPython, PSF license),
which ship with every interpreter, so no download is needed. The steps:

1. train a sentencepiece BPE tokenizer on the training files (byte fallback, so
   any text encodes; whitespace kept, so indentation survives a round trip) and
   wrap it as a transformers LlamaTokenizer;
2. train the target, then the draft (same tokenizer), with AdamW and a cosine
   schedule in fp32, each for a time budget (--target-minutes / --draft-minutes)
   or an exact number of steps (--steps);
3. save both as bf16 safetensors with a generation config and identical
   tokenizer files, and report validation loss, the draft's greedy agreement
   with the target and a few greedy samples.

The default output is the package's own nxd_models/demo_models/. `--models large`
trains only demo-llama-large (a bigger target for the same draft, on the pair's
tokenizer). A quick smoke run into another directory:

    python scripts/train_demo_models.py --steps 2 --tokenizer-vocab 400 \\
        --max-files 12 --val-files 2 --context 64 --eval-windows 2 --out OUT
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "nxd_models" / "demo_models"
TARGET_NAME, DRAFT_NAME, LARGE_NAME = "demo-llama", "demo-llama-draft", "demo-llama-large"

# Head counts divide by 2 and 4 so both run at tp=2 and tp=4.
TARGET_ARCH = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=8, num_key_value_heads=4)
DRAFT_ARCH = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=384, num_attention_heads=4, num_key_value_heads=4)
# The speculative-decoding target (--models large): about 3x demo-llama's weights and twice its
# layers, so that a draft step costs a small fraction of a target step (what makes drafting pay).
LARGE_ARCH = dict(hidden_size=384, num_hidden_layers=8, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4)

# Generated tables, English prose and test suites say little about everyday Python.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "__pycache__"}
UNK, BOS, EOS, PAD = 0, 1, 2, 3
SAMPLE_PROMPTS = ["def ", "import os\n", "class Foo:\n    def __init__(self"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="parent of the two model directories")
    p.add_argument("--target-minutes", type=float, default=34.0, help="training time budget of the target")
    p.add_argument("--draft-minutes", type=float, default=10.0, help="training time budget of the draft")
    p.add_argument(
        "--models",
        choices=["pair", "large"],
        default="pair",
        help="pair: the tokenizer, demo-llama and its draft; large: only demo-llama-large, with the pair's tokenizer from --out",
    )
    p.add_argument("--large-minutes", type=float, default=45.0, help="training time budget of demo-llama-large")
    p.add_argument("--large-lr", type=float, default=8e-4)
    p.add_argument("--steps", type=int, default=None, help="exact optimizer steps per model (overrides the minutes)")
    p.add_argument("--tokenizer-vocab", type=int, default=4096)
    p.add_argument("--context", type=int, default=512, help="training context = max_position_embeddings")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--target-lr", type=float, default=1e-3)
    p.add_argument("--draft-lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--max-files", type=int, default=None, help="use only this many stdlib files (quick runs)")
    p.add_argument("--val-files", type=int, default=8, help="stdlib files held out for validation")
    p.add_argument("--eval-windows", type=int, default=32, help="validation windows of --context tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


# ---------------------------------------------------------------- corpus


def stdlib_files(max_files: int | None, seed: int) -> list[Path]:
    """The standard library's .py files (no tests), in a seeded but machine-independent order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and not p.name.startswith("test_")
    )
    random.Random(seed).shuffle(files)
    return files[:max_files] if max_files else files


def read_texts(files: list[Path]) -> list[str]:
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:  # a few legacy files use other encodings; not worth handling
            pass
    return texts


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, context: int, seed: int) -> tuple[LlamaTokenizer, bytes]:
    """A sentencepiece BPE over the code, wrapped as a LlamaTokenizer; returns it and tokenizer.model's bytes."""
    # Sentences of a few lines each, so that newline is an ordinary piece that can merge ("):\n").
    lines = [line for text in texts for line in text.split("\n")]
    chunks = ["\n".join(lines[i : i + 8]) for i in range(0, len(lines), 8)]
    random.Random(seed).shuffle(chunks)
    spm.set_random_generator_seed(seed)  # the trainer samples sentences
    model = tempfile.SpooledTemporaryFile()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,  # any text encodes, unseen characters as bytes
        # Keep spaces as they are: runs of indentation become whole pieces and round-trip.
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        split_digits=True,
        character_coverage=0.9995,
        hard_vocab_limit=False,
        input_sentence_size=400_000,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=PAD,
        max_sentence_length=16384,
        num_threads=1,
        minloglevel=2,
    )
    model.seek(0)
    proto = model.read()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tokenizer.model").write_bytes(proto)
        tok = LlamaTokenizer.from_pretrained(d, add_prefix_space=False, legacy=False, pad_token="<pad>", model_max_length=context)
    return tok, proto


def check_round_trip(tok: LlamaTokenizer) -> None:
    code = 'class Foo:\n    def __init__(self, x=12):\n\tself.x = {"k": [x, 3.5]}  # café\n\n'
    decoded = tok.decode(tok(code).input_ids, skip_special_tokens=True)
    if decoded != code:
        raise RuntimeError(f"tokenizer does not round-trip code: {decoded!r}")


def encode_corpus(tok: LlamaTokenizer, texts: list[str]) -> torch.Tensor:
    """One long stream of <s> file </s> documents."""
    ids = []
    for text in texts:
        ids += [BOS] + tok(text, add_special_tokens=False, verbose=False).input_ids + [EOS]
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- models


def make_model(arch: dict, vocab_size: int, context: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=context,
        rope_theta=10000.0,
        tie_word_embeddings=False,  # the output head is the same cost either way; untied trains better
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        **arch,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_batch(ids: torch.Tensor, batch: int, context: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - context - 1, (batch,), generator=gen)
    return torch.stack([ids[s : s + context + 1] for s in starts.tolist()])


def val_windows(ids: torch.Tensor, context: int, n: int) -> torch.Tensor:
    """Non-overlapping windows spread evenly over the held-out stream (the same ones every time)."""
    n = max(1, min(n, (len(ids) - 1) // (context + 1)))
    stride = (len(ids) - context - 1) // n
    return torch.stack([ids[i * stride : i * stride + context + 1] for i in range(n)])


def lm_loss(model: LlamaForCausalLM, window: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=window[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, windows: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [lm_loss(model, windows[i : i + batch]).item() * len(windows[i : i + batch]) for i in range(0, len(windows), batch)]
    model.train()
    return sum(losses) / len(windows)


def lr_factor(progress: float, step: int, warmup: int) -> float:
    """Linear warmup, then cosine from 1 down to 0.1 over progress in [0, 1]."""
    warm = min(1.0, (step + 1) / warmup)
    return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(model, train_ids, windows, args, lr: float, minutes: float, name: str) -> float:
    """AdamW in fp32 for --steps steps or `minutes`; the cosine follows step or time progress."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed + 1)
    budget = minutes * 60
    start = time.time()
    step = 0
    model.train()
    while True:
        elapsed = time.time() - start
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(progress, step, args.warmup_steps)
        loss = lm_loss(model, random_batch(train_ids, args.batch_size, args.context, gen))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 50 == 0:
            print(f"  {name} step {step} loss {loss.item():.3f} ({elapsed / 60:.1f} min)", flush=True)
    print(f"  {name}: {step} steps in {(time.time() - start) / 60:.1f} min", flush=True)
    return evaluate(model, windows, args.batch_size)


def report(name: str, model, loss: float, when: str) -> None:
    print(
        f"{name} ({count_params(model) / 1e6:.2f}M params) validation loss {when}: {loss:.3f} (perplexity {math.exp(loss):.1f})", flush=True
    )


@torch.no_grad()
def greedy_acceptance(target, draft, windows: torch.Tensor, batch: int) -> float:
    """How often the draft's greedy next token equals the target's, over held-out positions."""
    target.eval(), draft.eval()
    same = total = 0
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch, :-1]
        same += (target(input_ids=x).logits.argmax(-1) == draft(input_ids=x).logits.argmax(-1)).sum().item()
        total += x.numel()
    return same / total


@torch.no_grad()
def sample(model, tok, prompt: str, new_tokens: int = 48) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


def save(model, tok, proto: bytes, out_dir: Path) -> None:
    """bf16 safetensors, a greedy generation config and the tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    model.float()
    tok.save_pretrained(out_dir)
    (out_dir / "tokenizer.model").write_bytes(proto)


def copy_tokenizer(src: Path, dst: Path) -> None:
    """The draft gets byte-identical tokenizer files (save_pretrained twice need not agree)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)


def train_large(args, train_texts: list[str], val_texts: list[str]) -> None:
    """demo-llama-large: a bigger target for the bundled draft, on the pair's own tokenizer (the
    same token ids), then the draft's and demo-llama's greedy agreement with it."""
    pair = args.out / TARGET_NAME
    tok = LlamaTokenizer.from_pretrained(pair, add_prefix_space=False, legacy=False, pad_token="<pad>", model_max_length=args.context)
    proto = (pair / "tokenizer.model").read_bytes()
    train_ids, val_ids = encode_corpus(tok, train_texts), encode_corpus(tok, val_texts)
    windows = val_windows(val_ids, args.context, args.eval_windows)
    print(f"tokenizer of {pair}: {len(tok)} pieces; {len(train_ids):,} train / {len(val_ids):,} validation tokens", flush=True)
    model = make_model(LARGE_ARCH, len(tok), args.context, args.seed)
    report(LARGE_NAME, model, evaluate(model, windows, args.batch_size), "before")
    report(LARGE_NAME, model, train(model, train_ids, windows, args, args.large_lr, args.large_minutes, LARGE_NAME), "after")
    save(model, tok, proto, args.out / LARGE_NAME)
    copy_tokenizer(pair, args.out / LARGE_NAME)
    for name in (DRAFT_NAME, TARGET_NAME):
        other = LlamaForCausalLM.from_pretrained(args.out / name, dtype=torch.float32)
        rate = greedy_acceptance(model, other, windows, args.batch_size)
        print(f"greedy acceptance of {name} against {LARGE_NAME} (argmax equal on validation): {rate:.3f}", flush=True)
    for prompt in SAMPLE_PROMPTS:
        print(f"--- {LARGE_NAME} greedy from {prompt!r}:\n{sample(model, tok, prompt)}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    files = stdlib_files(args.max_files, args.seed)
    val_texts, train_texts = read_texts(files[: args.val_files]), read_texts(files[args.val_files :])
    print(f"corpus: {len(train_texts)} train / {len(val_texts)} validation stdlib files from {sysconfig.get_paths()['stdlib']}", flush=True)

    if args.models == "large":
        return train_large(args, train_texts, val_texts)
    tok, proto = train_tokenizer(train_texts, args.tokenizer_vocab, args.context, args.seed)
    check_round_trip(tok)
    train_ids, val_ids = encode_corpus(tok, train_texts), encode_corpus(tok, val_texts)
    windows = val_windows(val_ids, args.context, args.eval_windows)
    print(
        f"tokenizer: {len(tok)} pieces; {len(train_ids):,} train / {len(val_ids):,} validation tokens; "
        f"uniform loss {math.log(len(tok)):.3f}",
        flush=True,
    )

    dirs = {TARGET_NAME: args.out / TARGET_NAME, DRAFT_NAME: args.out / DRAFT_NAME}
    models = {}
    for name, arch, lr, minutes in [
        (TARGET_NAME, TARGET_ARCH, args.target_lr, args.target_minutes),
        (DRAFT_NAME, DRAFT_ARCH, args.draft_lr, args.draft_minutes),
    ]:
        model = make_model(arch, len(tok), args.context, args.seed)
        report(name, model, evaluate(model, windows, args.batch_size), "before")
        report(name, model, train(model, train_ids, windows, args, lr, minutes, name), "after")
        save(model, tok, proto, dirs[name])
        models[name] = model
    copy_tokenizer(dirs[TARGET_NAME], dirs[DRAFT_NAME])

    rate = greedy_acceptance(models[TARGET_NAME], models[DRAFT_NAME], windows, args.batch_size)
    print(f"greedy acceptance (draft argmax == target argmax on validation): {rate:.3f}")
    for name, model in models.items():
        for prompt in SAMPLE_PROMPTS:
            print(f"--- {name} greedy from {prompt!r}:\n{sample(model, tok, prompt)}", flush=True)


if __name__ == "__main__":
    main()
