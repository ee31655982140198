"""The int4 weight-only kernel equals the fp32 dequantized product up to rounding, on each SIMD path
this CPU has, and is used only where it qualifies."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from nxd_core import int4_kernels
from nxd_core.cpp_build import cpu_flags
from nxd_core.quantization import dequantize, quantize_int4
from zoo_tests.shared_calls import shared_call_failures

ROOT = Path(__file__).resolve().parent.parent
# K: multiples of 128 and not (64, 96, 160, 2112: a partial last block of the 128-input paths), none of 512
# but 2048; odd N (a last single weight row).
ROWS, FEATURES, GROUPS, OUTPUTS = [1, 2, 3, 5, 8], [64, 96, 160, 2112, 4096 + 128], [32, 64, 128], [1, 3, 64, 257]

needs_kernel = pytest.mark.skipif(not int4_kernels.prepare(), reason="needs a CPU with AVX2/FMA and a C++ compiler")

# The kernel's paths, best first, and the CPU flags (/proc/cpuinfo) each needs.
PATHS = {"avx512bf16": {"avx512f", "avx512bw", "avx512_bf16"}, "avx512": {"avx512f", "avx512bw"}, "avx2": {"avx2", "fma"}}


def _reference(x, packed, scale, w=None):
    """The exact sum (float64) and the sum of |terms| (how large fp32's accumulation error can be)."""
    w = dequantize(packed, scale, torch.float64) if w is None else w
    return x.double() @ w.T, x.double().abs() @ w.abs().T


def _within_rounding(out, x, packed, scale, reference=None):
    """bf16: within a bf16 half-ulp (2^-8 relative, elementwise) of the exact sum, plus fp32's
    accumulation error; fp32: within fp32 accumulation error."""
    exact, terms = _reference(x, packed, scale) if reference is None else reference
    tolerance = 1e-6 * terms + (2**-8 * exact.abs() if x.dtype == torch.bfloat16 else 0)
    return bool(((out.double() - exact).abs() <= tolerance).all())


def _sweep() -> list[str]:
    """Every (rows, K, group, N, dtype) of the grid, and rows up to max_rows on a few shapes, through
    the kernel in this process; the failures. Each row count is the first rows of one x."""
    failures = []
    cases = [(ROWS, n, k, group) for n in OUTPUTS for k in FEATURES for group in GROUPS if k % group == 0]
    cases += [([17, 40, int4_kernels.max_rows(torch.bfloat16)], n, k, group) for n, k, group in ((67, 160, 32), (33, 320, 64))]
    for rows, n, k, group in cases:
        generator = torch.Generator().manual_seed(n * 10007 + k + group)
        packed, scale = quantize_int4(torch.randn(n, k, generator=generator), group)
        w = dequantize(packed, scale, torch.float64)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(max(rows), k, generator=generator).to(dtype)
            exact, terms = _reference(x, packed, scale, w)
            for m in rows:
                out = torch.ops.nxd.int4_linear(x[:m], packed, scale)
                if out.dtype != dtype or out.shape != (m, n) or not _within_rounding(out, x[:m], packed, scale, (exact[:m], terms[:m])):
                    failures.append(f"rows={m} K={k} G={group} N={n} {dtype}")
    return failures


def _row_invariance() -> list[str]:
    """Each output row bit for bit the same whatever the other rows (M, the row tiles) and the thread
    split (which weight rows share a tile): the serving engine's batch invariance relies on it."""
    failures = []
    threads = torch.get_num_threads()
    for n, k, group in ((257, 2112, 32), (131, 384, 128), (129, 192, 64), (65, 192, 6)):
        generator = torch.Generator().manual_seed(n + k)
        # Rounding made visible through bf16 outputs: inputs a and a + 8 (other lanes, one group) get
        # the same weights and x = +-2^20, which cancel exactly only at the end, so the fp32 sums of
        # those lanes carry large values and round the other terms coarsely; a sum in another order
        # ends elsewhere.
        w = torch.randn(n, k, generator=generator)
        pairs = torch.arange(0, k - 8, 48)
        pairs = pairs[pairs % group < group - 8]
        w[:, pairs + 8] = w[:, pairs]
        packed, scale = quantize_int4(w, group)
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(37, k, generator=generator)  # tiles of 4, 2 and 1 rows; two blocks of 16
            x[:, pairs], x[:, pairs + 8] = 2.0**20, -(2.0**20)
            x = x.to(dtype)
            full = torch.ops.nxd.int4_linear(x, packed, scale)
            parts = [torch.ops.nxd.int4_linear(x[i : i + 1], packed, scale) for i in range(len(x))]
            parts += [torch.ops.nxd.int4_linear(x[3:6], packed, scale), torch.ops.nxd.int4_linear(x[30:], packed, scale)]
            torch.set_num_threads(1 if threads > 1 else 2)
            try:
                other_split = torch.ops.nxd.int4_linear(x, packed, scale)
            finally:
                torch.set_num_threads(threads)
            same = torch.equal(torch.cat(parts[:37]), full) and torch.equal(parts[37], full[3:6]) and torch.equal(parts[38], full[30:])
            if not (same and torch.equal(other_split, full)):
                failures.append(f"K={k} G={group} N={n} {dtype}")
    return failures


def _many() -> list[str]:
    """int4_linear_many (q, k and v in one call) bit for bit each weight's own call, on one and two threads."""
    failures, generator = [], torch.Generator().manual_seed(12)
    for k, group, outs in ((384, 128, [64, 3, 129]), (2112, 32, [256, 64, 64]), (192, 6, [5, 70])):
        weights = [quantize_int4(torch.randn(n, k, generator=generator), group) for n in outs]
        one, many = torch.ops.nxd.int4_linear, torch.ops.nxd.int4_linear_many
        failures += shared_call_failures(f"K={k} G={group} N={outs}", weights, one, many, k, seed=k + group)
    return failures


def _check() -> dict:
    return {"isa": int4_kernels.isa(), "sweep": _sweep(), "row_invariance": _row_invariance(), "many": _many()}


def _in_child(path: str) -> dict:
    """NXD_INT4_KERNEL is read once per process: a forced path runs in a child."""
    code = "import json; from nxd_core import int4_kernels as k; from zoo_tests import test_int4_kernel as t; k.prepare(); print(json.dumps(t._check()))"
    env = {**os.environ, "NXD_INT4_KERNEL": path, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_kernel
@pytest.mark.parametrize("path", list(PATHS))
def test_each_path_matches_reference_and_is_row_invariant(path):
    """On each path this CPU has (its best in this process, the others forced in a child): the
    dequantized reference within rounding, rows computed independently, and several weights in one
    call as each alone, bit for bit."""
    if not PATHS[path] <= cpu_flags():
        pytest.skip(f"this CPU has no {path}")
    best = next(p for p, flags in PATHS.items() if flags <= cpu_flags())
    result = _check() if path == best and os.environ.get("NXD_INT4_KERNEL", path) == path else _in_child(path)
    assert result == {"isa": path, "sweep": [], "row_invariance": [], "many": []}


@needs_kernel
@pytest.mark.parametrize("group", [2, 6, 8, 16, 48, 96, 256])
def test_other_groups_and_strided_x(group):
    """fp32 paths: a group's last G % 32 inputs take the scalar path. BF16 path: groups of 8 and 16
    (16 and 8 scales per block), 256 (a scale over two blocks); 2, 6, 48, 96 take the fp32 AVX-512
    path. More than 16 rows (two blocks of x)."""
    k = 768 if group == 256 else 192
    generator = torch.Generator().manual_seed(group)
    packed, scale = quantize_int4(torch.randn(130, k, generator=generator), group)
    x = torch.randn(40, 2 * k, generator=generator).bfloat16()[:, ::2]  # not contiguous
    assert _within_rounding(torch.ops.nxd.int4_linear(x, packed, scale), x, packed, scale)


def test_an_unknown_override_is_warned_about(monkeypatch):
    assert set(int4_kernels.PATHS) == set(PATHS)
    monkeypatch.setenv("NXD_INT4_KERNEL", "avx1024")
    with pytest.warns(UserWarning, match="avx1024 is none of avx512bf16, avx512, avx2"):
        int4_kernels._check_override()
    monkeypatch.setenv("NXD_INT4_KERNEL", "avx2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        int4_kernels._check_override()


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
        (torch.randn(int4_kernels.max_rows(torch.bfloat16) + 1, 64, generator=generator).bfloat16(), False),  # too many rows
        (torch.randn(4, 64, generator=generator).half(), False),  # fp16
        (torch.randn(int4_kernels.max_rows(torch.float32) + 1, 64, generator=generator), False),  # too many fp32 rows
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
