"""Parallel BERT (nxd_models.bert) through from_pretrained_parallel equals Hugging Face at tp 1, 2 and 4."""

import pytest
import torch
from bert_fixtures import HEADS, save_tiny_bert, tiny_batch
from safetensors.torch import load_file, save_file

from nxd_models import from_pretrained_parallel
from nxd_models.handles import ParallelEncoderModel


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny checkpoint per head: (path, HF reference)."""
    saved = {}
    for head in HEADS:
        path = tmp_path_factory.mktemp(head)
        saved[head] = (path, save_tiny_bert(path, head))
    return saved


def _hf_output(reference, batch):
    with torch.no_grad():
        out = reference(**batch)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_head_equals_hf_with_token_types_and_padding(tp_runner, checkpoints, tp):
    batch = tiny_batch(vocab=61)
    for head, (path, reference) in checkpoints.items():
        expected = _hf_output(reference, batch)
        with from_pretrained_parallel(path, tp=tp, workers=tp_runner.workers(tp), progress=False) as model:
            assert isinstance(model, ParallelEncoderModel)
            got = model(**batch)
        assert got.shape == expected.shape, head
        assert (got - expected).abs().max().item() < 1e-4, head


def test_token_types_and_mask_matter(tp_runner, checkpoints):
    """The comparisons above would pass with ignored inputs only if these did not change the output."""
    path, _ = checkpoints["BertModel"]
    batch = tiny_batch(vocab=61)
    with from_pretrained_parallel(path, tp=2, workers=tp_runner.workers(2), progress=False) as model:
        full = model(**batch)
        no_types = model(batch["input_ids"], batch["attention_mask"])
        no_mask = model(batch["input_ids"], token_type_ids=batch["token_type_ids"])
    assert (full - no_types).abs().max() > 1e-3
    assert (full[1] - no_mask[1]).abs().max() > 1e-3  # the padded row
    assert torch.allclose(full[0], no_mask[0], atol=1e-5)  # a row without padding


def test_classify_text_pairs_with_id2label(tp_runner, checkpoints):
    path, reference = checkpoints["BertForSequenceClassification"]
    with from_pretrained_parallel(path, tp=2, workers=tp_runner.workers(2), progress=False) as model:
        encoded = model.encode_text(["the dog sat", "a red cat ran fast"], ["the cat sat", "a blue dog"])
        results = model.classify(["the dog sat", "a red cat ran fast"], ["the cat sat", "a blue dog"])
    assert (encoded["token_type_ids"] == 1).any()
    with torch.no_grad():
        expected = reference(**encoded).logits.softmax(-1)
    for result, row in zip(results, expected):
        assert set(result["probabilities"]) == {"different", "paraphrase"}
        assert result["label"] == reference.config.id2label[int(row.argmax())]
        assert abs(result["probabilities"]["paraphrase"] - row[1].item()) < 1e-5


def test_legacy_names_and_pretraining_heads_load(tp_runner, checkpoints, tmp_path):
    """A TF-era checkpoint (LayerNorm gamma/beta, pooler and next-sentence head) loads as the masked LM."""
    path, reference = checkpoints["BertForMaskedLM"]
    state = load_file(path / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
    renamed.update(
        {
            "bert.pooler.dense.weight": torch.zeros(32, 32),
            "bert.pooler.dense.bias": torch.zeros(32),
            "cls.seq_relationship.weight": torch.zeros(2, 32),
            "cls.seq_relationship.bias": torch.zeros(2),
            "cls.predictions.decoder.bias": state["cls.predictions.bias"].clone(),
        }
    )
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    save_file(renamed, tmp_path / "model.safetensors")
    batch = tiny_batch(vocab=61)
    with from_pretrained_parallel(tmp_path, tp=2, workers=tp_runner.workers(2), progress=False) as model:
        assert (model(**batch) - _hf_output(reference, batch)).abs().max().item() < 1e-4


def test_tp_that_does_not_divide_heads_is_refused(checkpoints):
    path, _ = checkpoints["BertModel"]
    with pytest.raises(ValueError, match=r"tp=3 cannot shard this BERT config \(4 attention heads\): valid tp values are \[1, 2, 4\]"):
        from_pretrained_parallel(path, tp=3)


def test_nxd_classify_prints_label_and_probabilities(checkpoints, capsys):
    from nxd_models.cli import main

    path, reference = checkpoints["BertForSequenceClassification"]
    args = [
        "classify",
        str(path),
        "--tp",
        "2",
        "--text",
        "the dog sat",
        "--text-pair",
        "the cat sat",
        "--text",
        "a red cat",
        "--text-pair",
        "a blue dog",
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("the dog sat | the cat sat\t")
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(path)(
        ["the dog sat", "a red cat"], ["the cat sat", "a blue dog"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        expected = reference(**encoded).logits.softmax(-1)
    for line, row in zip(lines, expected):
        _, label, probabilities = line.split("\t")
        assert label == reference.config.id2label[int(row.argmax())]
        assert f"paraphrase={row[1].item():.4f}" in probabilities
    assert main(["classify", str(path), "--text", "a", "--text", "b", "--text-pair", "c"]) == 2
    assert "give one --text-pair per --text" in capsys.readouterr().err
    assert main(["generate", str(path), "--prompt", "the dog"]) == 2
    assert "is an encoder (bert), it does not generate: use `nxd classify`" in capsys.readouterr().err


def test_convert_leaves_out_heads_the_model_lacks(tp_runner, checkpoints, tmp_path):
    """`nxd convert` of a checkpoint with pre-training heads, then loading the sharded output."""
    from nxd_models.cli import main

    path, reference = checkpoints["BertForMaskedLM"]
    source = tmp_path / "pretraining"
    source.mkdir()
    state = load_file(path / "model.safetensors")
    state.update({"bert.pooler.dense.weight": torch.zeros(32, 32), "cls.seq_relationship.weight": torch.zeros(2, 32)})
    save_file(state, source / "model.safetensors")
    (source / "config.json").write_bytes((path / "config.json").read_bytes())
    assert main(["convert", str(source), "--tp", "2", "--out", str(tmp_path / "tp2")]) == 0
    batch = tiny_batch(vocab=61)
    with from_pretrained_parallel(tmp_path / "tp2", tp=2, workers=tp_runner.workers(2), progress=False) as model:
        assert (model(**batch) - _hf_output(reference, batch)).abs().max().item() < 1e-4


@pytest.mark.slow
def test_tp8_equals_hf(tp_runner, tmp_path):
    reference = save_tiny_bert(tmp_path, "BertForMaskedLM", num_attention_heads=8)
    batch = tiny_batch(vocab=61)
    with from_pretrained_parallel(tmp_path, tp=8, workers=tp_runner.workers(8), progress=False) as model:
        assert (model(**batch) - _hf_output(reference, batch)).abs().max().item() < 1e-4
