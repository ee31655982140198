"""The bf16 CPU kernel equals F.linear up to bfloat16 rounding, and is used only where it qualifies."""

import pytest
import torch
import torch.nn.functional as F

from nxd_core import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.prepare(), reason="needs a CPU with AVX2/FMA and a C++ compiler")


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("n, k", [(4, 8), (33, 100), (256, 688), (1001, 64)])
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
        cpu_kernels.linear(torch.randn(9, 32).bfloat16(), w)  # too many rows
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
