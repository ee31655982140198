"""The int8 weight-only kernel equals the fp32 dequantized product up to rounding, on each SIMD path
this CPU has, and is used only where it qualifies."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nxd_core import int8_kernels
from nxd_core.quantization import quantize_int8
from zoo_tests.shared_calls import shared_call_failures

ROOT = Path(__file__).resolve().parent.parent
ROWS, FEATURES, OUTPUTS = [1, 2, 5, 8], [1, 7, 64, 100, 4096, 5000], [1, 3, 64, 257]

needs_kernel = pytest.mark.skipif(not int8_kernels.prepare(), reason="needs a CPU with AVX2/FMA and a C++ compiler")


def _reference(x, q, scale):
    """The exact sum (float64) and the sum of |terms| (how large fp32's accumulation error can be)."""
    w = q.double() * scale.double()[:, None]
    return x.double() @ w.T, x.double().abs() @ w.abs().T


def _within_rounding(out, x, q, scale):
    """bf16: within a bf16 half-ulp (2^-8 relative, elementwise) of the exact sum, plus fp32's
    accumulation error; fp32: within fp32 accumulation error."""
    exact, terms = _reference(x, q, scale)
    tolerance = 1e-6 * terms + (2**-8 * exact.abs() if x.dtype == torch.bfloat16 else 0)
    return bool(((out.double() - exact).abs() <= tolerance).all())


def _sweep() -> list[str]:
    """Every (rows, K, N, dtype) of the grid through the kernel in this process; the failures."""
    failures = []
    for n in OUTPUTS:
        for k in FEATURES:
            generator = torch.Generator().manual_seed(n * 10007 + k)
            q, scale = quantize_int8(torch.randn(n, k, generator=generator))
            for rows in ROWS:
                for dtype in (torch.bfloat16, torch.float32):
                    x = torch.randn(rows, k, generator=generator).to(dtype)
                    out = torch.ops.nxd.int8_linear(x, q, scale)
                    if out.dtype != dtype or out.shape != (rows, n) or not _within_rounding(out, x, q, scale):
                        failures.append(f"rows={rows} K={k} N={n} {dtype}")
    return failures + _many_failures()


def _many_failures() -> list[str]:
    """int8_linear_many (q, k and v in one call) bit for bit each weight's own call, on one and two threads."""
    failures, generator = [], torch.Generator().manual_seed(11)
    for k, outs in ((300, [64, 3, 129]), (2048, [256, 64, 64])):
        weights = [quantize_int8(torch.randn(n, k, generator=generator)) for n in outs]
        one, many = torch.ops.nxd.int8_linear, torch.ops.nxd.int8_linear_many
        failures += shared_call_failures(f"K={k} N={outs}", weights, one, many, k, seed=k)
    return failures


@needs_kernel
def test_kernel_matches_reference_on_this_cpus_path():
    assert int8_kernels.isa() in ("avx512vnni", "avx512", "avx2")
    assert _sweep() == []


@needs_kernel
@pytest.mark.parametrize("path", ["avx2", "avx512"])
def test_lower_paths_match_reference(path):
    """NXD_INT8_KERNEL is read once per process: a lower path runs in a child."""
    if path == "avx512" and int8_kernels.isa() not in ("avx512", "avx512vnni"):
        pytest.skip("this CPU has no AVX-512")
    code = "import json; from nxd_core import int8_kernels as k; from zoo_tests import test_int8_kernel as t; k.prepare(); print(json.dumps([k.isa(), t._sweep()]))"
    env = {**os.environ, "NXD_INT8_KERNEL": path, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    isa, failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert isa == path and failures == []


@needs_kernel
def test_vnni_path_is_row_invariant_and_keeps_small_inputs_and_nans():
    """On AVX512_VNNI, bf16 x becomes a 22-bit integer (three bytes) per input with a scale per block
    of 256 inputs: a row of an M-row call is bit for bit a one-row call (weight rows are computed two at a
    time: 71 rows make blocks of 64 and 7, whose last row goes alone); inputs 2^20 below their block's largest still count
    (exactly: the lowest byte); a NaN in one row of x gives NaN in that row only (the call takes the fp32 path)."""
    if int8_kernels.isa() != "avx512vnni":
        pytest.skip("this CPU has no AVX512_VNNI")
    generator = torch.Generator().manual_seed(3)
    q, scale = quantize_int8(torch.randn(71, 300, generator=generator))
    x = torch.randn(8, 300, generator=generator).bfloat16()
    assert _within_rounding(torch.ops.nxd.int8_linear(x, q, scale), x, q, scale)
    single = torch.cat([torch.ops.nxd.int8_linear(x[m : m + 1], q, scale) for m in range(8)])
    for rows in range(1, 9):
        assert torch.equal(torch.ops.nxd.int8_linear(x[:rows], q, scale), single[:rows]), rows
    tiny = torch.zeros(1, 300).bfloat16()
    tiny[0, 0], tiny[0, 1] = 1.0, 2.0**-20  # one block: the second input only in the lowest byte
    q0 = q.clone()
    q0[:, 0] = 0  # the largest input meets zero weights: the output is the small input's alone
    expected = (2.0**-20 * q0[:, 1].float() * scale).bfloat16()
    assert expected.abs().min() > 0 and torch.equal(torch.ops.nxd.int8_linear(tiny, q0, scale)[0], expected)
    x[3, 17] = float("nan")
    out = torch.ops.nxd.int8_linear(x, q, scale)
    assert out[3].isnan().all() and not out[torch.arange(8) != 3].isnan().any()


@needs_kernel
def test_more_rows_than_one_block_and_strided_x():
    generator = torch.Generator().manual_seed(1)
    q, scale = quantize_int8(torch.randn(130, 96, generator=generator))
    x = torch.randn(40, 192, generator=generator).bfloat16()[:, ::2]  # 40 rows (> 16 per block), not contiguous
    assert _within_rounding(torch.ops.nxd.int8_linear(x, q, scale), x, q, scale)


def test_quantize_round_trip_and_zero_rows():
    generator = torch.Generator().manual_seed(2)
    w = torch.randn(33, 70, generator=generator) * torch.logspace(-4, 1, 33)[:, None]
    w[5] = 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape and scale.shape == (33,)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1)[torch.arange(33) != 5] == 127).all()
    assert (w - q.float() * scale[:, None]).abs().le(scale[:, None] / 2 * (1 + 1e-6)).all()
    assert scale[5] == 1.0 and (q[5] == 0).all()
    # each row depends on that row alone, in any dtype given
    q2, scale2 = quantize_int8(w[3:9].double())
    assert torch.equal(q2, q[3:9]) and torch.equal(scale2, scale[3:9])


def test_fallback_for_inputs_that_do_not_qualify(monkeypatch):
    calls = []
    kernel = int8_kernels._extension
    if kernel is not None:
        monkeypatch.setattr(int8_kernels, "_extension", lambda x, w, s: calls.append(tuple(x.shape)) or kernel(x, w, s))
    generator = torch.Generator().manual_seed(3)
    q, scale = quantize_int8(torch.randn(48, 64, generator=generator))
    bias = torch.randn(48, generator=generator)
    cases = [
        (torch.randn(2, 3, 64, generator=generator).bfloat16(), True),  # 3-D, 6 rows: the kernel
        (torch.randn(int8_kernels.MAX_ROWS + 1, 64, generator=generator).bfloat16(), False),  # too many rows
        (torch.randn(4, 64, generator=generator).half(), False),  # fp16
        (torch.randn(4, 64, generator=generator), True),  # fp32: the kernel
    ]
    for x, _ in cases:
        with torch.inference_mode():
            out = int8_kernels.int8_linear(x, q, scale, bias.to(x.dtype))
        exact = _reference(x.reshape(-1, 64), q, scale)[0].view(*x.shape[:-1], 48) + bias.double()
        assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], 48)
        # bf16/fp16: rounding of W * scale, of the product and of the bias sum, relative to the output's size
        rtol = 1e-5 if x.dtype == torch.float32 else 3 * 2**-8
        assert (out.double() - exact).abs().max() <= rtol * exact.abs().max()
    x = torch.randn(1, 64, generator=generator).bfloat16().requires_grad_()
    int8_kernels.int8_linear(x, q, scale).sum().backward()  # autograd goes through the fallback
    assert x.grad is not None
    if kernel is not None:
        assert calls == [(6, 64), (4, 64)]


@needs_kernel
def test_compiled_graph_calls_the_kernel_once():
    from torch._inductor.utils import run_and_get_code

    q, scale = quantize_int8(torch.randn(40, 64))
    x = torch.randn(3, 64).bfloat16()
    fn = lambda x: int8_kernels.int8_linear(x, q, scale) * 2
    with torch.inference_mode():
        compiled, code = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False), x)
    assert "\n".join(code).count("nxd.int8_linear.default(") == 1
    torch.testing.assert_close(compiled, fn(x), rtol=0, atol=0)


def test_a_cpu_without_avx2_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(int8_kernels, "_extension", None)
    monkeypatch.setattr(int8_kernels, "_unavailable", False)
    monkeypatch.setattr(int8_kernels, "cpu_flags", lambda: {"sse2", "avx"})
    with pytest.warns(UserWarning, match="no AVX2/FMA") as caught:
        assert int8_kernels.prepare() is False
        assert int8_kernels.prepare() is False  # not tried (nor warned) again
    assert len(caught) == 1 and int8_kernels.isa() is None
    q, scale = quantize_int8(torch.randn(6, 40, generator=torch.Generator().manual_seed(4)))
    x = torch.randn(2, 40)
    expected = x @ (q.float() * scale[:, None]).T
    assert torch.allclose(int8_kernels.int8_linear(x, q, scale), expected, atol=1e-5)
