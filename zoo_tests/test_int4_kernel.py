"""The int4 weight-only kernel equals the fp32 dequantized product up to rounding, on each SIMD path
this CPU has, and is used only where it qualifies."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nxd_core import int4_kernels
from nxd_core.quantization import dequantize, quantize_int4

ROOT = Path(__file__).resolve().parent.parent
ROWS, FEATURES, GROUPS, OUTPUTS = [1, 2, 5, 8], [64, 128, 2048, 4096 + 128], [32, 64, 128], [1, 3, 64, 257]

needs_kernel = pytest.mark.skipif(not int4_kernels.prepare(), reason="needs a CPU with AVX2/FMA and a C++ compiler")


def _reference(x, packed, scale):
    """The exact sum (float64) and the sum of |terms| (how large fp32's accumulation error can be)."""
    w = dequantize(packed, scale, torch.float64)
    return x.double() @ w.T, x.double().abs() @ w.abs().T


def _within_rounding(out, x, packed, scale):
    """bf16: within a bf16 half-ulp (2^-8 relative, elementwise) of the exact sum, plus fp32's
    accumulation error; fp32: within fp32 accumulation error."""
    exact, terms = _reference(x, packed, scale)
    tolerance = 1e-6 * terms + (2**-8 * exact.abs() if x.dtype == torch.bfloat16 else 0)
    return bool(((out.double() - exact).abs() <= tolerance).all())


def _sweep() -> list[str]:
    """Every (rows, K, group, N, dtype) of the grid through the kernel in this process; the failures."""
    failures = []
    for n in OUTPUTS:
        for k in FEATURES:
            for group in (g for g in GROUPS if k % g == 0):
                generator = torch.Generator().manual_seed(n * 10007 + k + group)
                packed, scale = quantize_int4(torch.randn(n, k, generator=generator), group)
                for rows in ROWS:
                    for dtype in (torch.bfloat16, torch.float32):
                        x = torch.randn(rows, k, generator=generator).to(dtype)
                        out = torch.ops.nxd.int4_linear(x, packed, scale)
                        if out.dtype != dtype or out.shape != (rows, n) or not _within_rounding(out, x, packed, scale):
                            failures.append(f"rows={rows} K={k} G={group} N={n} {dtype}")
    return failures


@needs_kernel
def test_kernel_matches_reference_on_this_cpus_path():
    assert int4_kernels.isa() in ("avx512bf16", "avx512", "avx2")
    assert _sweep() == []


@needs_kernel
def test_avx2_path_matches_reference():
    """NXD_INT4_KERNEL is read once per process: the AVX2 path runs in a child."""
    code = "import json; from nxd_core import int4_kernels as k; from zoo_tests import test_int4_kernel as t; k.prepare(); print(json.dumps([k.isa(), t._sweep()]))"
    env = {**os.environ, "NXD_INT4_KERNEL": "avx2", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    isa, failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert isa == "avx2" and failures == []


@needs_kernel
@pytest.mark.parametrize("group", [2, 6, 48, 96])
def test_groups_that_are_not_a_multiple_of_32_and_strided_x(group):
    """A group's last G % 32 inputs take the scalar path; more than 16 rows (two blocks of x)."""
    generator = torch.Generator().manual_seed(group)
    packed, scale = quantize_int4(torch.randn(130, 192, generator=generator), group)
    x = torch.randn(40, 384, generator=generator).bfloat16()[:, ::2]  # not contiguous
    assert _within_rounding(torch.ops.nxd.int4_linear(x, packed, scale), x, packed, scale)


@needs_kernel
def test_shapes_are_checked():
    packed, scale = quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(RuntimeError, match="packed"):
        torch.ops.nxd.int4_linear(torch.randn(2, 62), packed, scale)
    with pytest.raises(RuntimeError, match="groups"):
        torch.ops.nxd.int4_linear(torch.randn(2, 64), packed, scale[:, :1].repeat(1, 3).contiguous())


def test_fallback_for_inputs_that_do_not_qualify(monkeypatch):
    calls = []
    kernel = int4_kernels._extension
    if kernel is not None:
        monkeypatch.setattr(int4_kernels, "_extension", lambda x, p, s: calls.append(tuple(x.shape)) or kernel(x, p, s))
    generator = torch.Generator().manual_seed(3)
    packed, scale = quantize_int4(torch.randn(48, 64, generator=generator), 32)
    bias = torch.randn(48, generator=generator)
    cases = [
        (torch.randn(2, 3, 64, generator=generator).bfloat16(), True),  # 3-D, 6 rows: the kernel
        (torch.randn(int4_kernels.MAX_ROWS + 1, 64, generator=generator).bfloat16(), False),  # too many rows
        (torch.randn(4, 64, generator=generator).half(), False),  # fp16
        (torch.randn(4, 64, generator=generator), True),  # fp32: the kernel
    ]
    for x, _ in cases:
        with torch.inference_mode():
            out = int4_kernels.int4_linear(x, packed, scale, bias.to(x.dtype))
        exact = _reference(x.reshape(-1, 64), packed, scale)[0].view(*x.shape[:-1], 48) + bias.double()
        assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], 48)
        # bf16/fp16: rounding of the product and of the bias sum, relative to the output's size
        rtol = 1e-5 if x.dtype == torch.float32 else 3 * 2**-8
        assert (out.double() - exact).abs().max() <= rtol * exact.abs().max()
    x = torch.randn(1, 64, generator=generator).bfloat16().requires_grad_()
    int4_kernels.int4_linear(x, packed, scale).sum().backward()  # autograd goes through the fallback
    assert x.grad is not None
    if kernel is not None:
        assert calls == [(6, 64), (4, 64)]


@needs_kernel
def test_compiled_graph_calls_the_kernel_once():
    from torch._inductor.utils import run_and_get_code

    packed, scale = quantize_int4(torch.randn(40, 64), 32)
    x = torch.randn(3, 64).bfloat16()
    fn = lambda x: int4_kernels.int4_linear(x, packed, scale) * 2
    with torch.inference_mode():
        compiled, code = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False), x)
    assert "\n".join(code).count("nxd.int4_linear.default(") == 1
    torch.testing.assert_close(compiled, fn(x), rtol=0, atol=0)


def test_a_cpu_without_avx2_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(int4_kernels, "_extension", None)
    monkeypatch.setattr(int4_kernels, "_unavailable", False)
    monkeypatch.setattr(int4_kernels, "cpu_flags", lambda: {"sse2", "avx"})
    with pytest.warns(UserWarning, match="no AVX2/FMA") as caught:
        assert int4_kernels.prepare() is False
        assert int4_kernels.prepare() is False  # not tried (nor warned) again
    assert len(caught) == 1 and int4_kernels.isa() is None
    packed, scale = quantize_int4(torch.randn(6, 64, generator=torch.Generator().manual_seed(4)), 32)
    x = torch.randn(2, 64)
    assert torch.allclose(int4_kernels.int4_linear(x, packed, scale), x @ dequantize(packed, scale).T, atol=1e-5)
