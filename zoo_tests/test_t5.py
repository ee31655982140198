"""Parallel T5 (nxd_models.t5) equals Hugging Face's T5ForConditionalGeneration at tp 1, 2 and 4:
encoder outputs, teacher-forced logits, greedy and beam search generations, for v1.0 and v1.1 layouts."""

import pytest
import torch
from safetensors.torch import load_file
from t5_fixtures import padded_batch, save_tiny_t5, save_tiny_t5_tokenizer

from nxd_core.sharding import get_sharding
from nxd_models import from_pretrained_parallel
from nxd_models.cli import main
from nxd_models.handles import ParallelSeq2SeqModel

BEAMS = {  # (name, generate kwargs): HF's defaults, then length penalty, early stopping and several returns
    "beam3": dict(max_new_tokens=12, num_beams=3),
    "beam4x2": dict(max_new_tokens=10, num_beams=4, num_return_sequences=2, length_penalty=0.5, early_stopping=True),
    "beam3never": dict(max_new_tokens=8, num_beams=3, length_penalty=2.0, early_stopping="never"),
}


def _cut(row, eos=1):
    """A generated row up to and including its end-of-sequence token (HF pads after it)."""
    row = row.tolist()
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (path, HF outputs for the padded batch)."""
    ids, mask = padded_batch()
    decoder_ids = torch.tensor([[0, 5, 7, 9, 11], [0, 3, 4, 5, 6], [0, 8, 8, 2, 40]])
    saved = {}
    for kind in ("v1.0", "v1.1"):
        path = tmp_path_factory.mktemp(f"t5-{kind}")
        reference = save_tiny_t5(path, kind)
        if kind == "v1.1":
            save_tiny_t5_tokenizer(path)
        with torch.no_grad():
            out = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
            expected = {
                "encoder": out.encoder_last_hidden_state,
                "logits": out.logits,
                "decoder_ids": decoder_ids,
                "greedy": [_cut(r[1:]) for r in reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)],
            }
            for name, kwargs in BEAMS.items():
                rows = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kwargs)
                expected[name] = [_cut(r[1:]) for r in rows]
        saved[kind] = (path, reference, expected)
    return saved


def _close(got, expected, relative=1e-4):
    """Equal up to float32 rounding (tiny T5s with a large initializer_factor have logits in the hundreds)."""
    return (got - expected).abs().max().item() <= relative * expected.abs().max().item()


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", ["v1.0", "v1.1"])
def test_encoder_logits_greedy_and_beams_equal_hf(tp_runner, checkpoints, kind, tp):
    path, _, expected = checkpoints[kind]
    ids, mask = padded_batch()
    with from_pretrained_parallel(path, tp=tp, max_batch_size=12, max_seq_len=16, workers=tp_runner.workers(tp), progress=False) as model:
        assert isinstance(model, ParallelSeq2SeqModel)
        encoded = model.encode(ids, mask)
        logits = model(ids, mask, expected["decoder_ids"])
        greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12).tokens
        beams = {name: model.generate(input_ids=ids, attention_mask=mask, **kwargs).tokens for name, kwargs in BEAMS.items()}
    valid = mask[..., None].bool()  # padded positions are never looked at (cross-attention masks them)
    assert _close(encoded * valid, expected["encoder"] * valid)
    assert _close(logits, expected["logits"])
    assert greedy == expected["greedy"]
    assert len({tuple(r) for r in greedy}) == 3 and sum(len(set(r)) > 5 for r in greedy) >= 2, "greedy outputs must vary"
    for name in BEAMS:
        assert beams[name] == expected[name], name
    assert beams["beam4x2"][0] != beams["beam4x2"][1]  # two different hypotheses per source, best first


def test_beam_search_differs_from_greedy_somewhere(checkpoints):
    """Otherwise the beam comparisons above would only repeat the greedy one."""
    assert any(checkpoints[k][2]["beam3"] != checkpoints[k][2]["greedy"] for k in checkpoints)


def test_sampling_is_seeded_like_hf_and_top_k_1_is_greedy(tp_runner, checkpoints):
    path, reference, expected = checkpoints["v1.1"]
    ids, mask = padded_batch()
    warpers = dict(temperature=1.3, top_k=20, top_p=0.9)
    torch.manual_seed(5)
    with torch.no_grad():  # HF draws from the global generator: seeded the same way, the same draws
        hf = [_cut(r[1:]) for r in reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, **warpers)]
    with from_pretrained_parallel(path, tp=2, max_batch_size=3, max_seq_len=16, workers=tp_runner.workers(2), progress=False) as model:
        draw = lambda seed, **kw: (
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, seed=seed, **kw).tokens
        )  # noqa: E731
        assert draw(5, **warpers) == hf and hf != expected["greedy"]
        first, again, other = draw(7, temperature=1.5), draw(7, temperature=1.5), draw(8, temperature=1.5)
        assert first == again and first != other
        assert draw(3, top_k=1) == expected["greedy"]
        assert draw(3, top_p=1e-6) == expected["greedy"]


def test_text_in_text_out_and_streaming(tp_runner, checkpoints, tmp_path):
    path, reference, _ = checkpoints["v1.1"]
    prompts = ["import os", "def walk(top, topdown=True):"]
    with from_pretrained_parallel(path, tp=2, max_batch_size=4, max_seq_len=16, workers=tp_runner.workers(2), progress=False) as model:
        result = model.generate(prompts, max_new_tokens=10)
        beams = model.generate(prompts, max_new_tokens=10, num_beams=2)
        pieces = list(model.stream(prompts[1], max_new_tokens=10))
        tokenizer = model.tokenizer
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    assert encoded["attention_mask"][0, -1] == 0  # padded on the right, as T5 expects
    with torch.no_grad():
        hf = reference.generate(**encoded, max_new_tokens=10, do_sample=False)
        hf_beams = reference.generate(**encoded, max_new_tokens=10, num_beams=2, do_sample=False)
    assert result.texts == tokenizer.batch_decode(hf, skip_special_tokens=True)
    assert beams.texts == tokenizer.batch_decode(hf_beams, skip_special_tokens=True)
    assert "".join(pieces) == result.texts[1] and len(pieces) > 1


def test_relative_bias_is_sharded_by_head_and_converts(tp_runner, checkpoints, tmp_path):
    """The head-sharded bias goes through the one sharding path: convert, reshard, consolidate."""
    from nxd_core import parallel_state as ps
    from nxd_models import t5

    path, reference, expected = checkpoints["v1.0"]
    model = t5.build(reference.config, device="meta")
    spec = get_sharding(model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight)
    assert (spec.dim, spec.full_size) == (1, 4) and ps.get_tensor_model_parallel_size() == 1
    ids, mask = padded_batch()
    assert main(["convert", str(path), "--tp", "2", "--out", str(tmp_path / "tp2")]) == 0
    assert main(["reshard", str(tmp_path / "tp2"), str(tmp_path / "tp4"), "--tp", "4"]) == 0
    with from_pretrained_parallel(
        tmp_path / "tp4", tp=4, max_batch_size=3, max_seq_len=16, workers=tp_runner.workers(4), progress=False
    ) as sharded:
        assert _close(sharded(ids, mask, expected["decoder_ids"]), expected["logits"])
    assert main(["consolidate", str(tmp_path / "tp4"), str(tmp_path / "full")]) == 0
    merged = load_file(tmp_path / "full" / "model.safetensors")
    state = reference.state_dict()
    assert all(torch.equal(merged[k], state[k]) for k in merged) and "shared.weight" in merged


def test_clear_errors(tp_runner, checkpoints):
    path, _, _ = checkpoints["v1.0"]
    with pytest.raises(ValueError, match=r"tp=3 cannot shard this T5 config \(4 attention heads\): valid tp values are \[1, 2, 4\]"):
        from_pretrained_parallel(path, tp=3)
    ids, mask = padded_batch()
    with from_pretrained_parallel(path, tp=2, max_batch_size=6, max_seq_len=8, workers=tp_runner.workers(2), progress=False) as model:
        with pytest.raises(ValueError, match=r"9 decoder rows \(prompts x beams\) exceed max_batch_size=6"):
            model.generate(input_ids=ids, attention_mask=mask, num_beams=3, max_new_tokens=4)
        with pytest.raises(ValueError, match=r"max_new_tokens=9 exceeds the decoder KV cache \(max_seq_len=8\)"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9)
        with pytest.raises(ValueError, match="beam search is deterministic here: do_sample cannot be combined with num_beams > 1"):
            model.generate(input_ids=ids[:1], attention_mask=mask[:1], num_beams=2, do_sample=True)


def test_nxd_generate_prints_the_output_and_speed(checkpoints, capsys):
    path, reference, _ = checkpoints["v1.1"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = "def walk(top, topdown=True):"
    with torch.no_grad():
        expected = tokenizer.decode(
            reference.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=8, num_beams=2)[0], skip_special_tokens=True
        )
    assert main(["generate", str(path), "--tp", "2", "--prompt", prompt, "--max-new-tokens", "8", "--num-beams", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == expected.strip() and expected.strip()
    assert "tokens/s, tp=2, 2 beams]" in out.err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["v1.0", "v1.1"])
def test_tp8_equals_hf(tp_runner, tmp_path, kind):
    """Eight heads over eight ranks: one head per rank, d_ff=50 padded to 56."""
    reference = save_tiny_t5(tmp_path, kind, num_heads=8, d_kv=4)
    ids, mask = padded_batch()
    with torch.no_grad():
        greedy = [_cut(r[1:]) for r in reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)]
        beams = [_cut(r[1:]) for r in reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, **BEAMS["beam4x2"])]
    with from_pretrained_parallel(tmp_path, tp=8, max_batch_size=12, max_seq_len=16, workers=tp_runner.workers(8), progress=False) as model:
        assert model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12).tokens == greedy
        assert model.generate(input_ids=ids, attention_mask=mask, **BEAMS["beam4x2"]).tokens == beams
