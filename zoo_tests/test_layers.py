"""Parallel layers equal their torch.nn counterparts, forward and backward, at tp 1, 2 and 4."""

import pytest
import torch
from torch import nn

from nxd_core import parallel_state as ps
from nxd_core.checkpoint import load_state_dict_from_full
from nxd_core.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, column_parallel_many
from nxd_core.sharding import ShardSpec, get_sharding, shard_tensor

TOL = 1e-5


def _local(full: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's slice of a full activation along `dim` (zero-padded like the layers)."""
    spec = ShardSpec(dim=dim % full.dim(), full_size=full.shape[dim], tp=ps.get_tensor_model_parallel_size())
    return shard_tensor(full, spec, ps.get_tensor_model_parallel_rank())


def _param_grad_errors(parallel: nn.Module, reference: nn.Module) -> dict:
    """Max error of each parameter's gradient against the slice of the reference gradient."""
    rank = ps.get_tensor_model_parallel_rank()
    ref_params = dict(reference.named_parameters())
    errors = {}
    for name, p in parallel.named_parameters():
        ref_grad = ref_params[name].grad
        spec = get_sharding(p)
        expected = shard_tensor(ref_grad, spec, rank) if spec else ref_grad
        errors[f"grad {name}"] = (p.grad - expected).abs().max().item()
    return errors


def _compare(parallel: nn.Module, reference: nn.Module, x: torch.Tensor, output_is_local: bool = False) -> dict:
    """Load the reference's weights into the parallel module, run both forward and backward, return max errors.

    output_is_local: the parallel module returns this rank's slice of the last dim (gather_output=False).
    """
    load_state_dict_from_full(parallel, reference.state_dict())
    floating = x.is_floating_point()
    x_par, x_ref = x.clone().requires_grad_(floating), x.clone().requires_grad_(floating)
    y, y_ref = parallel(x_par), reference(x_ref)
    grad_out = torch.randn_like(y_ref)
    y_ref.backward(grad_out)
    if output_is_local:
        y_ref, grad_out = _local(y_ref, -1), _local(grad_out, -1)
    y.backward(grad_out)
    errors = {"output": (y - y_ref).abs().max().item(), **_param_grad_errors(parallel, reference)}
    if floating:
        errors["grad input"] = (x_par.grad - x_ref.grad).abs().max().item()
    return errors


def column_case(in_f, out_f, gather_output, pad):
    torch.manual_seed(0)
    reference = nn.Linear(in_f, out_f)
    layer = ColumnParallelLinear(in_f, out_f, gather_output=gather_output, pad=pad)
    return _compare(layer, reference, torch.randn(2, 3, in_f), output_is_local=not gather_output)


def column_row_mlp_case(hidden, ffn, pad):
    """Column(gather_output=False) -> GELU -> Row(input_is_parallel=True), against nn.Linear -> GELU -> nn.Linear."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
    parallel = nn.Sequential(
        ColumnParallelLinear(hidden, ffn, gather_output=False, pad=pad),
        nn.GELU(),
        RowParallelLinear(ffn, hidden, input_is_parallel=True, pad=pad),
    )
    return _compare(parallel, reference, torch.randn(2, 5, hidden))


def row_case(in_f, out_f, pad):
    """RowParallelLinear(input_is_parallel=False) scatters a full input itself."""
    torch.manual_seed(0)
    reference = nn.Linear(in_f, out_f)
    layer = RowParallelLinear(in_f, out_f, input_is_parallel=False, pad=pad)
    return _compare(layer, reference, torch.randn(2, 3, in_f))


def embedding_case(vocab, dim, shard_across_embedding, pad):
    torch.manual_seed(0)
    reference = nn.Embedding(vocab, dim)
    layer = ParallelEmbedding(vocab, dim, shard_across_embedding=shard_across_embedding, pad=pad)
    ids = torch.randint(0, vocab, (3, 7))
    ids[0, :vocab] = torch.arange(min(vocab, 7))  # every rank's range is hit
    return _compare(layer, reference, ids)


def column_many_case():
    """column_parallel_many (one kernel call for q, k and v on a CPU) equals each layer's own forward,
    outputs and gradients: layers of several widths, one replicated past 2 ranks, one padded, biases or not."""
    torch.manual_seed(0)

    def layers():
        return [
            ColumnParallelLinear(16, 12, gather_output=False),
            ColumnParallelLinear(16, 8, gather_output=False, max_parts=2, unit=4),
            ColumnParallelLinear(16, 10, gather_output=False, pad=True, bias=False),
        ]

    together, alone = layers(), layers()
    for a, b in zip(together, alone):
        b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16)
    x_together, x_alone = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys_together, ys_alone = column_parallel_many(together, x_together), [layer(x_alone) for layer in alone]
    grads = [torch.randn_like(y) for y in ys_alone]
    sum((y * g).sum() for y, g in zip(ys_together, grads)).backward()
    sum((y * g).sum() for y, g in zip(ys_alone, grads)).backward()
    errors = {f"output {i}": (a - b).abs().max().item() for i, (a, b) in enumerate(zip(ys_together, ys_alone))}
    errors |= {f"shape {i}": float(a.shape != b.shape) for i, (a, b) in enumerate(zip(ys_together, ys_alone))}
    for i, (a, b) in enumerate(zip(together, alone)):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            errors[f"grad {i}.{name}"] = (pa.grad - pb.grad).abs().max().item()
    errors["grad input"] = (x_together.grad - x_alone.grad).abs().max().item()
    return errors


CASES = {
    "column gather": (column_case, (16, 12, True, False)),
    "column local": (column_case, (16, 12, False, False)),
    "column many": (column_many_case, ()),
    "column gather padded": (column_case, (16, 7, True, True)),
    "column->row mlp": (column_row_mlp_case, (16, 24, False)),
    "column->row mlp padded": (column_row_mlp_case, (16, 10, True)),
    "row scatter": (row_case, (12, 8, False)),
    "row scatter padded": (row_case, (10, 8, True)),
    "embedding vocab": (embedding_case, (20, 8, False, False)),
    "embedding vocab padded": (embedding_case, (10, 8, False, True)),
    "embedding dim": (embedding_case, (20, 8, True, False)),
    "embedding dim padded": (embedding_case, (20, 6, True, True)),
}


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_torch_nn(tp_runner, tp, case):
    fn, args = CASES[case]
    for rank, errors in enumerate(tp_runner.run(tp, fn, *args)):
        worst = max(errors, key=errors.get)
        assert errors[worst] < TOL, f"tp={tp} rank {rank}: {worst} differs by {errors[worst]:.2e} ({errors})"


def init_slices_case(seed):
    """Layers built at tp=N under a seed hold the slices of the torch.nn layer drawn under that seed."""
    rank = ps.get_tensor_model_parallel_rank()
    built = []
    for make_parallel, make_reference in [
        (lambda: ColumnParallelLinear(8, 12), lambda: nn.Linear(8, 12)),
        (lambda: RowParallelLinear(12, 8), lambda: nn.Linear(12, 8)),
        (lambda: ParallelEmbedding(16, 4), lambda: nn.Embedding(16, 4)),
        (lambda: ParallelEmbedding(16, 4, shard_across_embedding=True), lambda: nn.Embedding(16, 4)),
    ]:
        torch.manual_seed(seed)
        parallel = make_parallel()
        torch.manual_seed(seed)
        reference = make_reference()
        for name, p in parallel.named_parameters():
            full = dict(reference.named_parameters())[name].detach()
            spec = get_sharding(p)
            expected = shard_tensor(full, spec, rank) if spec else full
            built.append(torch.equal(p.detach(), expected))
    return built


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_initialisation_is_sliced_from_the_full_weight(tp_runner, tp):
    for built in tp_runner.run(tp, init_slices_case, 1234):
        assert all(built), built


def padded_layer_error(kind):
    if kind == "column":
        ColumnParallelLinear(16, 10)
    elif kind == "row":
        RowParallelLinear(10, 16)
    else:
        ParallelEmbedding(30, 8)


@pytest.mark.parametrize(
    "kind, size, valid", [("column", 10, "[1, 2, 5, 10]"), ("row", 10, "[1, 2, 5, 10]"), ("embedding", 30, "[1, 2, 3, 5, 6, 10, 15, 30]")]
)
def test_size_that_tp_does_not_divide_is_a_clear_error(tp_runner, kind, size, valid):
    with pytest.raises(ValueError) as info:
        tp_runner.run(4, padded_layer_error, kind)
    message = str(info.value)
    assert f"{size} is not divisible by tensor parallel size 4" in message
    assert valid in message and "pad=True" in message


def test_padding_stays_zero_through_training(tp_runner):
    for padding in tp_runner.run(4, padded_training_case):
        assert padding == 0.0


def padded_training_case():
    """A padded Column -> sigmoid -> Row stack: padding would leak into outputs if it ever trained."""
    torch.manual_seed(0)
    model = nn.Sequential(
        ColumnParallelLinear(8, 10, gather_output=False, pad=True),
        nn.Sigmoid(),
        RowParallelLinear(10, 8, input_is_parallel=True, pad=True),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        model(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    rank = ps.get_tensor_model_parallel_rank()
    total = 0.0
    for p in model.parameters():
        spec = get_sharding(p)
        if spec is not None and spec.is_padded:
            start, stop = spec.bounds(rank)
            total += p.detach().narrow(spec.dim, stop - start, spec.shard_size - (stop - start)).abs().sum().item()
    return total
