"""Prompt-lookup decoding (generate(..., prompt_lookup_num_tokens=k)): n-gram proposals, verified by the target."""

import pytest
import torch
from llama_fixtures import save_tiny_llama
from speculative_fixtures import chi_square, first_tokens_of_a_round, sampling_session

from nxd_models import from_pretrained_parallel
from nxd_models.generation.worker.prompt_lookup import GROWTH, MAX_BACKOFF, PAYS, PROBE, PromptLookup
from nxd_models.generation.worker.speculative import _accept


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("lookup") / "target"
    save_tiny_llama(path, "gqa", initializer_range=0.2)
    return path


def repetitive_batch():
    """Three left-padded prompts that repeat themselves, so that n-grams recur (lengths 24, 18, 12)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.zeros(3, 24, dtype=torch.long)
    mask = torch.zeros(3, 24, dtype=torch.long)
    for row, (period, length) in enumerate([(6, 24), (5, 18), (4, 12)]):
        unit = torch.randint(3, 128, (period,), generator=generator)
        ids[row, 24 - length :] = unit.repeat(length // period + 1)[:length]
        mask[row, 24 - length :] = 1
    return ids, mask


@pytest.mark.parametrize("tp", [1, 2])
def test_prompt_lookup_greedy_equals_greedy(tp_runner, target, tp):
    ids, mask = repetitive_batch()
    load = dict(tp=tp, max_batch_size=3, max_seq_len=64, workers=tp_runner.workers(tp), progress=False)
    with from_pretrained_parallel(target, **load) as model:
        for rows in (slice(0, 1), slice(0, 3)):
            plain = model.generate(input_ids=ids[rows], attention_mask=mask[rows], max_new_tokens=24, eos_token_id=[])
            for k in (1, 4):
                looked = model.generate(
                    input_ids=ids[rows], attention_mask=mask[rows], max_new_tokens=24, eos_token_id=[], prompt_lookup_num_tokens=k
                )
                assert looked.tokens == plain.tokens, (rows, k)
                stats = looked.stats
                assert sum(stats["accepted_histogram"]) > 0 and len(stats["accepted_histogram"]) == k + 1
                assert 0 <= stats["acceptance_rate"] <= 1


@pytest.mark.slow  # the default run compiles lookup rounds in test_compile_policy; a cold AOTInductor compile or a fresh benchmark process: minutes on 2 cores (make test-slow)
def test_compiled_prompt_lookup_equals_eager_and_plain(tp_runner, target):
    ids, mask = repetitive_batch()
    load = dict(tp=2, max_batch_size=3, max_seq_len=64, workers=tp_runner.workers(2), progress=False)
    with from_pretrained_parallel(target, **load) as model:
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], compile=False)
        args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], prompt_lookup_num_tokens=3)
        eager = model.generate(**args, compile=False)
        compiled = model.generate(**args, compile=True)
        assert compiled.tokens == eager.tokens == plain.tokens
        sampled = [model.generate(**{**args, "eos_token_id": None}, do_sample=True, seed=3, compile=True).tokens for _ in range(2)]
        assert sampled[0] == sampled[1]


def test_prompt_lookup_sampling_is_seeded_and_respects_eos(tp_runner, target):
    ids, mask = repetitive_batch()
    load = dict(tp=2, max_batch_size=3, max_seq_len=64, workers=tp_runner.workers(2), progress=False)
    with from_pretrained_parallel(target, **load) as model:

        def draw(seed, **kw):
            args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=True, seed=seed, prompt_lookup_num_tokens=3)
            return model.generate(**args, **kw).tokens

        first = draw(5, eos_token_id=[])
        assert first == draw(5, eos_token_id=[]) and first != draw(6, eos_token_id=[])
        assert all(len(row) == 20 for row in first)
        eos = first[0][6]
        stopped = draw(5, eos_token_id=eos)
        assert stopped[0][-1] == eos and len(stopped[0]) <= 7 and all(eos not in row[:-1] for row in stopped)


def test_a_certain_proposal_keeps_the_target_distribution():
    """Chi-square over 5 tokens: a fixed guess is accepted with probability p(guess), else p without it is drawn."""
    draws, k = 200_000, 2
    p0 = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])
    generator = torch.Generator().manual_seed(0)
    for guess in (0, 1):  # an unlikely and a likely guess
        drafted = torch.full((draws, k), guess)
        first, accepted = first_tokens_of_a_round(drafted, None, p0, generator)  # a certainty: _accept with q None
        statistic = chi_square(first, p0)
        assert statistic < 18.47, (guess, torch.bincount(first, minlength=5) / draws, statistic)  # df=4, p=0.001
        assert abs(float((accepted > 0).double().mean()) - float(p0[guess])) < 0.01
        # keeping the guess whenever it was offered would fail the same test
        assert chi_square(drafted[:, 0], p0) > 1000


def test_a_certain_proposal_draws_as_a_one_hot_draft_does():
    """_accept with q None (prompt lookup's certain proposals) makes the same draws from the same
    values as with a one-hot q: rows that accept nothing, some, and every proposed token."""
    generator = torch.Generator().manual_seed(2)
    rows, k, vocab = 64, 3, 7
    p0 = torch.softmax(torch.randn(rows, k + 1, vocab, generator=generator), dim=-1)
    likely = p0[:, :k].argmax(dim=-1)  # mostly accepted
    drafted = torch.where(torch.rand(rows, k, generator=generator) < 0.7, likely, torch.randint(0, vocab, (rows, k), generator=generator))
    q = torch.nn.functional.one_hot(drafted, vocab).float()
    for seed in range(5):
        accepted, following = _accept(sampling_session(k, torch.Generator().manual_seed(seed)), drafted, q, p0.log())
        accepted_certain, following_certain = _accept(sampling_session(k, torch.Generator().manual_seed(seed)), drafted, None, p0.log())
        assert torch.equal(accepted, accepted_certain) and torch.equal(following, following_certain), seed
        assert set(accepted.tolist()) >= {0, k}  # rows that stop at once and rows that take every token


def test_lookup_proposes_what_followed_the_latest_occurrence_of_the_longest_ngram():
    ids = torch.tensor([[0, 7, 8, 9, 1, 7, 8, 2, 3, 7]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    lookup = PromptLookup.start(ids, mask, torch.tensor([8]), k=3, max_ngram=2, pad_to_k=False)
    proposals, counts = lookup.propose([False])
    assert proposals.tolist() == [[2, 3, 7]] and counts == [3]  # "7 8" last occurred at 4: 2 3 7 followed it
    lookup.append(0, [5])  # ... 7 8 5: no "8 5" and no "5" earlier: nothing to propose
    assert lookup.propose([False]) is None
    assert lookup.propose([True]) is None  # a finished row proposes nothing

    # A continuation that runs into the end of the text repeats; a row with nothing is padded with its last token.
    ids, mask = torch.tensor([[5, 6, 5, 9], [1, 2, 3, 9]]), torch.ones(2, 4, dtype=torch.long)
    lookup = PromptLookup.start(ids[:, :3], mask[:, :3], torch.tensor([6, 4]), k=5, max_ngram=3, pad_to_k=True)
    proposals, counts = lookup.propose([False, False])
    assert proposals.tolist() == [[5, 6, 5, 6, 5], [4, 4, 4, 4, 4]] and counts == [5, 0]


def test_lookup_backs_off_after_rounds_that_do_not_pay():
    text = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1]])
    lookup = PromptLookup.start(text, torch.ones_like(text), torch.tensor([2]), k=4, max_ngram=2, pad_to_k=False)
    assert lookup.propose([False])[0].tolist() == [[3, 4, 5, 1]]
    plain_steps = []
    for _ in range(9):
        lookup.outcome(PAYS - 1, rows=1)  # accepted too little to pay for the pass
        plain_steps.append(lookup.skip)  # the plain steps speculate_round takes before the next round
        lookup.skip = 0
        assert lookup.propose([False])[1] == [PROBE]  # the next round: a probe
    assert plain_steps[:4] == [1, GROWTH, GROWTH**2, GROWTH**3] and plain_steps[-1] == MAX_BACKOFF
    assert lookup.probing and lookup.propose([False])[1] == [PROBE]  # a probe proposes few tokens
    lookup.outcome(PAYS, rows=1)  # a round that pays: the full k, no back-off
    assert lookup.skip == 0 and lookup.propose([False])[1] == [4]


def test_prompt_lookup_argument_errors(tp_runner, target):
    load = dict(tp=1, max_seq_len=64, workers=tp_runner.workers(1), progress=False)
    ids = torch.arange(3, 10)[None]
    with from_pretrained_parallel(target, **load) as model:
        with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be an integer >= 1, got 0"):
            model.generate(input_ids=ids, prompt_lookup_num_tokens=0)
        with pytest.raises(ValueError, match="pass it or draft_model, not both"):
            model.generate(input_ids=ids, prompt_lookup_num_tokens=2, draft_model=model)
        with pytest.raises(ValueError, match="needs prompt_lookup_num_tokens"):
            model.generate(input_ids=ids, max_matching_ngram_size=3)
        with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
            model.generate(input_ids=ids, max_new_tokens=55, prompt_lookup_num_tokens=4)


def test_nxd_generate_with_prompt_lookup_reports_acceptance(capsys):
    from nxd_models.cli import main

    prompt = "def read(path):\n    with open(path) as f:\n        return f.read()\n\n\ndef read(path):\n"
    args = ["generate", "demo-llama", "--tp", "1", "--prompt", prompt, "--max-new-tokens", "16", "--no-compile"]
    assert main([*args, "--prompt-lookup", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(prompt) and "acceptance rate" in out.err and "accepted per round [" in out.err
    assert main([*args, "--prompt-lookup", "0"]) == 2
    assert "--prompt-lookup must be >= 1, got 0" in capsys.readouterr().err
