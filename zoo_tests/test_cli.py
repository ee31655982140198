"""`nxd convert / reshard / consolidate`: HF directory -> sharded -> resharded -> full, end to end."""

import json

import pytest
import torch
from llama_fixtures import save_tiny_llama
from safetensors.torch import load_file

from nxd_models import from_pretrained_parallel
from nxd_models.cli import main


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-llama")
    return path, save_tiny_llama(path, "gqa-replicated")


def test_convert_then_load_directly_reshard_and_consolidate(tp_runner, hf_llama, tmp_path, capsys):
    path, reference = hf_llama
    ids = torch.arange(5, 25).reshape(2, 10)
    with torch.no_grad():
        expected = reference(ids).logits

    assert main(["convert", str(path), "--tp", "2", "--out", str(tmp_path / "tp2")]) == 0
    assert (tmp_path / "tp2" / "config.json").exists() and (tmp_path / "tp2" / "manifest.json").exists()
    with from_pretrained_parallel(tmp_path / "tp2", tp=2, workers=tp_runner.workers(2), progress=False) as model:
        assert (model(ids) - expected).abs().max().item() < 1e-4

    assert main(["reshard", str(tmp_path / "tp2"), str(tmp_path / "tp4"), "--tp", "4"]) == 0
    with from_pretrained_parallel(tmp_path / "tp4", tp=4, workers=tp_runner.workers(4), progress=False) as model:
        assert (model(ids) - expected).abs().max().item() < 1e-4

    assert main(["consolidate", str(tmp_path / "tp4"), str(tmp_path / "full")]) == 0
    merged = load_file(tmp_path / "full" / "model.safetensors")
    state = reference.state_dict()
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)

    with pytest.raises(ValueError, match=r"converted for tp=2, not tp=4: run `nxd reshard"):
        from_pretrained_parallel(tmp_path / "tp2", tp=4)


def test_convert_casts_dtype(hf_llama, tmp_path):
    path, _ = hf_llama
    assert main(["convert", str(path), "--tp", "2", "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    manifest = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert {t["dtype"] for t in manifest["tensors"].values()} == {"BF16"}


def test_tp_that_cannot_shard_is_refused_naming_the_tensor(hf_llama, tmp_path, capsys):
    path, _ = hf_llama
    assert main(["convert", str(path), "--tp", "2", "--out", str(tmp_path / "tp2")]) == 0
    assert main(["reshard", str(tmp_path / "tp2"), str(tmp_path / "tp3"), "--tp", "3"]) == 2
    assert "cannot shard model.layers.0.self_attn.q_proj.weight for tp=3" in capsys.readouterr().err
    assert not (tmp_path / "tp3" / "manifest.json").exists()
    assert main(["convert", str(path), "--tp", "3", "--out", str(tmp_path / "x")]) == 2
    assert "valid tp values are [1, 2, 4, 8]" in capsys.readouterr().err


def _demo_copy(tmp_path):
    import shutil
    from pathlib import Path

    source = Path(__file__).parent.parent / "nxd_models" / "demo_models" / "demo-llama-draft"
    target = tmp_path / "demo"
    shutil.copytree(source, target)
    return target


def _one_error_line(capsys, rc, expected):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "error: " in err[0] and "Traceback" not in err[0], err
    assert expected in err[0], err[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
        (["--max-new-tokens", "-5"], "max_new_tokens must be an integer >= 1, got -5"),
        (["--temperature", "nan"], "temperature must be a finite number > 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-k", "0"], "top_k must be an integer >= 1"),
        (["--tp", "0"], "--tp must be >= 1"),
    ],
)
def test_generate_bad_values_are_one_error_line(capsys, argv, expected):
    _one_error_line(capsys, main(["generate", "demo-llama-draft", "--prompt", "x", *argv]), expected)


def test_generate_prompt_not_utf8_or_empty(capsys):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of a Latin-1 argv
    _one_error_line(capsys, main(["generate", "demo-llama-draft", "--prompt", bad]), "not valid UTF-8")
    _one_error_line(capsys, main(["generate", "demo-llama-draft", "--prompt", ""]), "the prompt is empty")


def test_truncated_weights_and_bad_config_are_one_error_line_before_any_worker(tmp_path, capsys):
    model = _demo_copy(tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_error_line(capsys, main(["generate", str(model), "--tp", "2", "--prompt", "x"]), f"{weights} is truncated")
    (model / "config.json").write_text("{not json")
    _one_error_line(capsys, main(["generate", str(model), "--prompt", "x"]), "config.json cannot be read as a model config")


def test_reshard_into_a_file_and_damaged_manifests(hf_llama, tmp_path, capsys):
    path, _ = hf_llama
    assert main(["convert", str(path), "--tp", "2", "--out", str(tmp_path / "tp2")]) == 0
    capsys.readouterr()
    (tmp_path / "file").write_text("x")
    _one_error_line(capsys, main(["reshard", str(tmp_path / "tp2"), str(tmp_path / "file"), "--tp", "1"]), "is a file, not a directory")
    manifest = tmp_path / "tp2" / "manifest.json"
    good = json.loads(manifest.read_text())
    del good["checksum"]
    manifest.write_text(json.dumps(good))
    _one_error_line(capsys, main(["consolidate", str(tmp_path / "tp2"), str(tmp_path / "full")]), f"{manifest} lacks checksum")
    manifest.write_text("{broken")
    _one_error_line(capsys, main(["consolidate", str(tmp_path / "tp2"), str(tmp_path / "full")]), f"{manifest} is not valid JSON")
