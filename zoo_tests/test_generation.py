"""Generation: greedy equals Hugging Face generate, sampling is seeded, streaming and stopping work."""

import pytest
import torch
from llama_fixtures import left_padded_batch, save_tiny_llama, save_tiny_tokenizer

from nxd_models import from_pretrained_parallel


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-gen")
    reference = save_tiny_llama(path, "gqa", initializer_range=0.2)  # 0.1 locks rows into one repeated token
    save_tiny_tokenizer(path)
    return path, reference


def _hf_new_tokens(reference, ids, mask, **kwargs):
    with torch.no_grad():
        out = reference.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1] :]


def _padded(rows, width, pad=0):
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows])


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("batch", ["one", "three left-padded"])
def test_greedy_is_token_identical_to_hf_generate(tp_runner, checkpoint, tp, batch):
    path, reference = checkpoint
    ids, mask = left_padded_batch()
    if batch == "one":
        ids, mask = ids[:1], mask[:1]
    expected = _hf_new_tokens(reference, ids, mask, max_new_tokens=20, do_sample=False)
    with from_pretrained_parallel(path, tp=tp, max_batch_size=3, max_seq_len=40, workers=tp_runner.workers(tp), progress=False) as model:
        result = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(_padded(result.tokens, expected.shape[1]), expected)
    assert all(len(set(row)) > 5 for row in result.tokens), "outputs must vary for the comparison to mean something"
    assert result.stats["new_tokens"] == sum(len(r) for r in result.tokens)


def test_stops_at_eos_like_hf(tp_runner, checkpoint):
    path, reference = checkpoint
    ids, mask = left_padded_batch()
    free = _hf_new_tokens(reference, ids, mask, max_new_tokens=12, do_sample=False)
    eos = int(free[0, 4])  # make a token that row 0 produces at step 5 the end-of-sequence token
    expected = _hf_new_tokens(reference, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    with from_pretrained_parallel(path, tp=2, max_batch_size=3, max_seq_len=40, workers=tp_runner.workers(2), progress=False) as model:
        result = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos)
    assert result.tokens[0][-1] == eos and len(result.tokens[0]) <= 5
    assert torch.equal(_padded(result.tokens, expected.shape[1]), expected)


def test_sampling_is_seeded_and_top_k_1_is_greedy(tp_runner, checkpoint):
    path, _ = checkpoint
    ids, mask = left_padded_batch()
    with from_pretrained_parallel(path, tp=2, max_batch_size=3, max_seq_len=40, workers=tp_runner.workers(2), progress=False) as model:
        draw = lambda seed, **kw: (
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=True, seed=seed, eos_token_id=[], **kw).tokens
        )  # noqa: E731
        first, again, other = draw(7, temperature=1.5), draw(7, temperature=1.5), draw(8, temperature=1.5)
        assert first == again and first != other
        greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[]).tokens
        assert draw(3, top_k=1) == greedy
        assert draw(3, top_p=1e-6) == greedy  # top_p keeps at least the most likely token


def test_text_prompts_streaming_and_stop_strings(tp_runner, checkpoint):
    path, _ = checkpoint
    with from_pretrained_parallel(path, tp=2, max_batch_size=2, max_seq_len=64, workers=tp_runner.workers(2), progress=False) as model:
        prompts = ["def main(", "import os"]
        result = model.generate(prompts, max_new_tokens=16, eos_token_id=[])
        assert len(result.texts) == 2 and all(len(t) > 0 for t in result.texts)

        seen = []
        streamed = model.generate(prompts, max_new_tokens=16, eos_token_id=[], callback=seen.append)
        assert streamed.tokens == result.tokens and len(seen) == 16 and all(len(s[0]) == 1 for s in seen)

        pieces = list(model.stream("def main(", max_new_tokens=16, eos_token_id=[]))
        assert len(pieces) > 1 and "".join(pieces) == result.texts[0]

        stop = result.texts[0][3:6]
        stopped = model.generate(["def main("], max_new_tokens=16, eos_token_id=[], stop=[stop])
        assert stopped.texts[0] == result.texts[0][: result.texts[0].find(stop)]
        assert len(stopped.tokens[0]) < 16


def test_limits_are_clear_errors(tp_runner, checkpoint):
    path, _ = checkpoint
    with from_pretrained_parallel(path, tp=2, max_batch_size=2, max_seq_len=16, workers=tp_runner.workers(2), progress=False) as model:
        with pytest.raises(ValueError, match=r"prompt of 10 tokens \+ max_new_tokens=8 exceeds max_seq_len=16"):
            model.generate(input_ids=torch.ones(1, 10, dtype=torch.long), max_new_tokens=8)
        with pytest.raises(ValueError, match="batch of 3 prompts exceeds max_batch_size=2"):
            model.generate(input_ids=torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)
        assert len(model.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=4, eos_token_id=[]).tokens[0]) == 4


def test_nxd_generate_streams_and_reports_speed(checkpoint, capsys):
    from nxd_models.cli import main

    path, _ = checkpoint
    assert main(["generate", str(path), "--tp", "2", "--prompt", "def main(", "--max-new-tokens", "8", "--max-seq-len", "32"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def main(") and len(out.out.strip()) > len("def main(")
    assert "tokens/s overall, decode " in out.err and "tokens/s, prefill " in out.err and out.err.rstrip().endswith(", tp=2]")


@pytest.mark.parametrize("tp", [1, 2])
def test_compiled_decoding_equals_hf_generate(tp_runner, checkpoint, tp):
    path, reference = checkpoint
    ids, mask = left_padded_batch()
    expected = _hf_new_tokens(reference, ids, mask, max_new_tokens=20, do_sample=False)
    with from_pretrained_parallel(path, tp=tp, max_batch_size=3, max_seq_len=40, workers=tp_runner.workers(tp), progress=False) as model:
        compiled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, compile=True)
        again = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, compile=True)  # reuses the compiled step
    assert torch.equal(_padded(compiled.tokens, expected.shape[1]), expected)
    assert again.tokens == compiled.tokens


def test_a_trusted_call_that_no_compiled_graph_fits_compiles_instead_of_failing():
    """guarded_call(trusted=True, ...) skips the guards; a new shape then needs a graph torch will not
    compile under that stance, so the call is made again with the guards on."""
    from nxd_models.generation.worker.decoding import guarded_call, trusted_guards

    double = torch.compile(lambda x: x * 2, dynamic=False)
    assert torch.equal(guarded_call(False, double, torch.ones(3)), torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match="skip_guard_eval_unsafe"), trusted_guards(True):
        double(torch.ones(2, 5))  # what the worker saw once: no graph fits, and none may be compiled
    assert torch.equal(guarded_call(True, double, torch.ones(2, 5)), torch.full((2, 5), 2.0))
    assert torch.equal(guarded_call(True, double, torch.ones(3)), torch.full((3,), 2.0))
