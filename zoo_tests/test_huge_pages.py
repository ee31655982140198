"""Large CPU weights live in huge-page-advised memory: same values, same identities, HF's answers."""

from pathlib import Path

import pytest
import torch
from torch import nn

from nxd_core import huge_pages
from nxd_core.huge_pages import HUGE_PAGE, huge_page_copy, move_to_huge_pages
from nxd_core.worker_process import worker_state
from nxd_models import from_pretrained_parallel
from zoo_tests.llama_fixtures import save_tiny_llama

needs_thp = pytest.mark.skipif(not huge_pages.available(), reason="this OS gives no transparent huge pages")


def advised_huge(tensor: torch.Tensor) -> bool:
    """Whether the mapping holding tensor's first byte is private (a shared anonymous one is shmem,
    where THP is usually off) and carries MADV_HUGEPAGE (smaps' VmFlags "hg")."""
    address, inside, private = tensor.data_ptr(), False, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head, *rest = line.split()
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms offset ..."
            low, high = (int(part, 16) for part in head.split("-"))
            inside, private = low <= address < high, rest[0].endswith("p")
        elif inside and head == "VmFlags:":
            return private and "hg" in rest
    return False


@needs_thp
def test_a_huge_page_copy_is_equal_aligned_and_advised():
    tensor = torch.randn(3, HUGE_PAGE // 4 + 5).to(torch.bfloat16)  # not a whole number of huge pages
    copy = huge_page_copy(tensor)
    assert torch.equal(copy, tensor) and copy.dtype == tensor.dtype and copy.is_contiguous()
    assert copy.data_ptr() != tensor.data_ptr() and copy.data_ptr() % HUGE_PAGE == 0
    assert advised_huge(copy) and not advised_huge(tensor)
    del tensor
    assert copy.float().sum().isfinite()  # the mapping lives as long as the copy


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1024, 1024)  # 4 MB
        self.head = nn.Linear(1024, 1024, bias=False)
        self.head.weight = self.embed.weight  # one object under two names
        self.small = nn.Linear(16, 16)
        self.register_buffer("table", torch.randn(1024, 1024))
        self.register_buffer("view", self.table[:600])  # shares the table's storage: stays put


@needs_thp
def test_move_keeps_identities_values_and_sharing(monkeypatch):
    model = Tied()
    weight, table, before = model.embed.weight, model.table, {k: v.clone() for k, v in model.state_dict().items()}
    small = model.small.weight.data_ptr()
    moved = move_to_huge_pages(model)
    assert moved == 2 * 1024 * 1024 * 4  # the tied weight once, the table once; the view and the small layer not
    assert model.embed.weight is weight and model.head.weight is weight and model.table is table
    assert weight.data_ptr() % HUGE_PAGE == 0 and advised_huge(weight) and advised_huge(model.table)
    assert model.small.weight.data_ptr() == small and not advised_huge(model.view)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    monkeypatch.setenv(huge_pages.ENV, "0")
    assert move_to_huge_pages(Tied()) == 0


def _mlp_weights_advised(key) -> list[bool]:
    model = worker_state()[key]
    return [advised_huge(p) for name, p in model.named_parameters() if "mlp" in name]


@needs_thp
def test_loaded_weights_are_in_huge_pages_and_give_hf_logits(tp_runner, tmp_path):
    # gate/up/down of 1024 x 1024 fp32: 2 MB per rank at tp=2
    reference = save_tiny_llama(tmp_path, "gqa", hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    with from_pretrained_parallel(tmp_path, tp=2, workers=tp_runner.workers(2), progress=False) as model:
        advised = model.group.run(_mlp_weights_advised, model._key)
        logits = model(ids)
    assert advised == [[True] * 3] * 2
    assert (logits - expected).abs().max().item() < 1e-4
