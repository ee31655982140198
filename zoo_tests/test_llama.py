"""Parallel Llama against Hugging Face LlamaForCausalLM, in driver mode and under torchrun."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llama_fixtures import CONFIGS, save_tiny_llama

from nxd_models import from_pretrained_parallel

SCRIPTS = Path(__file__).parent / "scripts"
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (directory, HF model)."""
    root = tmp_path_factory.mktemp("llama")
    return {kind: (root / kind, save_tiny_llama(root / kind, kind)) for kind in CONFIGS}


def _ids(vocab, batch=2, seq=9, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


CASES = [(kind, tp) for kind in CONFIGS for tp in (1, 2, 4)] + [(k, 8) for k in ("mha", "gqa", "gqa-replicated", "odd-vocab")]


@pytest.mark.parametrize("kind, tp", CASES)
def test_logits_match_hugging_face(tp_runner, checkpoints, kind, tp):
    path, reference = checkpoints[kind]
    ids = _ids(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(ids).logits
    with from_pretrained_parallel(path, tp=tp, workers=tp_runner.workers(tp), progress=False) as model:
        logits = model(ids)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < TOL


def test_replicated_kv_heads_and_padding_are_really_exercised(checkpoints):
    from nxd_core.sharding import ShardSpec

    config = checkpoints["gqa-replicated"][1].config
    kv = ShardSpec(dim=0, full_size=config.num_key_value_heads * 8, tp=8, max_parts=config.num_key_value_heads, unit=8)
    assert kv.parts == 2 and kv.part_of(7) == 1  # 4 ranks share each KV head
    assert ShardSpec(dim=0, full_size=101, tp=4, pad=True).is_padded


@pytest.mark.parametrize("tp", [1, 2])
def test_left_padding_matches_hugging_face(tp_runner, checkpoints, tp):
    path, reference = checkpoints["gqa"]
    ids = _ids(reference.config.vocab_size, batch=3, seq=10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
    with from_pretrained_parallel(path, tp=tp, workers=tp_runner.workers(tp), progress=False) as model:
        logits = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (logits[real] - expected[real]).abs().max().item() < TOL


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_prefill_then_decode_with_kv_cache_equals_full_forward(tp_runner, checkpoints, tp):
    path, _ = checkpoints["gqa-replicated"]
    ids = _ids(128, batch=2, seq=12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with from_pretrained_parallel(path, tp=tp, max_batch_size=2, max_seq_len=16, workers=tp_runner.workers(tp), progress=False) as model:
        full = model(ids, attention_mask=mask)
        prefill = model(ids[:, :5], attention_mask=mask[:, :5], cache_position=torch.arange(5))
        # Lists work as tensors do (the front end converts what it checked).
        steps = [model(ids[:, t : t + 1].tolist(), attention_mask=mask[:, : t + 1].tolist(), cache_position=[t]) for t in range(5, 12)]
    stepped = torch.cat([prefill, *steps], dim=1)
    real = mask.bool()
    assert (stepped[real] - full[real]).abs().max().item() < 1e-5


# -- torchrun (SPMD) ------------------------------------------------------------------------


def _torchrun(*args):
    torchrun = Path(sys.executable).parent / "torchrun"
    return subprocess.Popen([str(torchrun), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _reports(procs, out_dir: Path, timeout=300):
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]


def test_torchrun_nproc_per_node_2(checkpoints, tmp_path):
    path, _ = checkpoints["gqa"]
    script = [str(SCRIPTS / "torchrun_llama.py"), str(path), "2", str(tmp_path)]
    reports = _reports([_torchrun("--standalone", "--nproc_per_node=2", *script)], tmp_path)
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert report["error"] < TOL and "torchrun rank" in report["repr"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_joined_by_c10d_rendezvous(checkpoints, tmp_path):
    """Two single-process 'nodes' on localhost: how the same script runs across machines."""
    path, _ = checkpoints["mqa"]
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [
        _torchrun(
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=nxd-test",
            str(SCRIPTS / "torchrun_llama.py"),
            str(path),
            "2",
            str(tmp_path),
        )
        for _ in range(2)
    ]
    reports = _reports(nodes, tmp_path)
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world"] == 2 for r in reports)
    assert all(r["error"] < TOL for r in reports)


# -- bad input: clear errors, before any process starts ------------------------------------------


def _children() -> set[int]:
    me = str(os.getpid())
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if stat.read().rsplit(")", 1)[1].split()[1] == me:
                        kids.add(int(entry))
            except (FileNotFoundError, IndexError):
                pass
    return kids


@pytest.fixture
def no_new_processes():
    before = _children()
    yield
    assert _children() - before == set(), "a failed load left processes behind"


def test_tp_that_cannot_shard_the_config(checkpoints, no_new_processes):
    path, _ = checkpoints["gqa"]  # 8 heads, 4 KV heads
    with pytest.raises(ValueError, match=r"tp=3 cannot shard .*8 attention heads, 4 KV heads.*valid tp values are \[1, 2, 4, 8\]"):
        from_pretrained_parallel(path, tp=3)


def test_unknown_zoo_name(no_new_processes):
    with pytest.raises(ValueError, match=r"unknown model 'llama-9-7b'.*llama-2-7b"):
        from_pretrained_parallel("llama-9-7b", tp=2)


def test_missing_weights_file(checkpoints, tmp_path, no_new_processes):
    source, _ = checkpoints["gqa"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in source.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"missing: \['{victim.name}'\]"):
        from_pretrained_parallel(broken, tp=2)
    for file in broken.glob("*.safetensors*"):
        file.unlink()
    with pytest.raises(FileNotFoundError, match="no weights file in"):
        from_pretrained_parallel(broken, tp=2)


def test_checkpoint_of_another_architecture(tmp_path, no_new_processes):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"is a 'gpt2' model; from_pretrained_parallel supports the model types \['bert', 'llama', 'mistral', 'mixtral', 'qwen2', 'qwen3', 'qwen3_moe', 't5'\]",
    ):
        from_pretrained_parallel(tmp_path, tp=2)


def test_offline_missing_model_says_how_to_get_it(tmp_path):
    code = "from nxd_models import from_pretrained_parallel; from_pretrained_parallel('llama-2-7b', tp=2)"
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "FileNotFoundError: model 'llama-2-7b' (meta-llama/Llama-2-7b-hf) is not in the local Hugging Face cache" in out.stderr
    assert "HF_HUB_OFFLINE is set" in out.stderr and "hf download meta-llama/Llama-2-7b-hf" in out.stderr


def test_driver_mode_from_code_without_a_file_or_main_guard(checkpoints):
    """As in a notebook cell: the code has no __file__ and no `if __name__ == "__main__"` guard."""
    path, reference = checkpoints["gqa"]
    code = f"""
import torch
from nxd_models import from_pretrained_parallel
model = from_pretrained_parallel({str(path)!r}, tp=2)
print(repr(model))
print("logits", tuple(model(torch.arange(4, 12)).shape))
model.close()
"""
    out = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tp=2, dtype=torch.float32" in out.stdout and "shards in 2 worker processes (pids [" in out.stdout
    assert f"logits (1, 8, {reference.config.vocab_size})" in out.stdout
    assert "loading gqa at tp=2" in out.stderr  # the progress bar
