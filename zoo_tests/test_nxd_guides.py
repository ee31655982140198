"""NxD's two guides, run as their users wrote them: zoo_tests/nxd_guides/ holds their code, changed only
by the package rename and the other changes each script's header lists.

Each script runs in its own process, in a folder where "bert-base-cased-finetuned-mrpc" is a tiny
local BERT (HF_HUB_OFFLINE=1: nothing is downloaded). What it saved is then checked against Hugging
Face on the same weights.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizer

from nxd_core.bucketing import BucketModelConfig, SequenceLengthKernel
from nxd_core.trace import parallel_model_load

GUIDES = Path(__file__).parent / "nxd_guides"
NAME = "bert-base-cased-finetuned-mrpc"
SENTENCES = (
    "The company HuggingFace is based in New York City",
    "Apples are especially bad for your health",
    "HuggingFace's headquarters are situated in Manhattan",
)
TOL = 1e-4


def write_workspace(folder: Path) -> BertForSequenceClassification:
    """A tiny cased BERT classifier and a WordPiece vocabulary over the guide's sentences, saved as NAME."""
    checkpoint = folder / NAME
    checkpoint.mkdir(parents=True)
    words = sorted({w for s in SENTENCES for w in re.findall(r"\w+|[^\w\s]", s)})
    (checkpoint / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(checkpoint / "vocab.txt"), do_lower_case=False).save_pretrained(checkpoint)
    config = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,  # the guide's longer bucket
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.5,  # logits far apart: an argmax that agrees by chance is unlikely
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(checkpoint)
    return model


def run_script(script: str, cwd: Path, launcher: tuple = (), timeout: int = 600) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([*launcher, str(GUIDES / script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{script} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def guide_inputs(folder: Path, *texts, max_length=128, padding="max_length") -> tuple:
    tokens = AutoTokenizer.from_pretrained(folder / NAME)(
        *texts, max_length=max_length, padding=padding, truncation=True, return_tensors="pt"
    )
    return tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"]


def hf_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).logits


def check_saved_model(folder: Path, workers, hf_model, inputs_list, bucket_config=None) -> None:
    with parallel_model_load(folder, workers=workers, compiled=False, bucket_config=bucket_config) as model:
        for inputs in inputs_list:
            logits = model(*inputs)[0]
            assert (logits - hf_logits(hf_model, inputs)).abs().max().item() < TOL


def test_inference_guide_runs_as_written(tp_runner, tmp_path):
    hf_model = write_workspace(tmp_path)
    run_script("inference_guide.py", tmp_path, (sys.executable,))
    workers = tp_runner.workers(2)
    paraphrase = guide_inputs(tmp_path, SENTENCES[1], SENTENCES[2])
    not_paraphrase = guide_inputs(tmp_path, SENTENCES[1], SENTENCES[1])
    check_saved_model(tmp_path / "tp_models", workers, hf_model, [paraphrase, not_paraphrase])
    check_saved_model(tmp_path / "tp_models_separated", workers, hf_model, [paraphrase, not_paraphrase])
    assert (tmp_path / "tp_models_separated" / "weights" / "rank_01.safetensors").is_file()  # weights apart from the one graph
    # The bucketed model takes any length up to 512, unpadded: the guide's kernel pads it.
    short = guide_inputs(tmp_path, SENTENCES[0], SENTENCES[2], padding=False)
    long = tuple(torch.cat([t] * 12, dim=1)[:, :300] for t in short)
    config = BucketModelConfig(SequenceLengthKernel([128, 512]))  # the guide's kernel, as one of ours
    check_saved_model(tmp_path / "tp_models_bucketed", workers, hf_model, [paraphrase, short, long], config)


def test_tensor_parallel_guide_inference_runs_as_written(tp_runner, tmp_path):
    hf_model = write_workspace(tmp_path)
    (tmp_path / "bert").mkdir()  # the guide saves its checkpoint into it
    printed = run_script("tp_guide_inference.py", tmp_path, (sys.executable,))
    assert "logits=tensor([[" in printed  # print(model(*paraphrase))
    paraphrase = guide_inputs(tmp_path, SENTENCES[1], SENTENCES[2])
    check_saved_model(tmp_path / "tp_models", tp_runner.workers(2), hf_model, [paraphrase])


def test_tensor_parallel_guide_training_under_torchrun(tmp_path):
    """tp=2 x dp=2 on 4 local processes; the script checks the training, the save and the load itself."""
    from nxd_core.checkpoint import consolidate, read_manifest

    write_workspace(tmp_path)
    torchrun = (str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=4")
    printed = run_script("tp_guide_training.py", tmp_path, torchrun)
    assert sorted(re.findall(r"rank (\d): epoch losses", printed)) == ["0", "1", "2", "3"]
    checkpoint = tmp_path / "bert_tp_checkpoint"
    assert read_manifest(checkpoint)["tp"] == 2
    # The sharded checkpoint consolidates into one that plain HF loads, answering as the trained model did.
    consolidate(checkpoint, tmp_path / "full")
    trained = torch.load(tmp_path / "trained_logits.pt", weights_only=True)
    config = BertConfig.from_pretrained(tmp_path / NAME)
    hf_model = BertForSequenceClassification.from_pretrained(tmp_path / "full", config=config).eval()
    generator = torch.Generator().manual_seed(0)  # the script's dataset: its first 8 rows
    ids = torch.randint(5, config.vocab_size, (64, 16), generator=generator)[:8]
    logits = hf_logits(hf_model, (ids, torch.ones_like(ids), torch.zeros_like(ids)))
    assert (logits - trained["logits"]).abs().max().item() < TOL


def test_generate_on_neuron_with_a_draft_as_in_the_guide(tp_runner):
    """The guide's line, `target_runner.generate_on_neuron(prompt, target_model, draft_model=draft_model)`,
    on the bundled pair: speculative greedy decoding gives plain greedy decoding's tokens."""
    from nxd_models import from_pretrained_parallel
    from nxd_models.generation import runner as target_runner

    load = dict(tp=2, workers=tp_runner.workers(2), progress=False)
    with (
        from_pretrained_parallel("demo-llama", **load) as target_model,
        from_pretrained_parallel("demo-llama-draft", **load) as draft_model,
    ):
        prompt = ["def read_lines(path):\n    with open(path) as f:\n"]
        result = target_runner.generate_on_neuron(prompt, target_model, draft_model=draft_model)
        plain = target_model.generate(prompt)
        assert result.tokens == plain.tokens and result.texts == plain.texts and len(result.tokens[0]) > 0
        assert 0 <= result.stats["acceptance_rate"] <= 1


def test_the_guides_api_takes_its_keyword_names(tmp_path):
    """The API section of the tensor parallel guide, called with its parameter names (tp=1, one process)."""
    import nxd_core
    from nxd_core import parallel_layers

    ps = nxd_core.parallel_state
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        assert (ps.get_data_parallel_size(), ps.get_tensor_model_parallel_size()) == (1, 1)
        assert (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()) == (0, 0)
        assert ps.get_data_parallel_group(as_list=True) == [[0]] == ps.get_tensor_model_parallel_group(as_list=True)
        torch.manual_seed(0)
        embedding = parallel_layers.ParallelEmbedding(
            num_embeddings=11, embedding_dim=8, init_method=torch.nn.init.normal_, dtype=torch.float32, device=None
        )
        column = parallel_layers.ColumnParallelLinear(
            input_size=8, output_size=6, bias=True, gather_output=True, dtype=torch.float32, device=None
        )
        row = parallel_layers.RowParallelLinear(input_size=6, output_size=8, bias=True, input_is_parallel=False, dtype=torch.float32)
        model = parallel_layers.move_model_to_device(torch.nn.Sequential(embedding, column, row), device="cpu")
        ids = torch.tensor([[1, 5, 10]])
        expected = torch.nn.functional.linear(
            torch.nn.functional.linear(embedding.weight[ids], column.weight, column.bias), row.weight, row.bias
        )
        assert torch.allclose(model(ids), expected, atol=1e-6)

        model(ids).square().sum().backward()
        norm = parallel_layers.clip_grad_norm(parameters=model.parameters(), max_norm=0.5, norm_type=2)
        assert norm > 0.5 and abs(torch.cat([p.grad.flatten() for p in model.parameters()]).norm() - 0.5) < 1e-4

        parallel_layers.save(state_dict={"model": model.state_dict(), "epoch": 3}, save_dir=tmp_path / "ckpt")
        fresh = torch.nn.Sequential(
            parallel_layers.ParallelEmbedding(11, 8), parallel_layers.ColumnParallelLinear(8, 6), parallel_layers.RowParallelLinear(6, 8)
        )
        rest = parallel_layers.load(load_dir=tmp_path / "ckpt", model=fresh, model_key="model", sharded=True)
        assert rest == {"epoch": 3} and torch.equal(fresh(ids), model(ids))
    finally:
        ps.destroy_model_parallel()


# -- docs/migrating-from-nxd.md -------------------------------------------------------------------

REPO = Path(__file__).parent.parent
REFERENCE = REPO.parent / "shared" / "reference"


def migration_rows() -> list[tuple[str, list[str]]]:
    """(NxD name, [zoo names]) for each row of the guide's tables."""
    rows = []
    for line in (REPO / "docs" / "migrating-from-nxd.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            rows.append((cells[0].strip("`"), re.findall(r"`([^`]+)`", cells[1])))
    return rows


def resolve(name: str) -> None:
    """Fail unless `name` is a Python name importable here, an `nxd` subcommand, or a file of the repository."""
    import importlib

    from nxd_models.cli import build_parser

    if name.startswith("nxd "):
        commands = next(a for a in build_parser()._actions if a.dest == "command").choices
        assert name.split()[1] in commands, f"{name}: no such subcommand"
    elif "/" in name:
        assert (REPO / name).is_file(), f"{name}: no such file"
    else:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr)  # AttributeError names what is missing
            return
        raise AssertionError(f"{name}: nothing importable")


def test_every_name_in_the_migration_tables_resolves():
    rows = migration_rows()
    assert len(rows) > 40
    for nxd_name, zoo_names in rows:
        assert zoo_names, f"{nxd_name} has no nxd-zoo equivalent in the table"
        for name in zoo_names:
            resolve(name)


def test_the_migration_table_covers_every_name_the_guides_use():
    text = "\n".join(p.read_text() for p in sorted(REFERENCE.iterdir()))
    used = set(re.findall(r"\b(?:neuronx_distributed|torch_neuronx)(?:\.\w+)+", text)) | {
        "xm.optimizer_step",
        "target_runner.generate_on_neuron",
    }
    used -= {"neuronx_distributed.parallel_layers", "neuronx_distributed.trace"}  # packages, listed by their names
    listed = {nxd for nxd, _ in migration_rows()}
    assert used <= listed, sorted(used - listed)
    # ...and the table's NxD names of the guides' API exist under the renamed package with the same tail
    import nxd_core

    for name in sorted(n for n in listed if n.startswith("neuronx_distributed.") and ".utils." not in n):
        resolve(name.replace("neuronx_distributed", nxd_core.__name__, 1))


# -- xm.optimizer_step's stand-in ------------------------------------------------------------------


def _step_on_rank_data(groups_kind: str):
    """Each rank's gradient is its rank + 1; SGD(lr=1) moves the weight by minus the averaged gradient."""
    import torch.distributed as dist

    from nxd_core import parallel_state as ps
    from nxd_core.grads import optimizer_step

    weight = torch.nn.Parameter(torch.zeros(3))
    weight.grad = torch.full((3,), float(dist.get_rank() + 1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    groups = {"none": None, "dp": ps.get_data_parallel_group(as_list=True), "wrong": [[0], [1]]}[groups_kind]
    try:
        optimizer_step(optimizer, groups=groups)
    except ValueError as error:
        return str(error)
    return weight.detach().clone()


def test_optimizer_step_averages_over_the_data_parallel_group(tp_runner):
    for kind in ("none", "dp"):  # tp=1, dp=2: the world is the data parallel group
        for weight in tp_runner.run(1, _step_on_rank_data, kind, dp=2):
            assert torch.equal(weight, torch.full((3,), -1.5))
    assert all("not this world's data parallel groups [[0, 1]]" in e for e in tp_runner.run(1, _step_on_rank_data, "wrong", dp=2))
    # At tp=2 a world-wide average would mix the two shards: refused, naming the fix.
    assert all("mixes the 2 tensor parallel shards" in e for e in tp_runner.run(2, _step_on_rank_data, "none"))


def test_nxd_core_submodules_load_on_first_use():
    code = (
        "import sys, nxd_core\n"
        "assert 'nxd_core.trace' not in sys.modules and 'torch' not in sys.modules\n"
        "assert nxd_core.trace.parallel_model_trace and nxd_core.parallel_state.initialize_model_parallel\n"
        "import nxd_core.parallel_layers.layers as a, nxd_core.layers as b\n"
        "assert a is b and nxd_core.parallel_layers.parallel_state is nxd_core.parallel_state\n"
        "try:\n    nxd_core.tracing\nexcept AttributeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "module 'nxd_core' has no attribute 'tracing'" in out.stdout
