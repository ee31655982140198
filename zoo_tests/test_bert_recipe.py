"""The NxD guide's BERT recipe: parallel self-attention in an HF BERT, loaded from the unsharded state dict."""

import pytest
import torch
from bert_fixtures import tiny_batch, tiny_bert_config
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from transformers import BertForSequenceClassification

from nxd_core import parallel_state as ps
from nxd_core.checkpoint import load, load_state_dict_from_full
from nxd_core.grads import average_data_parallel_gradients, clip_grad_norm
from nxd_models.bert import parallelize_self_attention


def recipe_logits(config, checkpoint, batch):
    torch.manual_seed(99)  # different weights than the checkpoint: the load must replace them
    model = parallelize_self_attention(BertForSequenceClassification(config))
    load(checkpoint, model, sharded=False)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("tp", [2, 4])
def test_bert_recipe_matches_unmodified_model(tp_runner, tmp_path, tp):
    config = tiny_bert_config()
    torch.manual_seed(0)
    reference = BertForSequenceClassification(config).eval()
    checkpoint = tmp_path / "bert.pt"
    torch.save({"model": reference.state_dict()}, checkpoint)
    batch = tiny_batch()
    with torch.no_grad():
        expected = reference(**batch).logits
    for logits in tp_runner.run(tp, recipe_logits, config, str(checkpoint), batch):
        assert (logits - expected).abs().max().item() < 1e-5
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))


# -- training equivalence -------------------------------------------------------------


def train(config, init_state, dataset, parallel: bool, steps=20, batch_size=4, max_norm=0.5):
    """Train with AdamW and gradient clipping; data split over data-parallel ranks. Returns (losses, norms)."""
    model = BertForSequenceClassification(config)
    if parallel:
        parallelize_self_attention(model)
    load_state_dict_from_full(model, init_state)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = DistributedSampler(dataset, num_replicas=ps.get_data_parallel_size(), rank=ps.get_data_parallel_rank(), shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)
    losses, norms, epoch = [], [], 0
    while len(losses) < steps:
        sampler.set_epoch(epoch)
        epoch += 1
        for ids, mask, labels in loader:
            if len(losses) == steps:
                break
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            average_data_parallel_gradients(model.parameters())
            if parallel:
                norm = clip_grad_norm(model.parameters(), max_norm)
            else:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad()
            loss = loss.detach().clone()
            if ps.get_data_parallel_size() > 1:
                torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
                loss /= ps.get_data_parallel_size()
            losses.append(loss.item())
            norms.append(norm.item())
    return losses, norms


def _training_setup():
    config = tiny_bert_config()
    torch.manual_seed(0)
    init_state = BertForSequenceClassification(config).state_dict()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, config.vocab_size, (48, 10), generator=generator)
    mask = torch.ones_like(ids)
    labels = (ids[:, 0] > config.vocab_size // 2).long()  # learnable: label from the first token
    return config, init_state, TensorDataset(ids, mask, labels)


def _assert_same_curve(losses, expected, norms, expected_norms):
    losses, expected = torch.tensor(losses), torch.tensor(expected)
    assert len(losses) == 20
    assert ((losses - expected).abs() / expected.abs()).max().item() < 1e-4, (losses, expected)
    assert torch.allclose(torch.tensor(norms), torch.tensor(expected_norms), rtol=1e-4)
    assert max(expected_norms) > 0.5, "clipping must be exercised"
    assert expected[-5:].mean() < expected[:5].mean(), "the model must actually learn"


def test_training_tp2_matches_unsharded(tp_runner):
    config, init_state, dataset = _training_setup()
    expected, expected_norms = train(config, init_state, dataset, parallel=False)
    for losses, norms in tp_runner.run(2, train, config, init_state, dataset, parallel=True):
        _assert_same_curve(losses, expected, norms, expected_norms)


def test_training_tp2_dp2_matches_unsharded_data_parallel(tp_runner):
    config, init_state, dataset = _training_setup()
    # the reference: plain data parallel training of the unmodified model over 2 ranks
    expected_runs = tp_runner.run(1, train, config, init_state, dataset, parallel=False, dp=2)
    expected, expected_norms = expected_runs[0]
    assert expected_runs[1][0] == expected  # both DP ranks saw the same averaged curve
    for losses, norms in tp_runner.run(2, train, config, init_state, dataset, parallel=True, dp=2):
        _assert_same_curve(losses, expected, norms, expected_norms)
