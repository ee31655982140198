"""The benchmark scripts keep working (tiny layouts). They print numbers; nothing here asserts a timing."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_convert_memory_prints_rss_and_bandwidth(tmp_path):
    out = _run("convert_memory.py", "--layout", "tiny", "--tp", "2", "--workdir", str(tmp_path))
    assert "disk sequential read" in out and "of the disk's read bandwidth" in out and "growth" in out
    assert list(tmp_path.iterdir()) == []  # the generated checkpoints are removed


@pytest.mark.slow  # a cold AOTInductor compile or a fresh benchmark process: minutes on 2 cores (make test-slow)
def test_load_prints_hf_and_parallel_rows(tmp_path):
    out = _run("load.py", "--layout", "tiny", "--tp", "2", "--workdir", str(tmp_path))
    for row in (
        "HF from_pretrained",
        "from_pretrained_parallel, HF directory",
        "from_pretrained_parallel, nxd convert output",
        "warm page cache",
    ):
        assert row in out


@pytest.mark.slow  # a cold AOTInductor compile or a fresh benchmark process: minutes on 2 cores (make test-slow)
def test_generate_prints_the_comparison_table(tmp_path):
    out = _run("generate.py", "--layout", "tiny", "--draft-layout", "tiny", "--new-tokens", "8", "--workdir", str(tmp_path))
    for row in ("HF generate (eager)", "ours, eager", "ours, compiled", "reading one embedding row", "acceptance", "rounds that accepted"):
        assert row in out


def test_generate_runs_a_moe_layout_with_its_roofline_counting_only_chosen_experts(tmp_path):
    out = _run("generate.py", "--layout", "moe-tiny", "--new-tokens", "8", "--workdir", str(tmp_path))
    for row in ("HF generate (eager)", "ours, eager", "ours, compiled", "roofline", "no speculative rows"):
        assert row in out
    sys.path.insert(0, str(BENCHMARKS))
    from random_checkpoint import decode_bytes_per_token

    # moe-tiny: 2 sparse layers, 8 experts of 3 x 128 x 64 bf16 weights, 2 chosen per token
    assert decode_bytes_per_token("moe-tiny", 10**7) == 10**7 - 2 * (8 - 2) * 3 * 128 * 64 * 2
    assert decode_bytes_per_token("tiny", 10**7) == 10**7
    # a token reads one row of tiny's (untied) 1000 x 128 embedding table
    assert decode_bytes_per_token("tiny", 10**7, whole_embedding=False) == 10**7 - 999 * 128 * 2


@pytest.mark.slow  # a cold AOTInductor compile or a fresh benchmark process: minutes on 2 cores (make test-slow)
def test_generate_demo_pair_prints_speculative_speedup():
    out = _run("generate.py", "--demo", "--tp", "2", "--new-tokens", "16")
    for row in ("target only", "speculative", "speedup", "eager", "compiled", "class Reader:"):
        assert row in out


def test_speculative_prints_draft_and_prompt_lookup_next_to_target_only():
    out = _run("speculative.py", "--tp", "1", "--new-tokens", "12", "--compile", "eager")
    rows = [line for line in out.splitlines() if line.startswith(" 1 eager")]
    assert [row[12:39].strip() for row in rows] == ["free generation", "grounded (the file again)", "sampled, temperature 1"]
    # draft and lookup: end-to-end and decode-only ratios, and acceptance
    assert all(row.count("x") == 4 and row.count("%") == 2 for row in rows)


def test_collectives_prints_ours_next_to_gloo():
    out = _run("collectives.py", "--tp", "2", "--max-bytes", "8192", "--max-calls", "20")
    rows = [line.split() for line in out.splitlines() if "|" in line and line.split()[0] == "2"]
    assert [row[1:3] for row in rows] == [["1", "KB"], ["8", "KB"]]
    assert "(backend)" not in out  # both rows timed the shared-memory path
    assert "all-reduce ours" in out and "gloo" in out


@pytest.mark.slow
def test_generate_prints_tp_next_to_tp1(tmp_path):
    out = _run("generate.py", "--layout", "tiny", "--draft-layout", "tiny", "--new-tokens", "8", "--tp", "2", "--workdir", str(tmp_path))
    for row in ("tp=1 ", "tp=2, shared-memory collectives", "tp=2, gloo collectives", "compiled/tp1"):
        assert row in out


def test_serve_prints_clients_next_to_generate_and_hf(tmp_path):
    out = _run("serve.py", "--layout", "tiny", "--clients", "1", "2", "--requests", "4", "--repeats", "1", "--workdir", str(tmp_path))
    for row in ("HF static batches of 2", "generate, one at a time", "serve, 1 clients", "serve, 2 clients", "x one stream", "ITL p99"):
        assert row in out


def test_peers_prints_ours_next_to_llama_cpp_or_says_why_not(tmp_path):
    out = _run("peers.py", "--quick", "--no-hf", "--workdir", str(tmp_path))
    rows = [line.split() for line in out.splitlines() if line.startswith(("llama.cpp", "ours"))]
    assert ("llama.cpp: not measured" in out) != any(row[0] == "llama.cpp" and row[2] == "q8_0" for row in rows)
    assert [row[1] for row in rows if row[0] == "ours"] == ["bf16", "int8"]
    assert all(row[-1].endswith("%") for row in rows if row[0] != "llama.cpp:") and "roofline" in out
    assert list(tmp_path.iterdir()) == []


def test_bf16_kernel_prints_every_path_next_to_aten():
    out = _run("bf16_kernel.py", "--quick", "--rows", "1", "3")
    assert "ATen F.linear" in out and "amx: not implemented" in out and "memory copy" in out
    rows = [line for line in out.splitlines() if "small [512, 1024]" in line]
    header = next(line for line in out.splitlines() if "ATen F.linear" in line)
    assert len(rows) == 2 and all(row.count("GB/s") == 1 + header.count("nxd ") for row in rows)


def test_fused_calls_prints_one_call_per_weight_next_to_shared_calls():
    out = _run("fused_calls.py", "--quick")
    assert "calls one per weight" in out and "fastest round of each" in out
    assert out.count("q/k/v and gate/up together") >= 1 and "bf16:" in out


def test_attention_prints_the_kernel_next_to_the_python_path():
    out = _run("attention.py", "--calls-only")
    assert "python (compiled)" in out and out.count("x\n") >= 8


@pytest.mark.slow  # compiles two decode steps (make test-slow)
def test_attention_prints_decoding_with_the_kernel_on_and_off():
    out = _run("attention.py", "--layouts", "tiny", "--new-tokens", "8", "--repeats", "1")
    assert "python path" in out and out.count("tiny layout bf16") == 2


def test_int8_kernel_prints_the_decode_and_prefill_tables():
    out = _run("int8_kernel.py", "--quick")
    for row in ("ATen bf16 F.linear", "nxd bf16_linear", "int8 fallback", "memory copy", "prefill", "dequantize to bf16"):
        assert row in out


@pytest.mark.slow  # two compiled decodes (~1.5 min here); test_quantization covers the quantized paths
def test_quant_prints_bf16_next_to_int8_round_by_round(tmp_path):
    out = _run(
        "quant.py",
        "--layouts",
        "tiny",
        "--tp",
        "1",
        "--new-tokens",
        "8",
        "--no-hf",
        "--methods",
        "int8",
        "--rounds",
        "2",
        "--workdir",
        str(tmp_path),
    )
    assert "tiny tp=1 round 1: bf16" in out and "tiny tp=1 round 2: int8" in out  # the second round in the other order
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny ") and " round " not in line]
    assert [row[2] for row in rows] == ["bf16", "int8"]
    assert rows[1][3 + 5].endswith("x") and len(rows[1]) == 3 + 5 + 2  # each round's ratio over bf16
    assert "of roofline" in out and "int8 kernel:" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # ten worker groups and a cold compile (~1.5 min here); test_compile_policy covers the policy
def test_first_run_prints_eager_next_to_both_policies(tmp_path):
    out = _run("first_run.py", "--quick", "--workdir", str(tmp_path))
    assert "old cold" in out and "new warm" in out
    assert "demo tp=1: compiling the step once into the warm cache took" in out
    rows = [line for line in out.splitlines() if line.startswith("demo ") and "x, " in line]
    assert len(rows) == 2 and all("new: " in r for r in rows)


@pytest.mark.slow  # a dozen fresh processes, two worker groups
def test_startup_prints_each_part_and_the_whole_command():
    out = _run("startup.py", "--repeats", "1")
    assert "import torch" in out and "start and close 2 workers" in out and "(shell to exit)" in out
