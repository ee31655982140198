"""Sharded checkpoints: round trips, consolidation, resharding, HF directories, bad input, atomicity."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from bert_fixtures import tiny_batch, tiny_bert_config
from safetensors.torch import load_file
from torch import nn
from transformers import BertForSequenceClassification

from nxd_core.checkpoint import (
    CheckpointError,
    consolidate,
    convert_to_sharded,
    load,
    load_state_dict_from_full,
    reshard,
    save,
)
from nxd_core.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from nxd_core.sharding import sharding_specs
from nxd_models.bert import parallelize_self_attention

SCRIPTS = Path(__file__).parent / "scripts"


def parallel_bert(config, seed=99):
    torch.manual_seed(seed)
    return parallelize_self_attention(BertForSequenceClassification(config)).eval()


def padded_model():
    """Every kind of sharded parameter, with padding at tp=4."""
    return nn.Sequential(
        ParallelEmbedding(10, 8, pad=True),
        ColumnParallelLinear(8, 10, gather_output=False, pad=True),
        nn.LayerNorm(10),
        RowParallelLinear(10, 8, input_is_parallel=True, pad=True),
        ParallelEmbedding(12, 6, shard_across_embedding=True, pad=True),
    )


def logits_of(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def save_trained(config, full_state, save_dir, batch):
    """Load the full weights, take one AdamW step, save model + optimizer + extras; return what was saved."""
    model = parallel_bert(config)
    load_state_dict_from_full(model, full_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**batch, labels=torch.tensor([0, 1, 0])).loss.backward()
    optimizer.step()
    extras = {"epoch": 3, "loss": torch.tensor(0.25), "best": math.inf, "tags": ("a", 1), "lr": {0: 1e-3}}
    save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extras}, save_dir)
    return model.state_dict(), optimizer.state_dict(), logits_of(model, batch)


def load_saved(config, save_dir, batch):
    model = parallel_bert(config, seed=7)
    rest = load(save_dir, model)
    return model.state_dict(), rest, logits_of(model, batch)


@pytest.fixture(scope="module")
def bert():
    config = tiny_bert_config()
    torch.manual_seed(0)
    reference = BertForSequenceClassification(config).eval()
    batch = tiny_batch()
    return config, reference, batch, logits_of(reference, batch)


def test_save_load_round_trip_at_tp2(tp_runner, tmp_path, bert):
    config, reference, batch, _ = bert
    saved = tp_runner.run(2, save_trained, config, reference.state_dict(), str(tmp_path / "ckpt"), batch)
    loaded = tp_runner.run(2, load_saved, config, str(tmp_path / "ckpt"), batch)
    for (state, optimizer, logits), (state2, rest, logits2) in zip(saved, loaded):
        assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
        assert torch.equal(logits, logits2)
        assert rest["epoch"] == 3 and rest["best"] == math.inf and rest["tags"] == ("a", 1) and rest["lr"] == {0: 1e-3}
        assert torch.equal(rest["loss"], torch.tensor(0.25)) and "model" not in rest
        assert rest["optimizer"]["param_groups"] == optimizer["param_groups"]
        for index, entry in optimizer["state"].items():  # integer keys survive, no pickle involved
            assert all(torch.equal(entry[k], rest["optimizer"]["state"][index][k]) for k in entry)
    with pytest.warns(UserWarning, match=r"leaves out per-rank tensors \(optimizer state\): optimizer/state/0/"):
        reshard(tmp_path / "ckpt", tmp_path / "tp1", tp=1)
    rest = load(tmp_path / "tp1", parallel_bert(config))
    assert rest["epoch"] == 3 and rest["optimizer"]["state"][0]["exp_avg"] is None
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["tp"] == 2 and sorted(p.name for p in (tmp_path / "ckpt").glob("tp_rank_*")) == ["tp_rank_00", "tp_rank_01"]


def save_full(model_fn, full_state, save_dir):
    model = model_fn()
    load_state_dict_from_full(model, full_state)
    save({"model": model.state_dict(), "step": 5}, save_dir)


def test_consolidate_is_bit_for_bit_the_unsharded_state_dict(tp_runner, tmp_path, bert):
    config, reference, _, _ = bert
    tp_runner.run(2, save_full, _bert_factory(config), reference.state_dict(), str(tmp_path / "tp2"))
    files = consolidate(tmp_path / "tp2", tmp_path / "full", max_shard_size=40_000)
    assert len(files) > 1 and (tmp_path / "full" / "model.safetensors.index.json").exists()
    weight_map = json.loads((tmp_path / "full" / "model.safetensors.index.json").read_text())["weight_map"]
    merged = {}
    for file in files:
        merged.update(load_file(file))
    expected = reference.state_dict()
    assert merged.keys() == expected.keys() == weight_map.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def _bert_factory(config):
    return lambda: parallel_bert(config)


def test_padded_layers_consolidate_and_reshard_exactly(tp_runner, tmp_path):
    torch.manual_seed(0)
    full = padded_model().state_dict()  # tp=1: the unsharded reference
    tp_runner.run(4, save_full, padded_model, full, str(tmp_path / "tp4"))
    consolidate(tmp_path / "tp4", tmp_path / "full")
    merged = load_file(tmp_path / "full" / "model.safetensors")
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)
    for tp in (2, 1):
        reshard(tmp_path / "tp4", tmp_path / f"tp{tp}", tp=tp)
        consolidate(tmp_path / f"tp{tp}", tmp_path / f"full{tp}")
        again = load_file(tmp_path / f"full{tp}" / "model.safetensors")
        assert all(torch.equal(again[k], full[k]) for k in full)


def load_logits(config, ckpt, batch, sharded=True):
    model = parallel_bert(config, seed=7)
    load(ckpt, model, sharded=sharded)
    return logits_of(model, batch)


def test_reshard_2_to_4_and_4_to_1_gives_the_same_outputs(tp_runner, tmp_path, bert):
    config, reference, batch, expected = bert
    tp_runner.run(2, save_full, _bert_factory(config), reference.state_dict(), str(tmp_path / "tp2"))
    (at_tp2, _) = tp_runner.run(2, load_logits, config, str(tmp_path / "tp2"), batch)
    reshard(tmp_path / "tp2", tmp_path / "tp4", tp=4)
    at_tp4 = tp_runner.run(4, load_logits, config, str(tmp_path / "tp4"), batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left out: the checkpoint holds no per-rank tensors
        reshard(tmp_path / "tp4", tmp_path / "tp1", tp=1)
    (at_tp1,) = tp_runner.run(1, load_logits, config, str(tmp_path / "tp1"), batch)
    assert load(tmp_path / "tp1", parallel_bert(config)) == {"step": 5}  # extras carry over
    for logits in [at_tp2, *at_tp4, at_tp1]:
        assert (logits - at_tp2).abs().max().item() < 1e-6
        assert (logits - expected).abs().max().item() < 1e-5


def test_hf_save_pretrained_directory_loads_unsharded_and_converts(tp_runner, tmp_path, bert):
    config, reference, batch, expected = bert
    hf_dir = tmp_path / "hf"
    reference.save_pretrained(hf_dir, max_shard_size="40KB")
    assert (hf_dir / "model.safetensors.index.json").exists() and len(list(hf_dir.glob("*.safetensors"))) > 1
    for logits in tp_runner.run(2, load_logits, config, str(hf_dir), batch, sharded=False):
        assert (logits - expected).abs().max().item() < 1e-5
    specs = sharding_specs(parallel_bert(config))  # built at tp=1: the specs are retargeted to tp=2
    convert_to_sharded(hf_dir, tmp_path / "converted", tp=2, specs=specs)
    for logits in tp_runner.run(2, load_logits, config, str(tmp_path / "converted"), batch):
        assert (logits - expected).abs().max().item() < 1e-5


# -- bad input ------------------------------------------------------------------------


@pytest.fixture
def tp1_checkpoint(tmp_path, bert):
    config, reference, _, _ = bert
    model = parallel_bert(config)
    load_state_dict_from_full(model, reference.state_dict())
    save({"model": model.state_dict()}, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    return tmp_path / "ckpt", tmp_path / "ckpt" / manifest["ranks"][0]["file"], config


def test_truncated_missing_and_damaged_files_are_named(tp1_checkpoint):
    ckpt, file, config = tp1_checkpoint
    data = file.read_bytes()
    file.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=f"checksum mismatch in {file}"):
        load(ckpt, parallel_bert(config))
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"truncated or damaged shard file {file}: {len(data) // 2} bytes"):
        load(ckpt, parallel_bert(config))
    file.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file {file}"):
        load(ckpt, parallel_bert(config))


def test_tp_mismatch_says_how_to_reshard(tp_runner, tmp_path, bert):
    config, reference, _, _ = bert
    tp_runner.run(2, save_full, _bert_factory(config), reference.state_dict(), str(tmp_path / "tp2"))
    with pytest.raises(CheckpointError, match=r"saved at tp=2 but this process runs at tp=1.*nxd reshard"):
        load(tmp_path / "tp2", parallel_bert(config))


def test_dtype_mismatch_version_and_names(tp1_checkpoint):
    ckpt, _, config = tp1_checkpoint
    with pytest.raises(CheckpointError, match=r"is torch.float32 in .* the model holds torch.float64"):
        load(ckpt, parallel_bert(config).double())
    with pytest.raises(KeyError, match=r"missing 39 \[embeddings.word_embeddings.weight.*unexpected 41 \[bert.embeddings"):
        load(ckpt, parallel_bert(tiny_bert_config(num_labels=2)).bert)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        load(ckpt, parallel_bert(config))


def test_objects_that_would_need_pickle_are_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot save object at 'model/thing'"):
        save({"model": {"thing": object()}}, tmp_path / "ckpt")


# -- atomicity ------------------------------------------------------------------------


def _kill_during_second_save(save_dir: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "interrupted_save.py"), str(save_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first saved"
        deadline = time.monotonic() + 60
        while not list(save_dir.glob(".saving.*")):  # the second save has started
            assert proc.poll() is None and time.monotonic() < deadline, "the second save never started"
            time.sleep(0.005)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert "second saved" not in proc.stdout.read(), "the save finished before it could be killed"
    finally:
        proc.kill()
        proc.wait()


def test_killed_save_keeps_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    _kill_during_second_save(ckpt)
    with pytest.warns(UserWarning, match="interrupted save"):
        restored = load(ckpt)
    assert restored["step"] == 1 and torch.equal(restored["model"]["w"], torch.full((4,), 1.0))
    # the next save commits and clears what the interrupted one left
    save({"model": {"w": torch.full((4,), 3.0)}, "step": 3}, ckpt)
    assert not list(ckpt.glob(".saving.*")) and len(list(ckpt.glob("tp_rank_00/*"))) == 1
    assert load(ckpt)["step"] == 3


def test_killed_first_save_is_detected_as_incomplete(tmp_path):
    ckpt = tmp_path / "ckpt"
    _kill_during_second_save(ckpt)
    (ckpt / "manifest.json").unlink()  # as if the interrupted save had been the first one
    with pytest.raises(CheckpointError, match="incomplete checkpoint: a save was interrupted"):
        load(ckpt)


def test_a_save_to_a_full_disk_fails_clean_and_a_later_save_that_fits_succeeds(tmp_path):
    """On a 1 MB tmpfs (a private mount namespace: unshare, root in a container, or a user namespace)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    unshare = shutil.which("unshare")
    mount = tmp_path / "disk"
    mount.mkdir()
    script = Path(__file__).parent / "scripts" / "full_disk_save.py"
    inner = f"mount -t tmpfs -o size=1m tmpfs {mount} && {sys.executable} {script} {mount}/ckpt && ls -A {mount}/ckpt {mount}/ckpt/*/"
    flags = ["-m"] if os.geteuid() == 0 else ["-r", "-m"]
    result = subprocess.run([unshare, *flags, "sh", "-c", inner], capture_output=True, text=True, timeout=120) if unshare else None
    if result is None or "mount" in result.stderr and "first saved" not in result.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() if result else 'no unshare'}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "first saved"
    assert lines[1].startswith("second failed: ") and "No space left on device" in lines[1], lines[1]
    assert lines[2] == "loaded step 1"
    assert lines[3] == "third saved, loaded step 3"
    listing = lines[4:]
    assert not [name for name in listing if ".saving" in name or ".tmp" in name or "partial" in name], listing
    assert sum(".safetensors" in name for name in listing) == 1, listing  # only the third save's file
