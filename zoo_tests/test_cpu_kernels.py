"""The bf16 CPU kernel equals F.linear up to bfloat16 rounding on every SIMD path this CPU has, gives
each row what a one-row call gives, and is used only where it qualifies."""

import pytest
import torch
import torch.nn.functional as F

from nxd_core import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.prepare(), reason="needs a CPU with AVX2/FMA and a C++ compiler")


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("n, k", [(4, 8), (33, 100), (256, 688), (1001, 64), (40, 5632)])
def test_bf16_linear_matches_f_linear(rows, n, k):
    generator = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=generator).bfloat16()
    w = torch.randn(n, k, generator=generator).bfloat16()
    bias = torch.randn(n, generator=generator).bfloat16()
    exact = x.double() @ w.double().T + bias.double()
    with torch.inference_mode():
        ours = cpu_kernels.linear(x, w, bias)
        theirs = F.linear(x, w, bias)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, n)
    # both accumulate in fp32 and round to bf16: each is within bf16 rounding of the exact product
    scale = exact.abs().max()
    assert (ours.double() - exact).abs().max() <= 2 * 2**-8 * scale
    assert (ours.double() - theirs.double()).abs().max() <= 2 * 2**-8 * scale


def test_kernel_only_where_it_qualifies(monkeypatch):
    calls = []
    kernel = cpu_kernels._extension
    monkeypatch.setattr(cpu_kernels, "_extension", lambda x, w: calls.append(x.shape) or kernel(x, w))
    w = torch.randn(16, 32).bfloat16()
    with torch.inference_mode():
        cpu_kernels.linear(torch.randn(2, 3, 32).bfloat16(), w)  # 6 rows, bf16: the kernel
        cpu_kernels.linear(torch.randn(cpu_kernels.max_rows() + 1, 32).bfloat16(), w)  # too many rows
        cpu_kernels.linear(torch.randn(1, 32), w.float())  # fp32
    x = torch.randn(1, 32).bfloat16().requires_grad_()
    cpu_kernels.linear(x, w).sum().backward()  # autograd goes through F.linear
    assert calls == [(6, 32)] and x.grad is not None


def test_compiled_graph_calls_the_kernel():
    from torch._inductor.utils import run_and_get_code

    x, w = torch.randn(1, 64).bfloat16(), torch.randn(40, 64).bfloat16()
    with torch.inference_mode():
        compiled, code = run_and_get_code(torch.compile(cpu_kernels.linear, dynamic=False), x, w)
    assert "nxd.bf16_linear" in "\n".join(code)
    torch.testing.assert_close(compiled, cpu_kernels.linear(x, w), rtol=0, atol=0)


def test_a_build_killed_midway_does_not_hang_the_next_load():
    """torch's build lock is a file; a build killed midway left it behind and every later load waited for ever."""
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils.cpp_extension import _get_build_directory

    stale = Path(_get_build_directory("nxd_bf16_linear", verbose=False)) / "lock"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("")
    code = "from nxd_core import cpu_kernels; print(cpu_kernels.prepare())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not stale.exists()


@pytest.fixture(params=list(cpu_kernels.PATHS))
def kernel_path(request):
    """Each SIMD path in turn (skipped where this CPU lacks it); the default path again afterwards."""
    name = request.param
    if name not in cpu_kernels.available_paths():
        pytest.skip(f"this CPU has no {name}: {cpu_kernels.path_support()[name]}")
    before = cpu_kernels.path()
    cpu_kernels.use_path(name)
    assert torch.ops.nxd.bf16_linear_isa() == name
    yield name
    cpu_kernels.use_path(before)


# Awkward shapes: odd N, K not a multiple of any vector width, K past the old 4096 limit, K = 1.
SHAPES = [(1, 1), (7, 1), (5, 3), (33, 100), (3, 31), (65, 97), (9, 4097), (130, 5632)]


@pytest.mark.parametrize("n, k", SHAPES)
def test_every_path_matches_f_linear_within_bf16_rounding(kernel_path, n, k):
    generator = torch.Generator().manual_seed(n * 7919 + k)
    w = torch.randn(n, k, generator=generator).bfloat16()
    for rows in range(1, cpu_kernels.MAX_ROWS[kernel_path] + 1):
        x = torch.randn(rows, k, generator=generator).bfloat16()
        exact = x.double() @ w.double().T
        ours = torch.ops.nxd.bf16_linear(x, w)
        # fp32 sums rounded once to bf16: within half a bf16 ulp of the largest value, plus fp32 error
        scale = exact.abs().max().clamp_min(1e-30)
        assert (ours.double() - exact).abs().max() <= 2**-8 * scale, (kernel_path, rows, n, k)
        assert (ours.double() - F.linear(x, w).double()).abs().max() <= 2 * 2**-8 * scale


@pytest.mark.parametrize("n, k", [(67, 31), (300, 4099), (1000, 2048)])
def test_every_path_is_row_and_thread_invariant(kernel_path, n, k):
    """Row m of an M-row call is bit for bit a one-row call on that row, for every M, and the
    result does not depend on how many threads split N, nor on which thread takes which chunk of
    rows (W [1000, 2048]: 16 chunks, taken in a different order from call to call)."""
    generator = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=generator).bfloat16()
    most = cpu_kernels.MAX_ROWS[kernel_path]
    x = torch.randn(most, k, generator=generator).bfloat16()
    single = torch.cat([torch.ops.nxd.bf16_linear(x[m : m + 1], w) for m in range(most)])
    for rows in range(1, most + 1):
        for start in range(0, most - rows + 1, 3):
            assert torch.equal(torch.ops.nxd.bf16_linear(x[start : start + rows], w), single[start : start + rows]), (rows, start)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = torch.ops.nxd.bf16_linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, single)
    for _ in range(5):
        assert torch.equal(torch.ops.nxd.bf16_linear(x, w), single)


def test_the_dispatcher_picks_the_best_path_this_cpu_has():
    assert cpu_kernels.path() == cpu_kernels.available_paths()[0]
    support = cpu_kernels.path_support()
    assert support[cpu_kernels.path()] == "available" and support["amx"].startswith("not implemented")
    with pytest.raises(RuntimeError, match="unknown path"):
        torch.ops.nxd.bf16_linear_set_isa("amx")


def _fresh(monkeypatch, flags=None, forced=None):
    """cpu_kernels as in a new process, on a CPU with `flags` (this one's by default) and NXD_BF16_KERNEL=forced."""
    path_before = cpu_kernels.path()
    monkeypatch.setattr(cpu_kernels, "_extension", None)
    monkeypatch.setattr(cpu_kernels, "_unavailable", False)
    monkeypatch.setattr(cpu_kernels, "_path", None)
    if flags is not None:
        monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: set(flags))
    if forced is None:
        monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_kernels.ENV, forced)
    return path_before


def _falls_back_to_f_linear():
    x, w = torch.randn(2, 40).bfloat16(), torch.randn(24, 40).bfloat16()
    with torch.inference_mode():
        assert torch.equal(cpu_kernels.linear(x, w), F.linear(x, w))
    return cpu_kernels.path() is None and cpu_kernels._extension is None


def test_a_forced_path_this_cpu_lacks_falls_back_to_f_linear(monkeypatch):
    _fresh(monkeypatch, flags={"avx2", "fma", "sse2"}, forced="avx512bf16")
    with pytest.warns(UserWarning, match="NXD_BF16_KERNEL=avx512bf16: this CPU lacks avx512_bf16 avx512bw avx512f avx512vl"):
        assert not cpu_kernels.prepare()
    assert _falls_back_to_f_linear()
    with pytest.raises(ValueError, match="does not run on this CPU"):
        cpu_kernels.use_path("avx512")


def test_a_cpu_without_avx2_takes_f_linear(monkeypatch):
    _fresh(monkeypatch, flags={"sse2", "avx"})
    assert cpu_kernels.available_paths() == [] and not cpu_kernels.prepare()
    assert _falls_back_to_f_linear()


def test_nxd_bf16_kernel_forces_a_path_or_aten(monkeypatch):
    before = _fresh(monkeypatch, forced="avx2")
    try:
        assert cpu_kernels.prepare() and cpu_kernels.path() == "avx2" and torch.ops.nxd.bf16_linear_isa() == "avx2"
    finally:
        torch.ops.nxd.bf16_linear_set_isa(before)
    _fresh(monkeypatch, forced="aten")
    assert not cpu_kernels.prepare() and _falls_back_to_f_linear()


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_every_path_computes_several_weights_in_one_call(kernel_path, rows):
    """bf16_linear_many (q, k and v in one call) is bit for bit each weight's own call, on one thread
    and on two (chunks of several matrices share the threads), for awkward shapes and an empty part."""
    generator = torch.Generator().manual_seed(rows)
    threads = torch.get_num_threads()
    for k, outs in ((100, [33, 7, 0, 129]), (2048, [256, 64, 64]), (4099, [3, 70])):
        x = torch.randn(rows, k, generator=generator).bfloat16()
        weights = [torch.randn(n, k, generator=generator).bfloat16() for n in outs]
        alone = torch.cat([torch.ops.nxd.bf16_linear(x, w) for w in weights], dim=1)
        for count in (1, 2):
            torch.set_num_threads(count)
            try:
                together = torch.ops.nxd.bf16_linear_many(x, weights)
            finally:
                torch.set_num_threads(threads)
            assert torch.equal(together, alone), (k, outs, count)
        pieces = cpu_kernels.linear_many(x[None], weights)  # a batch dimension, split back per weight
        assert [p.shape for p in pieces] == [(1, rows, n) for n in outs]
        assert all(torch.equal(p[0], a) for p, a in zip(pieces, alone.split(outs, dim=1)))


def test_linear_many_falls_back_per_weight_and_compiles_to_one_call():
    from torch._inductor.utils import run_and_get_code

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, generator=generator)
    weights = [torch.randn(n, 64, generator=generator) for n in (40, 8)]
    # fp32 x: F.linear for each weight
    for got, w in zip(cpu_kernels.linear_many(x, weights), weights):
        torch.testing.assert_close(got, F.linear(x, w), rtol=0, atol=0)
    xb, wb = x.bfloat16(), [w.bfloat16() for w in weights]
    with torch.inference_mode():
        compiled, code = run_and_get_code(torch.compile(cpu_kernels.linear_many, dynamic=False), xb, wb)
    assert "\n".join(code).count("nxd.bf16_linear_many.default(") == 1
    assert all(torch.equal(c, e) for c, e in zip(compiled, cpu_kernels.linear_many(xb, wb)))
