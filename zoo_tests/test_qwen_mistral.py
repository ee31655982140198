"""Parallel Qwen2, Qwen3 and Mistral against Hugging Face's Qwen2/Qwen3/MistralForCausalLM."""

import pytest
import torch
from family_fixtures import (
    TOL,
    assert_cached_decoding_matches,
    assert_generation_matches,
    assert_logits_match,
    ids_for,
    save_tiny,
    save_tiny_draft,
)
from safetensors.torch import load_file

from nxd_models import from_pretrained_parallel
from nxd_models.cli import main

KINDS = ("qwen2", "qwen2-window", "qwen3", "mistral")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (directory, HF model)."""
    root = tmp_path_factory.mktemp("qwen-mistral")
    return {kind: (root / kind, save_tiny(root / kind, kind)) for kind in KINDS}


def _load(path, tp, tp_runner, **kwargs):
    return from_pretrained_parallel(path, tp=tp, workers=tp_runner.workers(tp), progress=False, **kwargs)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hugging_face(tp_runner, checkpoints, kind, tp):
    """qwen2: tp 4 replicates its 2 KV heads and pads vocabulary 101 and MLP width 100; qwen3: head_dim
    16 with hidden 48 / 4 heads; the windows (4, 5) are shorter than the 11- and 12-token prompts."""
    path, reference = checkpoints[kind]
    with _load(path, tp, tp_runner) as model:
        assert_logits_match(model, reference)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_logits_match_hugging_face_at_tp8(tp_runner, checkpoints, kind):
    path, reference = checkpoints[kind]
    with _load(path, 8, tp_runner) as model:
        assert_logits_match(model, reference)


def test_the_windows_and_qwen_parts_change_the_logits(checkpoints):
    """The comparisons above could fail: without its window, q/k norms or biases HF's output differs."""
    _, mistral = checkpoints["mistral"]
    ids = ids_for(128, seq=12)
    with torch.no_grad():
        windowed = mistral(ids).logits
        mistral.config.sliding_window = None
        try:
            full = mistral(ids).logits
        finally:
            mistral.config.sliding_window = 5
    assert (windowed[:, 5:] - full[:, 5:]).abs().max() > 1e-2  # past the window
    assert (windowed[:, :5] - full[:, :5]).abs().max() < 1e-5  # within it
    _, qwen3 = checkpoints["qwen3"]
    assert qwen3.model.layers[0].self_attn.q_norm.weight.shape == (16,) and qwen3.model.layers[0].self_attn.o_proj.bias is not None
    _, qwen2 = checkpoints["qwen2"]
    assert qwen2.model.layers[0].self_attn.k_proj.bias.abs().sum() > 0 and qwen2.lm_head.weight is qwen2.model.embed_tokens.weight
    window_layers = checkpoints["qwen2-window"][1].config.layer_types
    assert window_layers == ["full_attention", "sliding_attention"]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", ["mistral", "qwen2-window"])
def test_window_shorter_than_the_prompt_in_cached_decoding(tp_runner, checkpoints, kind, tp):
    """Prefill 4 tokens, decode 8 one at a time from the cache: the window slides as HF's does."""
    path, reference = checkpoints[kind]
    with _load(path, tp, tp_runner, max_batch_size=2, max_seq_len=16) as model:
        assert_cached_decoding_matches(model, reference)


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-mistral-drafts")
    for kind in ("qwen2", "qwen3", "mistral"):
        save_tiny_draft(root / kind, kind)
    return root


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_greedy_equals_hf_generate_and_speculative_equals_greedy(tp_runner, checkpoints, drafts, kind):
    """At tp 2, prompts longer than Mistral's window and 16 new tokens decoded past it."""
    path, reference = checkpoints[kind]
    load = dict(max_batch_size=2, max_seq_len=40)
    with _load(path, 2, tp_runner, **load) as target, _load(drafts / kind, 2, tp_runner, **load) as draft:
        assert_generation_matches(target, draft, reference)


def test_convert_reshard_consolidate_qwen3(tp_runner, checkpoints, tmp_path):
    """q/k norms (replicated) and biases go through the one sharding path: the round trip is exact."""
    path, reference = checkpoints["qwen3"]
    ids = ids_for(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(ids).logits
    assert main(["convert", str(path), "--tp", "2", "--out", str(tmp_path / "tp2")]) == 0
    assert main(["reshard", str(tmp_path / "tp2"), str(tmp_path / "tp4"), "--tp", "4"]) == 0
    with _load(tmp_path / "tp4", 4, tp_runner) as model:
        assert (model(ids) - expected).abs().max().item() < TOL
    assert main(["consolidate", str(tmp_path / "tp4"), str(tmp_path / "full")]) == 0
    merged = load_file(tmp_path / "full" / "model.safetensors")
    original = {}
    for file in path.glob("*.safetensors"):
        original.update(load_file(file))
    assert merged.keys() == original.keys() and all(torch.equal(merged[k], original[k]) for k in original)


def test_tp_that_cannot_shard_a_qwen_config(checkpoints):
    path, _ = checkpoints["qwen2"]  # 8 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"tp=3 cannot shard this Qwen2 config .*valid tp values are \[1, 2, 4, 8\]"):
        from_pretrained_parallel(path, tp=3)


def test_unsupported_relative_names_what_is_missing(tmp_path):
    from transformers import Qwen2VLConfig

    Qwen2VLConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'qwen2_vl' model, which from_pretrained_parallel does not support yet: it needs .*vision"):
        from_pretrained_parallel(tmp_path, tp=2)
