"""The bundled demo pair (nxd_models/demo_models): small, bf16, trained, sharing a tokenizer, shardable at tp=2."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

from nxd_models import from_pretrained_parallel

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "train_demo_models.py"
DEMO = ROOT / "nxd_models" / "demo_models"
TARGET, DRAFT = DEMO / "demo-llama", DEMO / "demo-llama-draft"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
MAX_BYTES = 20 * 1024 * 1024


def _script():
    spec = importlib.util.spec_from_file_location("train_demo_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models():
    """Both models in fp32 (upcast from the stored bf16) and the shared tokenizer, offline."""
    loaded = {
        path.name: LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval() for path in (TARGET, DRAFT)
    }
    return loaded, AutoTokenizer.from_pretrained(TARGET, local_files_only=True)


def test_directories_exist_and_fit_in_20_mb():
    files = [f for d in (TARGET, DRAFT) for f in d.iterdir()]
    assert {"config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES} <= {f.name for f in TARGET.iterdir()}
    assert sum(f.stat().st_size for f in files) <= MAX_BYTES
    assert (DEMO / "README.md").exists()


@pytest.mark.parametrize("path", [TARGET, DRAFT], ids=lambda p: p.name)
def test_weights_are_bf16_safetensors(path):
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    with safe_open(path / "model.safetensors", framework="pt") as f:
        dtypes = {f.get_tensor(name).dtype for name in f.keys()}
    assert dtypes == {torch.bfloat16}
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"


def test_the_pair_shares_one_tokenizer_and_vocabulary(models):
    loaded, tok = models
    for name in TOKENIZER_FILES:
        assert (TARGET / name).read_bytes() == (DRAFT / name).read_bytes(), name
    draft_tok = AutoTokenizer.from_pretrained(DRAFT, local_files_only=True)
    assert draft_tok.get_vocab() == tok.get_vocab()
    assert loaded["demo-llama"].config.vocab_size == loaded["demo-llama-draft"].config.vocab_size == len(tok)


def test_sizes_and_head_counts_allow_tp_2_and_4(models):
    loaded, _ = models
    target, draft = loaded["demo-llama"], loaded["demo-llama-draft"]
    assert 5e6 <= target.num_parameters() <= 20e6
    assert 1e6 <= draft.num_parameters() <= 2e6
    for model in (target, draft):
        config = model.config
        assert config.num_attention_heads % 4 == 0 and config.num_key_value_heads % 4 == 0
        assert config.max_position_embeddings == 512


def test_tokenizer_round_trips_code(models):
    _, tok = models
    code = 'import os\n\nclass Foo:\n    def __init__(self, x=10):\n\tself.x = {"a": [x, 2.5]}  # naïve\n'
    assert tok.decode(tok(code).input_ids, skip_special_tokens=True) == code


def test_target_has_learned_held_out_python(models):
    """Loss on a held-out stdlib file far below the uniform ln(vocab) for both models."""
    loaded, tok = models
    script = _script()
    text = script.read_texts(script.stdlib_files(None, 0)[:8])[0]
    ids = torch.tensor([tok(text, verbose=False).input_ids[:512]])
    with torch.no_grad():
        losses = {name: script.lm_loss(m, ids).item() for name, m in loaded.items()}
    assert all(loss < 0.55 * math.log(len(tok)) for loss in losses.values()), losses


def test_greedy_generation_looks_like_python(models):
    loaded, tok = models
    out = loaded["demo-llama"].generate(tok("def ", return_tensors="pt").input_ids, max_new_tokens=32, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("def ") and "(self" in text and "):\n" in text, text


def test_tp_2_matches_hugging_face_and_speculates_with_the_draft(tp_runner, models):
    loaded, tok = models
    ids = tok("import os\n\n\ndef main(", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = loaded["demo-llama"](ids).logits
    load = dict(tp=2, dtype=torch.float32, max_seq_len=128, workers=tp_runner.workers(2), progress=False)
    with from_pretrained_parallel(TARGET, **load) as target, from_pretrained_parallel(DRAFT, **load) as draft:
        assert (target(ids) - expected).abs().max().item() < 1e-3
        plain = target.generate(input_ids=ids, max_new_tokens=24, eos_token_id=[])
        spec = target.generate(input_ids=ids, max_new_tokens=24, eos_token_id=[], draft_model=draft, num_speculative_tokens=4)
    assert spec.tokens == plain.tokens
    assert spec.stats["acceptance_rate"] > 0.1  # a random draft gets ~0


def test_training_script_runs_end_to_end(tmp_path):
    args = [
        "--steps",
        "2",
        "--tokenizer-vocab",
        "400",
        "--max-files",
        "12",
        "--val-files",
        "2",
        "--context",
        "64",
        "--eval-windows",
        "2",
        "--out",
        str(tmp_path),
    ]
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "validation loss after" in out.stdout and "greedy acceptance" in out.stdout
    for name in ("demo-llama", "demo-llama-draft"):
        model = LlamaForCausalLM.from_pretrained(tmp_path / name, local_files_only=True)
        assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(tmp_path / name, local_files_only=True)) == 400
        assert model.config.max_position_embeddings == 64
    for name in TOKENIZER_FILES:
        assert (tmp_path / "demo-llama" / name).read_bytes() == (tmp_path / "demo-llama-draft" / name).read_bytes()

    # --models large: a bigger target on the pair's tokenizer (not bundled: see the demo models' README)
    large = subprocess.run([sys.executable, str(SCRIPT), *args, "--models", "large"], capture_output=True, text=True, timeout=300)
    assert large.returncode == 0, large.stderr[-3000:]
    assert "greedy acceptance of demo-llama-draft against demo-llama-large" in large.stdout
    model = LlamaForCausalLM.from_pretrained(tmp_path / "demo-llama-large", local_files_only=True)
    assert model.config.num_hidden_layers == 8 and model.config.vocab_size == 400
    for name in TOKENIZER_FILES:
        assert (tmp_path / "demo-llama" / name).read_bytes() == (tmp_path / "demo-llama-large" / name).read_bytes()
