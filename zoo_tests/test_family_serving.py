"""The new families behind the serving Engine: continuous batching gives Hugging Face's greedy tokens.

Mistral's window (4 slots) is shorter than every prompt, so each row's window mask works from its
own positions; Qwen3-MoE's rows choose different experts in the same decode step.
"""

import pytest
import torch
from family_fixtures import save_tiny

from nxd_models import from_pretrained_parallel
from nxd_models.serving import Engine


def _prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in (5, 13, 7, 10, 6)]


@pytest.mark.parametrize("kind", ["mistral", "qwen3-moe"])
def test_served_greedy_tokens_equal_hugging_face(tp_runner, tmp_path, kind):
    reference = save_tiny(tmp_path, kind)
    prompts = _prompts(reference.config.vocab_size)
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            hf = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected.append(hf[0, len(prompt) :].tolist())
    assert len({str(t) for t in expected}) == len(prompts), "the answers must tell the prompts apart"
    with from_pretrained_parallel(tmp_path, tp=2, max_batch_size=3, max_seq_len=32, workers=tp_runner.workers(2), progress=False) as model:
        with Engine(model, prefill_chunk=4) as engine:
            engine.eos = []
            requests = [engine.submit(p, max_tokens=10) for p in prompts]  # five requests share three rows
            assert [r.result().token_ids for r in requests] == expected
