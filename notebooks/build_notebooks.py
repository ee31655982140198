"""Writes the tutorial notebooks of this folder from the cell sources below (without outputs).

    python notebooks/build_notebooks.py

Edit the notebooks here, not in Jupyter: zoo_tests/test_notebooks.py checks that the .ipynb files
equal what this script writes, and executes each of them top to bottom.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


def parameters(text: str):
    cell = code(text)
    cell.metadata["tags"] = ["parameters"]
    return cell


# -- 01: the tensor parallel core --------------------------------------------------------------------

TP_CORE = [
    md("""
# A tour of the tensor parallel core (`nxd_core`)

This notebook walks through the pieces every model in the zoo is built from:

1. `parallel_state`: the tensor parallel (TP) group a process belongs to;
2. `ColumnParallelLinear`, `RowParallelLinear` and `ParallelEmbedding`, compared with the `torch.nn`
   layers they replace, on a group of `TP` worker processes;
3. the sharding spec every parallel parameter carries, and the one function that slices a full tensor;
4. sharded checkpoints: `save`, `load`, `consolidate` (back to one file) and `reshard` (to another tp).

Everything runs on CPU with `gloo`. The parameter cell below picks the number of worker processes.
"""),
    parameters("""
TP = 2  # tensor parallel degree: the number of worker processes (4 or 8 work too, but slower on a small CPU)
"""),
    code("""
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from nxd_core import checkpoint, parallel_state
from nxd_core.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from nxd_core.sharding import shard_tensor, sharding_specs
from nxd_core.workers import WorkerGroup
"""),
    md("""
## Layers at tp=1: no process group needed

The notebook's own process has no process group, so it is a TP group of one. Parallel layers work there,
keep `torch.nn`'s parameter names and shapes, and draw the same weights under the same seed.
"""),
    code("""
print("tp size in this process:", parallel_state.get_tensor_model_parallel_size())

torch.manual_seed(0)
reference = nn.Linear(16, 32)
torch.manual_seed(0)
column = ColumnParallelLinear(16, 32)
x = torch.randn(4, 16)
print(column)
print([name for name, _ in column.named_parameters()], tuple(column.weight.shape))
assert torch.allclose(column(x), reference(x))
"""),
    md("""
## A group of TP worker processes

`WorkerGroup(TP)` starts `TP` processes that form one process group and one TP group. `group.run(fn, ...)`
calls `fn` on every rank and returns one result per rank. Functions defined in a notebook cell travel to the
workers with cloudpickle: no `if __name__ == "__main__"` guard, no `torchrun`.
"""),
    code("""
group = WorkerGroup(TP)


def whoami():
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()


print(group)
print("(rank, tp) per worker:", group.run(whoami))
"""),
    md("""
## Parallel layers against `torch.nn`

Each worker builds the parallel layers under the same seed and runs them on the same inputs:

- `ColumnParallelLinear` splits the output features (weight rows); `gather_output=True` all-gathers the result;
- `RowParallelLinear` splits the input features (weight columns) and sums the partial products (all-reduce);
- `ParallelEmbedding` splits the vocabulary: each rank looks up the ids in its range and the lookups are summed;
- the Megatron MLP: a column layer that keeps its output split (`gather_output=False`) feeding a row layer
  that takes split input (`input_is_parallel=True`): one all-reduce for the whole block.

The notebook builds the `torch.nn` layers under the same seed and compares.
"""),
    code("""
def parallel_outputs(x, ids, seed=0):
    torch.manual_seed(seed)
    column = ColumnParallelLinear(16, 32, gather_output=True)
    row = RowParallelLinear(32, 16, input_is_parallel=False)
    embedding = ParallelEmbedding(64, 16)
    up = ColumnParallelLinear(16, 64, gather_output=False)
    down = RowParallelLinear(64, 16, input_is_parallel=True)
    with torch.no_grad():
        return {
            "local shapes": {
                "column.weight": tuple(column.weight.shape), "row.weight": tuple(row.weight.shape),
                "embedding.weight": tuple(embedding.weight.shape), "up.weight": tuple(up.weight.shape),
            },
            "column": column(x),
            "row": row(column(x)),
            "embedding": embedding(ids),
            "mlp": down(torch.nn.functional.gelu(up(x))),
        }


x = torch.randn(4, 16)
ids = torch.randint(0, 64, (2, 5))
per_rank = group.run(parallel_outputs, x, ids)

torch.manual_seed(0)  # the same draws, in the same order, with torch.nn
column, row, embedding = nn.Linear(16, 32), nn.Linear(32, 16), nn.Embedding(64, 16)
up, down = nn.Linear(16, 64), nn.Linear(64, 16)
with torch.no_grad():
    expected = {
        "column": column(x), "row": row(column(x)), "embedding": embedding(ids),
        "mlp": down(torch.nn.functional.gelu(up(x))),
    }

for rank, outputs in enumerate(per_rank):
    print(f"rank {rank}:", outputs["local shapes"])
    for name, want in expected.items():
        assert torch.allclose(outputs[name], want, atol=1e-5), (rank, name)
print("every rank's outputs equal torch.nn's:", list(expected))
"""),
    md("""
## Sizes that tp does not divide

A size that `TP` does not divide is a clear error naming the remedy; `pad=True` zero-pads the split dim instead
(vocabularies, MLP widths), and padding never changes an output.
"""),
    code("""
def odd_sizes(x):
    message = "33 is divisible by this tp"
    try:
        ColumnParallelLinear(16, 33)
    except ValueError as error:
        message = str(error)
    torch.manual_seed(0)
    padded = ColumnParallelLinear(16, 33, pad=True)
    with torch.no_grad():
        return message, tuple(padded.weight.shape), padded(x)


message, local_shape, out = group.run(odd_sizes, x)[0]
print(message)
print("with pad=True, rank 0 holds", local_shape)
torch.manual_seed(0)
with torch.no_grad():
    assert torch.allclose(out, nn.Linear(16, 33)(x), atol=1e-5)
"""),
    md("""
## Sharding is data on the parameter

Every sharded parameter carries a `ShardSpec` (the split dim, the full size, tp, padding).
`sharding_specs(module)` lists them; replicated tensors (the row layer's bias) have none.
One function, `shard_tensor(full, spec, rank)`, turns a full tensor into rank `r`'s piece: loading unsharded
checkpoints, conversion from Hugging Face, consolidation and resharding all go through it. Here the notebook
slices the full `torch.nn` weights itself and finds exactly what each worker holds.
"""),
    code("""
def mlp_state(seed=0):
    torch.manual_seed(seed)
    up = ColumnParallelLinear(16, 64, gather_output=False)
    down = RowParallelLinear(64, 16, input_is_parallel=True)
    layers = nn.ModuleDict({"up": up, "down": down})
    return sharding_specs(layers), {name: t.clone() for name, t in layers.state_dict().items()}


states = group.run(mlp_state)
for name, spec in states[0][0].items():
    print(f"{name:12s} {spec}")

torch.manual_seed(0)
full = nn.ModuleDict({"up": nn.Linear(16, 64), "down": nn.Linear(64, 16)}).state_dict()
for rank, (specs, tensors) in enumerate(states):
    for name, spec in specs.items():
        piece = full[name] if spec is None else shard_tensor(full[name], spec, rank)
        assert torch.equal(piece, tensors[name]), (rank, name)
print("shard_tensor(full, spec, rank) == what each rank holds")
"""),
    md("""
## Sharded checkpoints: save, load, consolidate, reshard

`checkpoint.save({"model": state_dict, ...}, folder)` is called on every rank: each rank writes its own
safetensors file under `tp_rank_XX/`, and a manifest (written last, atomically) records the layout and
checksums. Entries other than tensors (an epoch counter here) are kept as JSON. Nothing is pickled.
"""),
    code("""
workdir = Path(tempfile.mkdtemp(prefix="nxd-tour-"))  # removed at the end of the notebook


def build_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        ColumnParallelLinear(16, 64, gather_output=False), nn.GELU(), RowParallelLinear(64, 16, input_is_parallel=True)
    )


def save_mlp(folder):
    checkpoint.save({"model": build_mlp(seed=0).state_dict(), "epoch": 3}, folder)


group.run(save_mlp, str(workdir / "mlp-tp"))
for path in sorted((workdir / "mlp-tp").rglob("*")):
    if path.is_file():
        print(path.relative_to(workdir), path.stat().st_size, "bytes")
"""),
    md("""
`load(folder, model)` on every rank reads only that rank's file (checked against the manifest) into a model
built with other weights, and returns the rest of the saved dict. The loaded MLP equals `torch.nn`'s.
"""),
    code("""
def load_and_run(folder, x, sharded=True):
    mlp = build_mlp(seed=1)  # other weights: the load must replace them
    extra = checkpoint.load(folder, mlp, sharded=sharded)
    with torch.no_grad():
        return mlp(x), extra


torch.manual_seed(0)
reference = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
with torch.no_grad():
    want = reference(x)

outputs = group.run(load_and_run, str(workdir / "mlp-tp"), x)
print("extra entries:", outputs[0][1])
assert outputs[0][1] == {"epoch": 3}
assert all(torch.allclose(out, want, atol=1e-5) for out, _ in outputs)
"""),
    md("""
`consolidate` merges the shards into one full safetensors checkpoint (Hugging Face style, split into several
files for big models), one tensor in memory at a time. It runs in the notebook's process: no workers needed.
The consolidated weights are exactly the original ones.
"""),
    code("""
files = checkpoint.consolidate(workdir / "mlp-tp", workdir / "mlp-full")
consolidated = load_file(files[0])
original = reference.state_dict()
print({name: tuple(t.shape) for name, t in consolidated.items()})
assert consolidated.keys() == original.keys()
assert all(torch.equal(consolidated[name], original[name]) for name in original)

# An unsharded checkpoint loads into the parallel model too: each rank reads only its slices.
outputs = group.run(load_and_run, str(workdir / "mlp-full"), x, False)
assert all(torch.allclose(out, want, atol=1e-5) for out, _ in outputs)
"""),
    md("""
`reshard` rewrites a checkpoint for another tp without holding more than one tensor piece. Resharded to tp=1,
it loads in this process (no process group), with the epoch carried over.
"""),
    code("""
checkpoint.reshard(workdir / "mlp-tp", workdir / "mlp-tp1", tp=1)
single = build_mlp(seed=1)
extra = checkpoint.load(workdir / "mlp-tp1", single)
with torch.no_grad():
    assert torch.allclose(single(x), want, atol=1e-5)
print("tp=1 checkpoint loaded here, extra entries:", extra)
"""),
    md("""
The same operations are on the command line for model checkpoints: `nxd convert MODEL --tp 8 --out DIR`,
`nxd reshard DIR OUT --tp 4`, `nxd consolidate DIR OUT`.

## Clean up

Close the worker group (its processes exit) and remove the temporary folder.
"""),
    code("""
group.close()
shutil.rmtree(workdir)
print(group)
"""),
]


# -- 02: the inference guide's BERT: trace, save, load, weight separation, bucketing -------------

BERT_TRACE = [
    md("""
# Tracing a tensor parallel BERT (the NxD inference guide's flow)

The NxD inference developer guide traces a Hugging Face BERT paraphrase classifier whose self-attention is
tensor parallel, saves it, loads it back and compares it with the CPU model. This notebook follows it with
`nxd_core.trace`:

1. a `BertForSequenceClassification` checkpoint and the guide's `get_model()` (parallel self-attention via
   `nxd_models.bert.parallelize_self_attention`, unsharded weights loaded per rank);
2. `parallel_model_trace(get_model, example, tp_degree=TP)`, `parallel_model_save`, `parallel_model_load`,
   each compared with Hugging Face;
3. weight separation (`inline_weights_to_neff=False`): a smaller saved folder and `replace_weights`;
4. bucketing: one traced program per sequence length, chosen per call by a bucket kernel.

By default the notebook builds a tiny random BERT and a word-level tokenizer in a temporary folder, so it runs
offline in seconds. To use the guide's real model, set `HF_MODEL = "bert-base-cased-finetuned-mrpc"` (downloads
it from the Hugging Face Hub; `SEQ = 128` as in the guide).
"""),
    parameters("""
HF_MODEL = None  # None: a tiny random BERT built here; "bert-base-cased-finetuned-mrpc" for the guide's model
TP = 2  # tensor parallel degree (must divide the attention heads: 12 for BERT-base)
SEQ = 128  # the traced sequence length, as in the guide
COMPILED = False  # True (parallel_model_trace's default) torch.compiles each rank's program: faster calls, ~20 s per rank to compile
"""),
    code("""
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizer

from nxd_core.bucketing import BucketModelConfig, SequenceLengthKernel
from nxd_core.checkpoint import load
from nxd_core.trace import parallel_model_load, parallel_model_save, parallel_model_trace
from nxd_core.trace_format import folder_size
from nxd_core.workers import WorkerGroup
from nxd_models.bert import parallelize_self_attention

workdir = Path(tempfile.mkdtemp(prefix="nxd-bert-"))  # removed at the end of the notebook
SENTENCES = (
    "The company HuggingFace is based in New York City",
    "Apples are especially bad for your health",
    "HuggingFace's headquarters are situated in Manhattan",
)
"""),
    md("""
## The CPU model and its checkpoint

The reference is a plain Hugging Face `BertForSequenceClassification`; its weights are saved as the guide does,
`torch.save({"model": state_dict}, "bert.pt")` (a `.safetensors` file or an HF directory load the same way).
"""),
    code("""
if HF_MODEL is None:
    words = sorted({w for s in SENTENCES for w in s.lower().replace("'", " ").split()})
    (workdir / "vocab.txt").write_text("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "'", *words]) + "\\n")
    tokenizer = BertTokenizer(str(workdir / "vocab.txt"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512, num_labels=2, initializer_range=0.5,
        id2label={0: "not paraphrase", 1: "paraphrase"}, label2id={"not paraphrase": 0, "paraphrase": 1},
    )
    torch.manual_seed(0)
    cpu_model = BertForSequenceClassification(config).eval()
else:
    tokenizer = AutoTokenizer.from_pretrained(HF_MODEL)
    cpu_model = BertForSequenceClassification.from_pretrained(HF_MODEL).eval()
    config = cpu_model.config
checkpoint_path = str(workdir / "bert.pt")
torch.save({"model": cpu_model.state_dict()}, checkpoint_path)


def encode(first, second, max_length=SEQ):
    \"\"\"(input_ids, attention_mask, token_type_ids), padded on the right to max_length: the guide's encode.\"\"\"
    batch = tokenizer(first, second, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def cpu_logits(inputs, model=cpu_model):
    with torch.no_grad():
        return model(*inputs).logits


paraphrase = encode(SENTENCES[0], SENTENCES[2])
not_paraphrase = encode(SENTENCES[0], SENTENCES[1])
print(tokenizer.convert_ids_to_tokens(paraphrase[0][0, :16]))
print("CPU logits:", cpu_logits(paraphrase), cpu_logits(not_paraphrase))
"""),
    md("""
## `get_model` and tracing

`get_model()` runs inside each of the `TP` worker processes: it builds the model with parallel self-attention,
loads the unsharded checkpoint (each rank keeps its slices) and returns `(model, io_aliases)`; BERT has no state
tensors, so the aliases are `{}`. `parallel_model_trace` exports one program per rank with the example's
static shapes. One `WorkerGroup` is shared by every trace and load below (`workers=`); without it each model
starts its own processes and `close()` ends them.
"""),
    code("""
def get_model():
    model = parallelize_self_attention(BertForSequenceClassification(config))
    load(checkpoint_path, model, sharded=False)
    return model.eval(), {}


group = WorkerGroup(TP)
model = parallel_model_trace(get_model, paraphrase, tp_degree=TP, compiled=COMPILED, workers=group)
print(model)

for inputs in (paraphrase, not_paraphrase):
    logits, expected = model(*inputs).logits, cpu_logits(inputs)
    print(f"traced {logits}  CPU {expected}")
    assert torch.allclose(logits, expected, atol=1e-4)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))

try:
    model(*encode(SENTENCES[0], SENTENCES[1], max_length=SEQ // 2))
except ValueError as error:
    print("other shapes need buckets:", str(error)[:150], "...")
"""),
    md("""
## Save and load

`parallel_model_save(model, folder)` writes one program per rank and a manifest (written last);
`parallel_model_load(folder)` checks the manifest, starts (or reuses) the workers and loads each rank's program.
Nothing is unpickled: graphs are `torch.export` archives. In another process, only the folder is needed.
"""),
    code("""
parallel_model_save(model, workdir / "tp_models")
model.close()
print(sorted(str(p.relative_to(workdir / "tp_models")) for p in (workdir / "tp_models").rglob("*") if p.is_file()))

with parallel_model_load(workdir / "tp_models", compiled=COMPILED, workers=group) as loaded:
    for inputs in (paraphrase, not_paraphrase):
        assert torch.allclose(loaded(*inputs).logits, cpu_logits(inputs), atol=1e-4)
    predicted = loaded(*paraphrase).logits.argmax(-1).item()
print("loaded model agrees with the CPU model; paraphrase pair ->", config.id2label[predicted])
"""),
    md("""
## Weight separation: `inline_weights_to_neff=False`

With weights inlined (the default) each rank's program holds its graph and its weights. Separated, one
weightless graph serves every rank, the weights equal on every rank are stored once and each rank's shards in
its own safetensors file: the folder is smaller, and `replace_weights` swaps in new weights (a state dict or a
checkpoint path) without tracing again.
"""),
    code("""
separated = parallel_model_trace(get_model, paraphrase, tp_degree=TP, inline_weights_to_neff=False,
                                 compiled=COMPILED, workers=group)
parallel_model_save(separated, workdir / "tp_models_separated")
for folder in ("tp_models", "tp_models_separated"):
    print(f"{folder:20s} {folder_size(workdir / folder) / 1e6:8.2f} MB")
print(sorted(str(p.relative_to(workdir / "tp_models_separated")) for p in (workdir / "tp_models_separated").rglob("*") if p.is_file()))
assert folder_size(workdir / "tp_models_separated") < folder_size(workdir / "tp_models")

torch.manual_seed(1)
finetuned = BertForSequenceClassification(config).eval()  # stands in for a fine-tuned checkpoint
separated.replace_weights(finetuned.state_dict())
new_logits = separated(*paraphrase).logits
print("after replace_weights:", new_logits, " CPU model with those weights:", cpu_logits(paraphrase, finetuned))
assert torch.allclose(new_logits, cpu_logits(paraphrase, finetuned), atol=1e-4)
assert not torch.allclose(new_logits, cpu_logits(paraphrase), atol=1e-3)
separated.close()
"""),
    md("""
## Bucketing: inputs of several lengths

A traced program has static shapes. `BucketModelConfig` traces one program per bucket (here sequence lengths
`SEQ // 4` and `SEQ`, one example each, in the kernel's order) and a bucket kernel picks the bucket for each
call and pads the inputs to it. `SequenceLengthKernel` is the ready-made sequence-length kernel (the guide's
`get_bucket_kernel` factories work too). Right padding with a zero attention mask leaves BERT's
classification unchanged, so every length matches the CPU model run on the unpadded input.
"""),
    code("""
buckets = [SEQ // 4, SEQ]
bucket_config = BucketModelConfig(SequenceLengthKernel(buckets))
examples = [encode(SENTENCES[0], SENTENCES[2], max_length=length) for length in buckets]
bucketed = parallel_model_trace(get_model, examples, tp_degree=TP, inline_weights_to_neff=False,
                                bucket_config=bucket_config, compiled=COMPILED, workers=group)
print("bucket shapes:", bucketed.bucket_shapes)

calls = [  # (first, second, padded length): a truncated pair, a padded one, a longer one
    (SENTENCES[0], SENTENCES[1], SEQ // 8),
    (SENTENCES[0], SENTENCES[2], SEQ // 4),
    (" ".join(SENTENCES), SENTENCES[2] + " " + SENTENCES[1], SEQ // 2 + 3),
]
for first, second, length in calls:
    inputs = encode(first, second, max_length=length)
    logits = bucketed(*inputs).logits
    print(f"{int(inputs[1].sum()):3d} tokens padded to {length:3d}: {logits}")
    assert torch.allclose(logits, cpu_logits(inputs), atol=1e-4)

try:
    bucketed(*encode(SENTENCES[0], SENTENCES[1], max_length=2 * SEQ))
except ValueError as error:
    print("too long for every bucket:", error)
bucketed.close()
"""),
    md("""
## Clean up

`close()` (or a `with` block) releases each traced model; the shared worker group is closed last.
"""),
    code("""
group.close()
shutil.rmtree(workdir)
"""),
]


# -- 03: Llama inference and speculative decoding ------------------------------------------------

LLAMA = [
    md("""
# Llama-2 7B inference with tensor parallelism

`from_pretrained_parallel` loads a Llama checkpoint sharded over `TP` worker processes (each streams only its
slices of the safetensors) and generates inside the workers: greedy, seeded sampling, batches with left
padding, streaming, and speculative decoding with a small draft model copied into the same workers.

The parameter cell picks the models. By default it uses the bundled demo pair, `demo-llama` and its draft
`demo-llama-draft`: small Llamas trained on Python source that ship with the package, so the notebook runs
offline in seconds. For the real model:

```python
MODEL = "llama-2-7b"; DRAFT = "tinyllama-1.1b"; TP = 8; DTYPE = "bfloat16"
```

`llama-2-7b` is gated on the Hugging Face Hub: accept its license, `huggingface-cli login`, and the first load
downloads it (13 GB). `nxd convert llama-2-7b --tp 8 --out llama-7b-tp8` writes a sharded copy that loads
faster: then `MODEL = "llama-7b-tp8"`. TinyLlama shares Llama-2's tokenizer, so it can be the draft.
"""),
    parameters("""
MODEL = "demo-llama"  # for the real model: "llama-2-7b" (needs the HF download) or an `nxd convert` folder, with TP = 8
DRAFT = "demo-llama-draft"  # a smaller model with the same tokenizer; "tinyllama-1.1b" for llama-2-7b
TP = 2
DTYPE = "float32"  # "bfloat16" halves the memory of a 7B model
MAX_NEW_TOKENS = 32
"""),
    code("""
import torch

from nxd_models import from_pretrained_parallel, list_models

print(list_models())
model = from_pretrained_parallel(MODEL, tp=TP, dtype=getattr(torch, DTYPE), max_batch_size=4, progress=False)
print(model)
"""),
    md("""
## Generate

`generate` takes text (or `input_ids`) and returns a `GenerationResult`: `texts`, `tokens` (the new token ids
per row) and `stats` (token counts, seconds, tokens per second). Greedy decoding by default.
"""),
    code("""
prompt = "def read_lines(path):\\n    with open(path) as f:\\n"
greedy = model.generate(prompt, max_new_tokens=MAX_NEW_TOKENS)
print(prompt + greedy.texts[0])
print({k: round(v, 2) if isinstance(v, float) else v for k, v in greedy.stats.items()})
assert len(greedy.tokens[0]) > 0
"""),
    md("""
## Stream

`stream` yields text pieces as the workers produce tokens; the pieces add up to the same text.
"""),
    code("""
pieces = []
print(prompt, end="")
for piece in model.stream(prompt, max_new_tokens=MAX_NEW_TOKENS):
    print(piece, end="", flush=True)
    pieces.append(piece)
print()
assert "".join(pieces) == greedy.texts[0]
"""),
    md("""
## Sampling with a seed

Sampling (temperature, top-k, top-p) draws in the workers from a seeded generator: the same seed gives the same
text.
"""),
    code("""
sample = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=0.8, top_p=0.95)
first = model.generate(prompt, seed=0, **sample)
again = model.generate(prompt, seed=0, **sample)
other = model.generate(prompt, seed=1, **sample)
for name, result in (("seed 0", first), ("seed 0 again", again), ("seed 1", other)):
    print(f"--- {name}\\n{prompt}{result.texts[0]}")
assert first.tokens == again.tokens
"""),
    md("""
## A batch with left padding

Prompts of different lengths are padded on the left (the tokenizer of a causal LM handle pads there), so every
row continues from its last real token. Each row equals the prompt generated on its own. The batch must fit
`max_batch_size` (given at load: the KV cache is preallocated in the workers).
"""),
    code("""
prompts = ["def fibonacci(n):\\n", "class Stack:\\n    def __init__(self", prompt]
batch = model.generate(prompts, max_new_tokens=MAX_NEW_TOKENS)
for p, text in zip(prompts, batch.texts):
    print(f"--- {p!r}\\n{p}{text}")
print(model.tokenizer(prompts, padding=True)["attention_mask"])
for p, tokens in zip(prompts, batch.tokens):
    assert tokens == model.generate(p, max_new_tokens=MAX_NEW_TOKENS).tokens[0], p
"""),
    md("""
## Speculative decoding with a draft model

The draft is loaded into the target's worker group (`workers=model.group`) with `tp=1`: every worker keeps
a whole copy of the small draft, so its steps need no collective (with `tp=TP` it would be sharded like the
target, for drafts too big to copy). Each round the draft proposes `num_speculative_tokens` tokens and the
target checks them in one forward pass. Greedy speculative output is exactly the target's greedy output;
`stats` report the acceptance rate and the histogram of accepted draft tokens per round.
`python benchmarks/generate.py --demo --tp 2` times it against target-only decoding.
"""),
    code("""
draft = from_pretrained_parallel(DRAFT, tp=1, dtype=getattr(torch, DTYPE), max_batch_size=4, workers=model.group, progress=False)
speculative = model.generate(prompt, max_new_tokens=MAX_NEW_TOKENS, draft_model=draft, num_speculative_tokens=4)
print(prompt + speculative.texts[0])
stats = speculative.stats
print(f"acceptance rate {stats['acceptance_rate']:.2f}, tokens per round {stats['tokens_per_round']:.2f}, "
      f"accepted per round (0..4): {stats['accepted_histogram']}")
print(f"tokens/s: speculative {stats['tokens_per_second']:.1f}, target alone {greedy.stats['tokens_per_second']:.1f}")
assert speculative.tokens == greedy.tokens

sampled = model.generate(prompt, draft_model=draft, num_speculative_tokens=4, seed=0, **sample)
print(f"--- sampled with the draft (seed 0)\\n{prompt}{sampled.texts[0]}")
"""),
    md("""
## The same from the command line

```sh
nxd generate demo-llama --tp 2 --prompt "import os" --max-new-tokens 32
nxd generate demo-llama --tp 2 --draft demo-llama-draft --prompt "import os"
nxd generate llama-2-7b --tp 8 --draft tinyllama-1.1b --do-sample --temperature 0.8 --top-p 0.95 --prompt "..."
```

`nxd generate` streams to the terminal and ends with tokens/s (and the acceptance rate with a draft).

## Clean up

The draft shares the target's workers, so close it first; closing the target ends the worker processes.
"""),
    code("""
draft.close()
model.close()
print(model)
"""),
]


# -- 04: T5 inference --------------------------------------------------------------------------

T5 = [
    md("""
# T5-3B inference with tensor parallelism

`from_pretrained_parallel` loads a T5 (v1.0 such as `t5-3b`, or v1.1 / Flan-T5) sharded over `TP` worker
processes. The encoder runs once per request, its cross-attention keys and values stay in the workers, and the
decoder generates greedy, sampled or beam-search outputs equal to Hugging Face's
`T5ForConditionalGeneration.generate`.

By default (`MODEL = None`) the notebook builds a tiny random T5 with the real on-disk layout
(`save_pretrained`) and a sentencepiece tokenizer trained here, so it runs offline in seconds (its outputs are
random text). For the real model set `MODEL = "t5-3b"; TP = 8` (downloads 11 GB from the Hugging Face Hub on
first use; `tp` must divide the 32 heads), and `COMPARE_WITH_HF = False` unless you want a second, unsharded
copy in this process.
"""),
    parameters("""
MODEL = None  # None: a tiny random T5 built here; "t5-3b" (with TP = 8), "flan-t5-xl", or a local HF folder
TP = 2
COMPARE_WITH_HF = True  # also run transformers' T5ForConditionalGeneration in this process and compare
MAX_NEW_TOKENS = 16
"""),
    code("""
import inspect
import os
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

from nxd_models import from_pretrained_parallel

workdir = None
if MODEL is None:
    workdir = Path(tempfile.mkdtemp(prefix="nxd-t5-"))  # removed at the end of the notebook
    MODEL = str(workdir / "tiny-t5")
    # A sentencepiece unigram tokenizer trained on the standard library's own source (no download).
    lines = [line for line in inspect.getsource(os).splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(workdir / "spiece"), vocab_size=96, model_type="unigram",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    pieces = spm.SentencePieceProcessor(model_file=str(workdir / "spiece.model"))
    vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.get_piece_size())]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(MODEL)
    # A v1.0 layout like t5-3b's (ReLU feed-forward, tied lm_head), a few hundred thousand parameters.
    # A large initializer_factor keeps a random T5 from repeating one token.
    config = T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="relu", tie_word_embeddings=True, initializer_factor=5.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(2)
    T5ForConditionalGeneration(config).save_pretrained(MODEL)
    print(sorted(p.name for p in Path(MODEL).iterdir()))
"""),
    md("""
## Load

`max_batch_size` bounds the rows decoded at once (beam search uses `num_beams x batch` rows) and `max_seq_len`
the decoder's KV cache (512 by default).
"""),
    code("""
t5 = from_pretrained_parallel(MODEL, tp=TP, max_batch_size=6, max_seq_len=64, progress=False)
print(t5)
hf = T5ForConditionalGeneration.from_pretrained(t5.path).eval() if COMPARE_WITH_HF else None
tokenizer = t5.tokenizer
prompts = ["translate English to German: The house is wonderful.", "summarize: import os, sys"]


def hf_texts(**kwargs):
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf.generate(**encoded, max_new_tokens=MAX_NEW_TOKENS, **kwargs)
    return tokenizer.batch_decode(out, skip_special_tokens=True)
"""),
    md("""
## Greedy

Text in, text out (prompts are padded on the right, as T5 expects). `tokens` holds the new ids per row, up to
and including the end-of-sequence token; `input_ids=` / `attention_mask=` work as well as text.
"""),
    code("""
greedy = t5.generate(prompts, max_new_tokens=MAX_NEW_TOKENS)
for prompt, text in zip(prompts, greedy.texts):
    print(f"{prompt!r} -> {text!r}")
print(f"{greedy.stats['new_tokens']} new tokens, {greedy.stats['tokens_per_second']:.1f} tokens/s")
if workdir is not None:  # a random model that repeats one token would make the comparisons below prove little
    assert all(len(set(row)) > 3 for row in greedy.tokens), greedy.tokens
if COMPARE_WITH_HF:
    assert greedy.texts == hf_texts(do_sample=False), "greedy differs from transformers"
    print("equal to T5ForConditionalGeneration.generate")

ids = tokenizer(prompts, return_tensors="pt", padding=True)
assert t5.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=MAX_NEW_TOKENS).tokens == greedy.tokens
"""),
    md("""
## Sampling

Sampling draws in the workers with a seeded generator: a seed reproduces a draw.
"""),
    code("""
sample = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=0.8, top_p=0.95)
first = t5.generate(prompts, seed=0, **sample)
again = t5.generate(prompts, seed=0, **sample)
other = t5.generate(prompts, seed=1, **sample)
print("seed 0:", first.texts)
print("seed 1:", other.texts)
assert first.tokens == again.tokens
"""),
    md("""
## Beam search

`num_beams` follows Hugging Face's beam search, with its `length_penalty`, `early_stopping` and
`num_return_sequences` (rows are source-major, best first; `stats["sequence_scores"]` holds their scores).
"""),
    code("""
beams = t5.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, num_beams=3)
print("beam search:", beams.texts)
print("scores:", beams.stats["sequence_scores"])
if COMPARE_WITH_HF:
    assert beams.texts == hf_texts(num_beams=3, do_sample=False), "beam search differs from transformers"
    print("equal to T5ForConditionalGeneration.generate(num_beams=3)")

two = t5.generate(prompts[0], max_new_tokens=MAX_NEW_TOKENS, num_beams=3, num_return_sequences=2)
print("two best hypotheses:", two.texts)
"""),
    md("""
## Streaming

`stream` yields the text of one source as it is decoded.
"""),
    code("""
pieces = list(t5.stream(prompts[0], max_new_tokens=MAX_NEW_TOKENS))
print(pieces)
assert "".join(pieces) == greedy.texts[0]
"""),
    md("""
## The real model, from the command line

```sh
nxd generate t5-3b --tp 8 --prompt "translate English to German: The house is wonderful."
nxd generate t5-3b --tp 8 --num-beams 4 --prompt "summarize: ..."
nxd convert t5-3b --tp 8 --out t5-3b-tp8    # a sharded copy that loads faster: MODEL = "t5-3b-tp8"
```

## Clean up
"""),
    code("""
t5.close()
if workdir is not None:
    shutil.rmtree(workdir)
print(t5)
"""),
]


NOTEBOOKS = {
    "01_tp_core_tour.ipynb": TP_CORE,
    "02_bert_trace.ipynb": BERT_TRACE,
    "03_llama_inference.ipynb": LLAMA,
    "04_t5_inference.ipynb": T5,
}


def build(name: str) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=NOTEBOOKS[name])
    notebook.metadata.update(
        kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
        language_info={"name": "python"},
    )
    # Stable ids, so rebuilding an unchanged notebook changes nothing.
    for index, cell in enumerate(notebook.cells):
        cell.id = f"cell-{index:02d}"
    return notebook


def main() -> None:
    for name in NOTEBOOKS:
        nbformat.write(build(name), HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
