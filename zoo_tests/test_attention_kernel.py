"""The decode attention kernel (nxd_core/decode_attention.cpp) equals the models' Python attention:
float32 to rounding, bfloat16 within its rounding of the exact result, on awkward shapes (head
sizes, GQA groups, slot counts not a multiple of 8, left padding, sliding windows); each row and
query gets what it gets alone; threads change nothing; torch.compile keeps it as one call; and it is
used only where it qualifies."""

import pytest
import torch

from nxd_core import attention_kernel
from nxd_models.llama import attention_mask_for, few_query_attention

pytestmark = pytest.mark.skipif(not attention_kernel.prepare(), reason="needs a CPU with AVX2/FMA and a C++ compiler")


@pytest.fixture(params=list(attention_kernel.PATHS))
def kernel_path(request):
    """Each path this CPU has (bf16 scores differ between them; fp32 always takes avx2)."""
    if request.param not in attention_kernel.available_paths():
        pytest.skip(f"this CPU has no {request.param}")
    before = attention_kernel.path()
    attention_kernel.use_path(request.param)
    yield request.param
    attention_kernel.use_path(before)


def python_attention(q, k, v, mask, scale):
    attention_kernel.disable()
    try:
        return few_query_attention(q, k, v, mask, scale)
    finally:
        attention_kernel.enable()


def case(batch, heads, kv_heads, queries, slots, dim, position, dtype, window=None, pad=0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, dim, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, slots, dim, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, slots, dim, generator=generator).to(dtype)
    valid = torch.ones(batch, position + queries, dtype=torch.long)
    valid[-1, :pad] = 0  # the last row's prompt is left-padded
    mask = attention_mask_for(valid, torch.arange(position, position + queries), slots, batch, window)
    return q, k, v, mask, dim**-0.5


SHAPES = [
    # batch, heads, kv_heads, queries, slots, dim, position
    (1, 32, 4, 1, 161, 64, 100),  # TinyLlama's decode step, cache partly filled
    (3, 8, 4, 5, 1024, 64, 300),  # a speculative verification of 5 tokens, 3 rows
    (2, 4, 4, 1, 77, 128, 76),  # no GQA, the last slot, head size 128
    (1, 8, 2, 8, 43, 8, 20),  # 8 queries, head size 8, 43 slots
    (2, 6, 3, 3, 19, 24, 0),  # from slot 0, head size 24, odd slot count
    (1, 8, 4, 16, 300, 64, 200),  # 16 queries: the widest pass llama.FEW_QUERIES sends here (lookup's k = 15)
]


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_equals_the_python_path(shape):
    q, k, v, mask, scale = case(*shape, torch.float32, pad=2 if shape[0] > 1 and shape[6] > 2 else 0)
    with torch.inference_mode():
        ours = attention_kernel.decode_attention(q, k, v, mask, scale)
        theirs = python_attention(q, k, v, mask, scale)
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_is_within_its_rounding_of_the_exact_result(shape, kernel_path):
    q, k, v, mask, scale = case(*shape, torch.bfloat16)
    exact = few_query_attention(q.double(), k.double(), v.double(), mask, scale)
    with torch.inference_mode():
        ours = attention_kernel.decode_attention(q, k, v, mask, scale)
        theirs = python_attention(q, k, v, mask, scale)
    assert ours.dtype == torch.bfloat16
    # the probabilities and the output are each rounded to bf16 once (the Python path also rounds its scores)
    bound = 4 * 2**-8 * v.double().abs().max()
    assert (ours.double() - exact).abs().max() <= bound
    assert (theirs.double() - exact).abs().max() <= 2 * bound


def test_sliding_window_and_padding_masks():
    q, k, v, mask, scale = case(2, 8, 2, 4, 90, 32, 60, torch.float32, window=16, pad=7)
    with torch.inference_mode():
        torch.testing.assert_close(
            attention_kernel.decode_attention(q, k, v, mask, scale), python_attention(q, k, v, mask, scale), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slots_past_the_mask_are_never_read(dtype, kernel_path):
    """The cost follows the filled length: slots after the last allowed one may hold anything, NaN included."""
    q, k, v, mask, scale = case(2, 8, 4, 2, 64, 16, 20, dtype)
    with torch.inference_mode():
        before = attention_kernel.decode_attention(q, k, v, mask, scale)
        k[:, :, 22:], v[:, :, 22:] = float("nan"), float("nan")
        after = attention_kernel.decode_attention(q, k, v, mask, scale)
    assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_and_query_gets_what_it_gets_alone(dtype, kernel_path):
    """Row invariance, as the serving engine and speculative verification need: bit for bit."""
    q, k, v, mask, scale = case(3, 8, 4, 11, 200, 64, 150, dtype, pad=9)  # 11 queries: HF's default lookup k = 10
    with torch.inference_mode():
        whole = attention_kernel.decode_attention(q, k, v, mask, scale)
        for row in range(3):
            alone = attention_kernel.decode_attention(q[row : row + 1], k[row : row + 1], v[row : row + 1], mask[row : row + 1], scale)
            assert torch.equal(alone, whole[row : row + 1])
            for query in range(11):
                one = attention_kernel.decode_attention(
                    q[row : row + 1, :, query : query + 1],
                    k[row : row + 1],
                    v[row : row + 1],
                    mask[row : row + 1, :, query : query + 1],
                    scale,
                )
                assert torch.equal(one, whole[row : row + 1, :, query : query + 1])


def test_threads_change_nothing(kernel_path):
    q, k, v, mask, scale = case(4, 16, 4, 4, 512, 64, 400, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = attention_kernel.decode_attention(q, k, v, mask, scale)
            torch.set_num_threads(max(2, threads))
            many = attention_kernel.decode_attention(q, k, v, mask, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_query_and_cache_rows(dtype, kernel_path):
    """q as the model makes it (transposed from [b, s, heads, d]) and the cache's rows from row 1."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 8, 32, generator=generator).transpose(1, 2).to(dtype)  # [2, 8, 3, 32], not contiguous
    cache_k, cache_v = torch.randn(2, 3, 4, 50, 32, generator=generator).to(dtype).unbind(0)
    k, v = cache_k[1:], cache_v[1:]
    mask = attention_mask_for(None, torch.arange(30, 33), 50, 2)
    with torch.inference_mode():
        ours, theirs = attention_kernel.decode_attention(q, k, v, mask, 0.2), python_attention(q, k, v, mask, 0.2)
        contiguous = attention_kernel.decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask, 0.2)
    assert torch.equal(ours, contiguous)  # strides change nothing
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    else:
        assert (ours.double() - theirs.double()).abs().max() <= 8 * 2**-8 * v.double().abs().max()


def test_compiled_graph_calls_the_kernel_once_per_attention():
    from torch._inductor.utils import run_and_get_code

    q, k, v, mask, scale = case(1, 8, 4, 1, 40, 16, 30, torch.bfloat16)
    with torch.inference_mode():
        compiled, code = run_and_get_code(torch.compile(few_query_attention, dynamic=False), q, k, v, mask, scale)
        eager = few_query_attention(q, k, v, mask, scale)
    assert "\n".join(code).count("nxd.decode_attention") >= 1 and "bmm" not in "\n".join(code)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_only_where_it_qualifies(monkeypatch):
    calls = []
    kernel = attention_kernel._extension
    monkeypatch.setattr(attention_kernel, "_extension", lambda *args: calls.append(args[0].dtype) or kernel(*args))
    q, k, v, mask, scale = case(1, 4, 2, 1, 16, 8, 10, torch.float32)
    with torch.inference_mode():
        few_query_attention(q, k, v, mask, scale)  # fp32, head size 8: the kernel
        few_query_attention(q.double(), k.double(), v.double(), mask, scale)  # float64: Python
        odd = case(1, 4, 2, 1, 16, 12, 10, torch.float32)  # head size 12: Python
        few_query_attention(*odd)
    q.requires_grad_()
    few_query_attention(q, k, v, mask, scale).sum().backward()  # autograd: Python
    assert calls == [torch.float32] and q.grad is not None


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(attention_kernel.ENV, "0")
    attention_kernel.disable()
    try:
        assert not attention_kernel.enable()
        assert not attention_kernel.qualifies(*case(1, 4, 2, 1, 16, 8, 10, torch.float32)[:3])
    finally:
        monkeypatch.delenv(attention_kernel.ENV)
        assert attention_kernel.enable()


def test_bad_input_is_refused_with_the_shapes():
    q, k, v, mask, scale = case(1, 6, 4, 1, 16, 8, 10, torch.float32)  # 6 heads over 4 KV heads
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.nxd.decode_attention(q, k, v, torch.ones(1, 1, 1, 16, dtype=torch.bool), scale)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.nxd.decode_attention(q[:, :4], k.double(), v, mask, scale)
