"""Speculative decoding: greedy equals target-only greedy; the sampler draws from the target's distribution."""

import pytest
import torch
from llama_fixtures import left_padded_batch, save_tiny_llama_pair
from speculative_fixtures import chi_square, first_tokens_of_a_round

from nxd_models import from_pretrained_parallel


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A target and a smaller random draft with the same vocabulary."""
    root = tmp_path_factory.mktemp("spec")
    return save_tiny_llama_pair(root)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("draft_kind", ["random draft", "draft = target"])
def test_speculative_greedy_equals_greedy(tp_runner, pair, tp, draft_kind):
    target_path, draft_path = pair
    workers = tp_runner.workers(tp)
    ids, mask = left_padded_batch()
    load = dict(tp=tp, max_batch_size=3, max_seq_len=48, workers=workers, progress=False)
    with (
        from_pretrained_parallel(target_path, **load) as target,
        from_pretrained_parallel(target_path if draft_kind == "draft = target" else draft_path, **load) as draft,
    ):
        for rows in (slice(0, 1), slice(0, 3)):
            plain = target.generate(input_ids=ids[rows], attention_mask=mask[rows], max_new_tokens=24, eos_token_id=[])
            for k in (1, 4):
                spec = target.generate(
                    input_ids=ids[rows],
                    attention_mask=mask[rows],
                    max_new_tokens=24,
                    eos_token_id=[],
                    draft_model=draft,
                    num_speculative_tokens=k,
                )
                assert spec.tokens == plain.tokens, (k, rows)
                histogram = spec.stats["accepted_histogram"]
                assert len(histogram) == k + 1 and sum(histogram) > 0
                if draft_kind == "draft = target":
                    assert spec.stats["acceptance_rate"] == 1.0
                else:
                    assert spec.stats["acceptance_rate"] < 1.0


def test_replicated_draft_beside_a_sharded_target(tp_runner, pair):
    """tp=1 on the target's tp=2 group: each worker holds a whole draft, whose steps exchange nothing."""
    target_path, draft_path = pair
    ids, mask = left_padded_batch()
    workers = tp_runner.workers(2)
    common = dict(max_batch_size=3, max_seq_len=48, workers=workers, progress=False)
    with (
        from_pretrained_parallel(target_path, tp=2, **common) as target,
        from_pretrained_parallel(draft_path, tp=1, **common) as draft,
        from_pretrained_parallel(draft_path, tp=2, **common) as sharded_draft,
    ):
        assert draft.run(_draft_shapes, draft.key) == _full_shapes(draft_path)
        assert sharded_draft.run(_draft_shapes, sharded_draft.key) != _full_shapes(draft_path)
        plain = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
        replicated = target.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], draft_model=draft, num_speculative_tokens=3
        )
        sharded = target.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], draft_model=sharded_draft, num_speculative_tokens=3
        )
    assert replicated.tokens == plain.tokens
    assert replicated.stats["accepted_histogram"] == sharded.stats["accepted_histogram"]  # the same draft, two layouts


def _draft_shapes(key):
    from nxd_core.workers import worker_state

    return {name: tuple(t.shape) for name, t in worker_state()[key].state_dict().items()}


def _full_shapes(path):
    from transformers import LlamaForCausalLM

    return {name: tuple(t.shape) for name, t in LlamaForCausalLM.from_pretrained(path).state_dict().items()}


def test_compiled_speculative_greedy_equals_greedy(tp_runner, pair, tp=2):
    """compile=True runs the draft's steps and the target's verification through torch.compile."""
    target_path, draft_path = pair
    ids, mask = left_padded_batch()
    load = dict(tp=tp, max_batch_size=3, max_seq_len=48, workers=tp_runner.workers(tp), progress=False)
    with from_pretrained_parallel(target_path, **load) as target, from_pretrained_parallel(draft_path, **load) as draft:
        plain = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], compile=False)
        spec = target.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=24,
            eos_token_id=[],
            draft_model=draft,
            num_speculative_tokens=3,
            compile=True,
        )
    assert spec.tokens == plain.tokens
    assert spec.stats["acceptance_rate"] < 1 and sum(spec.stats["accepted_histogram"]) > 0


@pytest.mark.slow  # two more cold AOTInductor compiles (the sampled rounds): make test-slow
def test_compiled_speculative_sampling_is_seeded(tp_runner, pair, tp=2):
    target_path, draft_path = pair
    ids, mask = left_padded_batch()
    load = dict(tp=tp, max_batch_size=3, max_seq_len=48, workers=tp_runner.workers(tp), progress=False)
    with from_pretrained_parallel(target_path, **load) as target, from_pretrained_parallel(draft_path, **load) as draft:
        args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, draft_model=draft, num_speculative_tokens=3, compile=True)
        sampled = [target.generate(**args, do_sample=True, seed=5).tokens for _ in range(2)]
        other = target.generate(**args, do_sample=True, seed=6).tokens
    assert sampled[0] == sampled[1] != other


def test_speculative_sampling_is_seeded_and_respects_eos(tp_runner, pair):
    target_path, draft_path = pair
    load = dict(tp=2, max_batch_size=3, max_seq_len=48, workers=tp_runner.workers(2), progress=False)
    ids, mask = left_padded_batch()
    with from_pretrained_parallel(target_path, **load) as target, from_pretrained_parallel(draft_path, **load) as draft:
        draw = lambda seed, **kw: (
            target.generate(  # noqa: E731
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=20,
                do_sample=True,
                seed=seed,
                draft_model=draft,
                num_speculative_tokens=3,
                **kw,
            ).tokens
        )
        first = draw(5, eos_token_id=[])
        assert first == draw(5, eos_token_id=[]) and first != draw(6, eos_token_id=[])
        assert all(len(row) == 20 for row in first)
        eos = first[0][6]
        stopped = draw(5, eos_token_id=eos)
        assert stopped[0][-1] == eos and len(stopped[0]) <= 7 and all(eos not in row[:-1] for row in stopped)


def test_draft_must_share_the_worker_group(tp_runner, pair):
    target_path, draft_path = pair
    with (
        from_pretrained_parallel(target_path, tp=1, progress=False, workers=tp_runner.workers(1), max_seq_len=48) as target,
        from_pretrained_parallel(draft_path, tp=1, progress=False, max_seq_len=48) as draft,
    ):
        with pytest.raises(ValueError, match="load it with workers=target.group"):
            target.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=4, draft_model=draft)


def test_rejection_sampler_draws_from_the_target_distribution():
    """Chi-square over a 5-token vocabulary: the first token out of a round is distributed as p."""
    draws, k = 200_000, 2
    p0 = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])
    q0 = torch.tensor([0.30, 0.10, 0.30, 0.10, 0.20])  # a poor draft: many rejections
    generator = torch.Generator().manual_seed(0)
    q = torch.stack([q0, q0])[None].expand(draws, k, 5)
    drafted = torch.multinomial(q0, draws * k, replacement=True, generator=generator).view(draws, k)
    first, accepted = first_tokens_of_a_round(drafted, q, p0, generator)
    statistic = chi_square(first, p0)
    assert statistic < 18.47, (torch.bincount(first, minlength=5) / draws, statistic)  # df=4, p=0.001
    assert 0 < float(accepted.float().mean()) < k  # both paths (accept and resample) were exercised
    # a sampler that ignored rejections (always the draft's token) would fail the same test
    assert chi_square(drafted[:, 0], p0) > 1000


def test_nxd_generate_with_a_draft_reports_acceptance(pair, capsys):
    from nxd_models.cli import main

    target_path, draft_path = pair
    args = ["generate", str(target_path), "--tp", "2", "--prompt", "def main(", "--max-new-tokens", "12", "--max-seq-len", "48"]
    assert main([*args, "--draft", str(draft_path), "--num-speculative-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def main(") and "acceptance rate" in out.err and "accepted per round [" in out.err


def test_generate_on_neuron_alias(tp_runner, pair):
    from nxd_models.generation.runner import generate_on_neuron

    target_path, draft_path = pair
    load = dict(tp=2, max_seq_len=48, workers=tp_runner.workers(2), progress=False)
    with from_pretrained_parallel(target_path, **load) as target, from_pretrained_parallel(draft_path, **load) as draft:
        ids = torch.arange(5, 12)
        plain = target.generate(input_ids=ids, max_new_tokens=10, eos_token_id=[])
        assert generate_on_neuron(None, target, draft_model=draft, input_ids=ids, max_new_tokens=10, eos_token_id=[]).tokens == plain.tokens
