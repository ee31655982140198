"""Parallel Mixtral and Qwen3-MoE against Hugging Face's MixtralForCausalLM / Qwen3MoeForCausalLM."""

import pytest
import torch
from family_fixtures import (
    TOL,
    assert_cached_decoding_matches,
    assert_generation_matches,
    assert_logits_match,
    ids_for,
    left_padded,
    save_tiny,
    save_tiny_draft,
)
from safetensors.torch import load_file

from nxd_core.checkpoint import open_full_checkpoint
from nxd_core.checkpoint_read import load_state_dict_from_full
from nxd_models import from_pretrained_parallel, moe
from nxd_models.cli import main
from nxd_models.families import build_for_checkpoint

KINDS = ("mixtral", "qwen3-moe", "qwen3-moe-step2")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (directory, HF model)."""
    root = tmp_path_factory.mktemp("moe")
    return {kind: (root / kind, save_tiny(root / kind, kind)) for kind in KINDS}


def _load(path, tp, tp_runner, **kwargs):
    return from_pretrained_parallel(path, tp=tp, workers=tp_runner.workers(tp), progress=False, **kwargs)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hugging_face(tp_runner, checkpoints, kind, tp):
    """Expert widths 30, 22 and 16 are padded at tp 4; qwen3-moe has 1 KV head (replicated at tp 2 and 4)."""
    path, reference = checkpoints[kind]
    with _load(path, tp, tp_runner) as model:
        assert_logits_match(model, reference)


@pytest.mark.slow
def test_mixtral_logits_match_hugging_face_at_tp8(tp_runner, checkpoints):
    path, reference = checkpoints["mixtral"]
    with _load(path, 8, tp_runner) as model:
        assert_logits_match(model, reference)


def test_dense_and_sparse_layers_are_where_hugging_face_puts_them(checkpoints):
    for kind, sparse in (("qwen3-moe", [False, True, True]), ("qwen3-moe-step2", [False, True, False, True])):
        _, reference = checkpoints[kind]
        model = moe.build(reference.config, device="meta")
        assert [isinstance(layer.mlp, moe.ParallelSparseMoeBlock) for layer in model.model.layers] == sparse
        assert [hasattr(layer.mlp, "experts") for layer in reference.model.layers] == sparse
    mixtral = moe.build(checkpoints["mixtral"][1].config, device="meta")
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in mixtral.state_dict()


def _in_process(path):
    """The tp=1 model built and loaded here, as a worker does (hooks can count what runs)."""
    from transformers import AutoConfig

    _, model, tensors = build_for_checkpoint(AutoConfig.from_pretrained(path), open_full_checkpoint(path), torch.float32, device="meta")
    load_state_dict_from_full(model, tensors, source=path)
    model.eval()
    return model


@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe"])
def test_decoding_runs_only_the_experts_its_tokens_chose(checkpoints, kind):
    """A decode step of 2 rows runs at most 2 x top-k experts per layer, the ones the router chose,
    while the others get no token; its logits still equal Hugging Face's."""
    path, reference = checkpoints[kind]
    model = _in_process(path)
    model.allocate_kv_cache(2, 16)
    calls = []
    for layer_idx, layer in enumerate(model.model.layers):
        block = getattr(layer, layer.mlp_name)
        if isinstance(block, moe.ParallelSparseMoeBlock):
            for expert_idx, expert in enumerate(block.experts):
                expert.register_forward_hook(lambda module, args, out, key=(layer_idx, expert_idx): calls.append((key, args[0].shape[0])))
    ids, mask = left_padded(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits[:, -1]
        model(ids[:, :-1], attention_mask=mask[:, :-1], cache_position=torch.arange(11))
        calls.clear()
        step = model(ids[:, -1:], attention_mask=mask, cache_position=torch.tensor([11]))[:, -1]
    assert (step - expected).abs().max().item() < TOL
    top_k, experts = reference.config.num_experts_per_tok, len(block.experts)
    per_layer = {}
    for (layer_idx, _), tokens in calls:
        per_layer.setdefault(layer_idx, []).append(tokens)
    assert per_layer and all(len(ran) <= 2 * top_k < experts for ran in per_layer.values())
    assert all(sum(ran) == 2 * top_k for ran in per_layer.values())  # every (token, choice) pair ran once


@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe"])
def test_cached_decoding_matches_hugging_face(tp_runner, checkpoints, kind):
    """tp 2; Mixtral's window of 6 is shorter than the 12-token prompt."""
    path, reference = checkpoints[kind]
    with _load(path, 2, tp_runner, max_batch_size=2, max_seq_len=16) as model:
        assert_cached_decoding_matches(model, reference)


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-drafts")
    for kind in ("mixtral", "qwen3-moe"):
        save_tiny_draft(root / kind, kind)
    return root


@pytest.mark.parametrize("kind", ["mixtral", "qwen3-moe"])
def test_greedy_equals_hf_generate_and_speculative_equals_greedy(tp_runner, checkpoints, drafts, kind):
    path, reference = checkpoints[kind]
    load = dict(max_batch_size=2, max_seq_len=40)
    with _load(path, 2, tp_runner, **load) as target, _load(drafts / kind, 2, tp_runner, **load) as draft:
        assert_generation_matches(target, draft, reference)


def test_convert_reshard_consolidate_mixtral(tp_runner, checkpoints, tmp_path):
    """Every expert's weights go through the one sharding path; the round trip is exact."""
    path, reference = checkpoints["mixtral"]
    ids = ids_for(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(ids).logits
    assert main(["convert", str(path), "--tp", "4", "--out", str(tmp_path / "tp4")]) == 0
    assert main(["reshard", str(tmp_path / "tp4"), str(tmp_path / "tp2"), "--tp", "2"]) == 0
    with _load(tmp_path / "tp2", 2, tp_runner) as model:
        assert (model(ids) - expected).abs().max().item() < TOL
    assert main(["consolidate", str(tmp_path / "tp2"), str(tmp_path / "full")]) == 0
    merged = load_file(tmp_path / "full" / "model.safetensors")
    original = {}
    for file in path.glob("*.safetensors"):
        original.update(load_file(file))
    assert merged.keys() == original.keys() and all(torch.equal(merged[k], original[k]) for k in original)


@pytest.mark.slow
def test_compiled_decoding_equals_eager(tp_runner, checkpoints):
    path, _ = checkpoints["qwen3-moe"]
    ids, mask = left_padded(128)
    with _load(path, 2, tp_runner, max_batch_size=2, max_seq_len=40) as model:
        eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12)
        compiled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, compile=True)
    assert compiled.tokens == eager.tokens
