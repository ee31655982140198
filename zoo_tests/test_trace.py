"""parallel_model_trace / save / load: the NxD inference guide's flow, weight separation, autobucketing.

Hugging Face is the oracle. Workers come from the session's reused groups; a
saved model is loaded again in a fresh process by scripts/trace_load_and_run.py.
"""

import functools
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from bert_fixtures import tiny_bert_config
from llama_fixtures import save_tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BertForSequenceClassification

from nxd_core.bucketing import BucketModelConfig, PositionKernel, SequenceLengthKernel
from nxd_core.trace import TracedModelError, parallel_model_load, parallel_model_save, parallel_model_trace
from nxd_core.trace_format import folder_size

SCRIPTS = Path(__file__).parent / "scripts"
BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
TOL = 1e-4

# -- the guide's BERT: a word-level tokenizer over its sentences (no network) -----------------

SENTENCES = (
    "The company HuggingFace is based in New York City",
    "Apples are especially bad for your health",
    "HuggingFace's headquarters are situated in Manhattan",
)
VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
VOCAB.update({w: i + len(VOCAB) for i, w in enumerate(sorted({w for s in SENTENCES for w in s.lower().split()}))})


def encode(first: str, second: str, max_length: int = 128) -> tuple:
    """(input_ids, attention_mask, token_type_ids) of [CLS] first [SEP] second [SEP], right-padded: the guide's encode."""
    a = [VOCAB.get(w, 1) for w in first.lower().split()]
    b = [VOCAB.get(w, 1) for w in second.lower().split()]
    ids = [2, *a, 3, *b, 3]
    types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    pad = max_length - len(ids)
    as_row = lambda values: torch.tensor([values + [0] * pad])  # noqa: E731
    return as_row(ids), as_row([1] * len(ids)), as_row(types)


PARAPHRASE = encode(SENTENCES[0], SENTENCES[2])
NOT_PARAPHRASE = encode(SENTENCES[0], SENTENCES[1])


def random_inputs(length: int, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (2, length), generator=generator)
    types = torch.zeros_like(ids)
    types[:, length // 2 :] = 1
    return ids, torch.ones_like(ids), types


def bert_get_model(config, checkpoint):
    """The guide's get_model: HF BERT with parallel self-attention, unsharded weights loaded per rank."""
    from nxd_core.checkpoint import load
    from nxd_models.bert import parallelize_self_attention

    torch.manual_seed(123)  # other weights than the checkpoint's: the load must replace them
    model = parallelize_self_attention(BertForSequenceClassification(config))
    load(checkpoint, model, sharded=False)
    return model, {}


def hf_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).logits


def run_fresh(folder: Path, calls: list[tuple], out_dir: Path, eager: bool = False) -> list[torch.Tensor]:
    """Load the folder in a fresh process and run the calls there; each call's first output."""
    inputs = {f"{c}.{p}": t.contiguous() for c, call in enumerate(calls) for p, t in enumerate(call)}
    save_file(inputs, out_dir / "inputs.safetensors")
    args = [
        sys.executable,
        str(SCRIPTS / "trace_load_and_run.py"),
        str(folder),
        str(out_dir / "inputs.safetensors"),
        str(out_dir / "out.json"),
    ]
    done = subprocess.run(args + (["--eager"] if eager else []), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.tensor(o) for o in json.loads((out_dir / "out.json").read_text())["outputs"]]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(config, unsharded checkpoint {"model": state_dict}, the HF model it holds)."""
    config = tiny_bert_config(max_position_embeddings=512, initializer_range=0.5)  # logits of order 1
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    checkpoint = tmp_path_factory.mktemp("bert") / "bert.pt"
    torch.save({"model": model.state_dict()}, checkpoint)
    return config, str(checkpoint), model


@pytest.fixture(scope="module")
def guide_folder(tp_runner, bert, tmp_path_factory):
    """The guide's model traced at tp=2 (weights inlined, the default) and saved; its in-process outputs."""
    config, checkpoint, _ = bert
    get_model = functools.partial(bert_get_model, config, checkpoint)
    folder = tmp_path_factory.mktemp("guide") / "tp_models"
    with parallel_model_trace(get_model, PARAPHRASE, tp_degree=2, workers=tp_runner.workers(2), compiled=False) as model:
        outputs = [model(*PARAPHRASE), model(*NOT_PARAPHRASE)]
        with pytest.raises(ValueError, match=r"static shapes"):
            model(*encode(SENTENCES[0], SENTENCES[1], max_length=64))
        parallel_model_save(model, folder)
    return folder, outputs


def test_guide_bert_traced_saved_and_loaded_in_a_fresh_process(guide_folder, bert, tmp_path):
    folder, in_process = guide_folder
    reference = bert[2]
    expected = [hf_logits(reference, PARAPHRASE), hf_logits(reference, NOT_PARAPHRASE)]
    # In process: the module's own output type, rank 0's logits.
    assert type(in_process[0]).__name__ == "SequenceClassifierOutput"
    for output, want in zip(in_process, expected):
        assert (output.logits - want).abs().max().item() < TOL
    # A fresh process, compiled (the default): torch.compile of each rank's loaded graph.
    loaded = run_fresh(folder, [PARAPHRASE, NOT_PARAPHRASE], tmp_path)
    for logits, want in zip(loaded, expected):
        assert logits.shape == want.shape
        assert (logits - want).abs().max().item() < TOL
        assert torch.equal(logits.argmax(-1), want.argmax(-1))


def test_bucketing_over_sequence_lengths(tp_runner, bert, tmp_path):
    config, checkpoint, reference = bert
    get_model = functools.partial(bert_get_model, config, checkpoint)
    examples = [random_inputs(128, seed=1), random_inputs(512, seed=2)]
    bucket_config = BucketModelConfig(SequenceLengthKernel([128, 512]))
    calls = [random_inputs(length, seed=length) for length in (20, 128, 300)]
    expected = [hf_logits(reference, call) for call in calls]
    with parallel_model_trace(
        get_model,
        examples,
        tp_degree=2,
        inline_weights_to_neff=False,
        bucket_config=bucket_config,
        workers=tp_runner.workers(2),
        compiled=False,
    ) as model:
        assert model.bucket_shapes == [[[2, 128]] * 3, [[2, 512]] * 3]
        for call, want in zip(calls, expected):
            assert (model(*call).logits - want).abs().max().item() < TOL
        with pytest.raises(ValueError, match=r"sequence length 600 .*buckets are \[128, 512\]"):
            model(*random_inputs(600, seed=0))
        parallel_model_save(model, tmp_path / "bucketed")
    manifest = json.loads((tmp_path / "bucketed" / "manifest.json").read_text())
    assert manifest["bucket_kernel"]["buckets"] == [128, 512]
    assert [f for f in manifest["files"]["shared"] if f.endswith(".pt2")] == ["graphs/bucket_00.pt2", "graphs/bucket_01.pt2"]
    # The ready-made kernel is restored from the manifest in the fresh process.
    for logits, want in zip(run_fresh(tmp_path / "bucketed", calls, tmp_path, eager=True), expected):
        assert (logits - want).abs().max().item() < TOL


def test_separated_weights_are_smaller_and_replaceable(tp_runner, bert, tmp_path):
    config, checkpoint, reference = bert
    get_model = functools.partial(bert_get_model, config, checkpoint)
    workers = tp_runner.workers(2)
    with parallel_model_trace(get_model, PARAPHRASE, tp_degree=2, workers=workers, compiled=False) as inline:
        parallel_model_save(inline, tmp_path / "inline")
        with pytest.raises(ValueError, match="inline_weights_to_neff=False"):
            inline.replace_weights(checkpoint)
    with parallel_model_trace(get_model, PARAPHRASE, tp_degree=2, inline_weights_to_neff=False, workers=workers, compiled=False) as model:
        parallel_model_save(model, tmp_path / "separated")
        files = sorted(str(p.relative_to(tmp_path / "separated")) for p in (tmp_path / "separated").rglob("*") if p.is_file())
        assert files == [
            "graphs/bucket_00.pt2",
            "manifest.json",
            "weights/rank_00.safetensors",
            "weights/rank_01.safetensors",
            "weights/replicated.safetensors",
        ]
        with safe_open(tmp_path / "separated" / "weights" / "replicated.safetensors", "pt") as replicated:
            assert "bert.embeddings.word_embeddings.weight" in replicated.keys()  # the recipe shards attention only
        with safe_open(tmp_path / "separated" / "weights" / "rank_01.safetensors", "pt") as rank_file:
            assert "bert.encoder.layer.0.attention.self.query.weight" in rank_file.keys()
            assert "bert.embeddings.word_embeddings.weight" not in rank_file.keys()
        assert folder_size(tmp_path / "separated") < folder_size(tmp_path / "inline")

        # New weights from a state dict (sliced here) and from a safetensors checkpoint (sliced by each worker).
        for seed, as_file in ((1, False), (2, True)):
            torch.manual_seed(seed)
            new = BertForSequenceClassification(config).eval()
            source = new.state_dict()
            if as_file:
                source = str(tmp_path / "new.safetensors")
                save_file(new.state_dict(), source)
            model.replace_weights(source)
            want = hf_logits(new, PARAPHRASE)
            assert (hf_logits(reference, PARAPHRASE) - want).abs().max().item() > 1e-2  # really other weights
            assert (model(*PARAPHRASE).logits - want).abs().max().item() < TOL
        with pytest.raises(KeyError, match="missing 1"):
            model.replace_weights({k: v for k, v in reference.state_dict().items() if k != "classifier.bias"})
        parallel_model_save(model, tmp_path / "replaced")
    with parallel_model_load(tmp_path / "replaced", workers=workers, compiled=False) as loaded:
        assert (loaded(*PARAPHRASE).logits - want).abs().max().item() < TOL
    with pytest.raises(RuntimeError, match="closed"):
        loaded(*PARAPHRASE)


# -- Llama: context encoding and token generation sharing the KV cache --------------------


class Decoder(torch.nn.Module):
    """Next-token logits of a parallel Llama; writes the KV cache at cache_position (0..seq-1 when absent)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, cache_position=None):
        if cache_position is None:
            cache_position = torch.arange(input_ids.shape[1])
        return self.model.compute(input_ids, attention_mask, None, cache_position, True)


def llama_get_model(path, max_seq):
    from transformers import AutoConfig

    from nxd_core.checkpoint import load
    from nxd_models.llama import build

    model = build(AutoConfig.from_pretrained(path))
    load(path, model, sharded=False)
    model.allocate_kv_cache(1, max_seq)
    caches = {t: None for layer in model.model.layers for t in (layer.self_attn.k_cache, layer.self_attn.v_cache)}
    return Decoder(model), caches


class ContextThenTokens:
    """Bucket 0: context encoding (input_ids, mask), left-padded to CONTEXT. Then token generation
    (input_ids, mask, cache_position), by position: the mask padded to the bucket's KV length."""

    CONTEXT, KV = 16, [32, 64]

    def __init__(self):
        self.context = SequenceLengthKernel([self.CONTEXT], side="left")
        self.tokens = PositionKernel(self.KV, position_input=2, pad_inputs=[1])

    def __call__(self, tensors):
        if len(tensors) == 2:
            return self.context(tensors)
        padded, index = self.tokens(tensors)
        return padded, index + 1


def greedy(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy decoding with the traced programs: one context call, then one call per token."""
    context = ContextThenTokens.CONTEXT
    mask = torch.ones_like(prompt)
    logits = model(prompt, mask)  # the kernel left-pads both to the context bucket
    mask = torch.cat([torch.zeros(1, context - prompt.shape[1], dtype=mask.dtype), mask], dim=1)
    tokens = [int(logits[0, -1].argmax())]
    for step in range(new_tokens - 1):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        logits = model(torch.tensor([[tokens[-1]]]), mask, torch.tensor([context + step]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_llama_context_and_token_programs_share_the_kv_cache(tp_runner, tmp_path, compiled):
    hf = save_tiny_llama(tmp_path / "llama", "gqa", seed=3)
    prompt = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    new_tokens = 24  # crosses from the 32-slot bucket into the 64-slot one
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)[0, 7:].tolist()
    assert len(set(expected)) > 3, "the tiny model repeats one token: the comparison would prove little"

    kernel = BucketModelConfig(ContextThenTokens())
    examples = [
        (torch.ones(1, 16, dtype=torch.long), torch.ones(1, 16, dtype=torch.long)),
        (torch.ones(1, 1, dtype=torch.long), torch.ones(1, 32, dtype=torch.long), torch.tensor([31])),
        (torch.ones(1, 1, dtype=torch.long), torch.ones(1, 64, dtype=torch.long), torch.tensor([63])),
    ]
    get_model = functools.partial(llama_get_model, str(tmp_path / "llama"), 64)
    workers = tp_runner.workers(2)
    with parallel_model_trace(
        get_model, examples, tp_degree=2, inline_weights_to_neff=False, bucket_config=kernel, workers=workers, compiled=compiled
    ) as model:
        assert greedy(model, prompt, new_tokens) == expected
        parallel_model_save(model, tmp_path / "decoder")
    manifest = json.loads((tmp_path / "decoder" / "manifest.json").read_text())
    assert len(manifest["state"]) == 4  # two layers' K and V caches: not saved, zeros at load
    with pytest.raises(TracedModelError, match="custom bucket kernel 'ContextThenTokens'"):
        parallel_model_load(tmp_path / "decoder", workers=workers)
    # in fresh workers: the saved graphs call nxd's CPU kernels (decode attention), which loading registers
    with parallel_model_load(tmp_path / "decoder", bucket_config=kernel, compiled=False) as loaded:
        assert greedy(loaded, prompt, new_tokens) == expected


# -- errors -------------------------------------------------------------------------------


def test_load_errors_name_the_file_and_the_fix(guide_folder, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(guide_folder[0], folder)
    manifest = json.loads((folder / "manifest.json").read_text())

    with pytest.raises(TracedModelError, match=r"traced at tp_degree=2, but tp_degree=4 was asked"):
        parallel_model_load(folder, tp_degree=4)

    (folder / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(TracedModelError, match=r"version 99 .* reads version 1.*Trace and save the model again"):
        parallel_model_load(folder)

    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "rank_01" / "bucket_00.pt2").unlink()
    with pytest.raises(TracedModelError, match=r"rank 1's file .*rank_01/bucket_00.pt2 is missing"):
        parallel_model_load(folder)

    with pytest.raises(TracedModelError, match=r"not a traced model: it has no manifest.json"):
        parallel_model_load(tmp_path / "copy" / "rank_00")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "manifest.json").write_text(json.dumps({"format": "nxd-zoo/sharded-checkpoint", "version": 1}))
    with pytest.raises(TracedModelError, match=r"sharded checkpoint: load it into a model with nxd_core.checkpoint.load"):
        parallel_model_load(tmp_path / "checkpoint")


def test_trace_argument_errors(bert):
    config, checkpoint, _ = bert
    get_model = functools.partial(bert_get_model, config, checkpoint)
    bucket_config = BucketModelConfig(SequenceLengthKernel([128, 512]))
    # Raised before any worker starts.
    with pytest.raises(ValueError, match="inline_weights_to_neff=False"):
        parallel_model_trace(get_model, [PARAPHRASE], tp_degree=2, bucket_config=bucket_config)
    with pytest.raises(ValueError, match=r"sends example_inputs\[0\] .* to bucket 1"):
        parallel_model_trace(
            get_model,
            [random_inputs(512, 0), random_inputs(128, 0)],
            tp_degree=2,
            inline_weights_to_neff=False,
            bucket_config=bucket_config,
        )


def test_graph_files_that_would_unpickle_are_refused(guide_folder, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(guide_folder[0], folder)
    graph = folder / "rank_00" / "bucket_00.pt2"
    with zipfile.ZipFile(graph) as source:
        members = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(graph, "w") as target:
        for info, data in members:
            target.writestr(info, b"pickled example inputs" if info.filename.endswith("sample_inputs/model.pt") else data)
    with pytest.raises(TracedModelError, match=r"rank_00/bucket_00.pt2 holds a pickled file"):
        parallel_model_load(folder)


def _recreate_tp_group(tp: int) -> str:
    from nxd_core import parallel_state as ps

    ps.initialize_model_parallel(tp)
    return ps.get_tensor_model_parallel_group().group_name


def test_a_loaded_graph_runs_on_the_current_tp_group(tp_runner, guide_folder, bert):
    """A graph names the process group it was traced with; names count the groups a process created."""
    folder, _ = guide_folder
    workers = tp_runner.workers(2)
    traced_with = json.loads((folder / "manifest.json").read_text())["group_name"]
    assert workers.run(_recreate_tp_group, 2)[0] != traced_with  # the traced group's name is gone here
    with parallel_model_load(folder, workers=workers, compiled=False) as model:
        assert (model(*NOT_PARAPHRASE).logits - hf_logits(bert[2], NOT_PARAPHRASE)).abs().max().item() < TOL


# -- bucket kernels -------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_bucket_kernels_pad_and_choose():
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    padded, index = SequenceLengthKernel([4, 8])([ids, mask, torch.tensor([3])])
    assert int(index) == 1 and [tuple(t.shape) for t in padded] == [(2, 8), (2, 8), (1,)]
    assert padded[1][0].tolist() == [1] * 5 + [0] * 3
    left, _ = SequenceLengthKernel([8], side="left")([mask])
    assert left[0][0].tolist() == [0] * 3 + [1] * 5

    kernel = PositionKernel([16, 32], position_input=1, pad_inputs=[0])
    padded, index = kernel([torch.ones(1, 17), torch.tensor([16])])
    assert int(index) == 1 and padded[0].shape == (1, 32)
    with pytest.raises(ValueError, match=r"position 32 .*buckets are \[16, 32\]"):
        kernel([torch.ones(1, 33), torch.tensor([32])])

    # The guide's form: a factory returning the kernel, called with the constant args; a scripted kernel.
    config = BucketModelConfig(lambda *buckets: SequenceLengthKernel(buckets), bucket_kernel_constant_args=(4, 8))
    assert config.select([ids])[1] == 1 and config.to_json()["buckets"] == [4, 8]
    scripted = torch.jit.script(_scripted_kernel)
    assert BucketModelConfig(scripted).select([ids])[1] == 0


def _scripted_kernel(tensors: list[torch.Tensor]):
    return tensors, torch.tensor([0])


# -- the benchmark --------------------------------------------------------------------------


@pytest.mark.slow  # a cold AOTInductor compile or a fresh benchmark process: minutes on 2 cores (make test-slow)
def test_trace_benchmark_prints_its_table(tmp_path):
    args = ["--tp", "1", "--layers", "1", "--hidden", "32", "--seq", "16", "--calls", "3", "--workdir", str(tmp_path)]
    out = subprocess.run([sys.executable, str(BENCHMARKS / "trace.py"), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("trace", "saved size, weights inlined", "saved size, weights separated", "load", "per call, eager", "per call, compiled"):
        assert row in out.stdout
    assert list(tmp_path.iterdir()) == []  # the saved folders are removed
