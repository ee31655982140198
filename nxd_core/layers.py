"""ColumnParallelLinear, RowParallelLinear and ParallelEmbedding.

Weights use torch's layout ([out, in] for linears), so a parallel layer has
the same parameter names and, at tp=1, the same shapes as the torch.nn layer
it replaces. Each sharded parameter carries its `ShardSpec`.

Initialisation draws the full-size weight and keeps this rank's slice: a model
built at tp=N under a seed holds exactly the slices of the tp=1 model built
under that seed. On the meta device nothing is drawn (weights come from a
checkpoint later).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from . import parallel_state as ps
from .cpu_kernels import linear, linear_many
from .mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .sharding import (
    ShardSpec,
    copy_sharding_attributes,
    get_sharding,
    set_sharding,
    shard_tensor,
    tag_sharded_state,
    valid_mask,
)


def _spec(layer: str, what: str, **fields) -> ShardSpec:
    """The layer's ShardSpec; a size that tp does not divide (without pad) is an error naming the layer."""
    try:
        return ShardSpec(**fields)
    except ValueError as exc:
        raise ValueError(f"{layer}: {what} {exc}") from None


def _sharded_parameter(full_shape, spec: ShardSpec | None, fill: Callable[[torch.Tensor], object], dtype, device):
    """A parameter holding this rank's piece of a full tensor drawn by `fill` (replicated when spec is None)."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    rank = ps.get_tensor_model_parallel_rank()
    shape = list(full_shape)
    if spec is not None:
        shape[spec.dim] = spec.shard_size
    if device.type == "meta":
        data = torch.empty(shape, dtype=dtype, device=device)
    else:
        full = torch.empty(full_shape, dtype=dtype, device=device)
        with torch.no_grad():
            fill(full)
        data = full if spec is None else shard_tensor(full, spec, rank)
    param = nn.Parameter(data)
    if spec is not None:
        set_sharding(param, spec)
        if spec.is_padded and device.type != "meta":
            # Padding stays zero through training: its gradient is masked out.
            mask = valid_mask(spec, rank, shape, device=device).to(dtype)
            param.register_hook(lambda grad: grad * mask)
    return param


def _linear_default_init(fan_in: int):
    """torch.nn.Linear's initialisation, so tp=1 layers equal nn.Linear under the same seed."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0

    def weight(w):
        init.kaiming_uniform_(w, a=math.sqrt(5))

    def bias(b):
        init.uniform_(b, -bound, bound)

    return weight, bias


def _linear_inits(init_method, fan_in):
    if init_method is None:
        return _linear_default_init(fan_in)
    # A user init applies to the weight; the bias starts at zero (Megatron's convention).
    return init_method, init.zeros_


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A's output dim (weight rows) split across TP ranks.

    gather_output=True all-gathers Y to full size; False leaves each rank its
    slice, ready for a RowParallelLinear(input_is_parallel=True).
    `max_parts`/`unit` bound the split (e.g. KV heads: replicate instead of
    cutting a head).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
        init_method: Callable | None = None,
        pad: bool = False,
        max_parts: int | None = None,
        unit: int = 1,
    ):
        super().__init__()
        self.register_state_dict_post_hook(tag_sharded_state)
        self.input_size, self.output_size = input_size, output_size
        self.gather_output = gather_output
        tp = ps.get_tensor_model_parallel_size()
        self.spec = _spec(
            "ColumnParallelLinear", "output_size", dim=0, full_size=output_size, tp=tp, max_parts=max_parts, unit=unit, pad=pad
        )
        if gather_output and self.spec.parts != tp:
            raise ValueError("ColumnParallelLinear: gather_output=True needs tp <= max_parts (pieces would repeat)")
        weight_init, bias_init = _linear_inits(init_method, input_size)
        self.weight = _sharded_parameter((output_size, input_size), self.spec, weight_init, dtype, device)
        self.bias = _sharded_parameter((output_size,), self.spec, bias_init, dtype, device) if bias else None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This rank's x W^T + b (a quantized layer overrides it: nxd_core.quantization)."""
        return linear(x, self.weight, bias)

    @staticmethod
    def matmuls(layers: list[ColumnParallelLinear], x: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's x W^T (no bias), for layers of this class that meet the same x, in one kernel
        call where it can (a quantized layer overrides it)."""
        return linear_many(x, [layer.weight for layer in layers])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.tp == 1:  # built unsharded (tp=1, or parallel_state.replicated()): nothing to exchange
            return self.matmul(x, self.bias)
        x = copy_to_tensor_model_parallel_region(x)
        y = self.matmul(x, self.bias)
        if self.gather_output:
            y = gather_from_tensor_model_parallel_region(y)
            if self.spec.is_padded:
                y = y[..., : self.output_size]
        return y

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_size={self.output_size}, tp={self.spec.tp}, "
            f"local_out={self.spec.shard_size}, gather_output={self.gather_output}"
        )


def column_parallel_many(layers: list[ColumnParallelLinear], x: torch.Tensor) -> list[torch.Tensor]:
    """[layer(x) for layer in layers] for column-parallel layers that meet the same x and keep their
    outputs split (q, k and v; gate and up). Where the layers are of one class, their products are
    one kernel call (cpu_kernels.linear_many): decoding pays a call's fixed costs (the threads' start
    and finish, x's preparation) once, not once per layer. At tp > 1 x enters the parallel region
    once: the forward is the identity, and the gradients of all the layers are summed before their
    one all-reduce, which is the sum of their all-reduces."""
    first = layers[0]
    if len(layers) < 2 or any(type(layer) is not type(first) or layer.gather_output for layer in layers):
        return [layer(x) for layer in layers]
    if first.spec.tp > 1:
        x = copy_to_tensor_model_parallel_region(x)
    outputs = type(first).matmuls(layers, x)
    return [y + layer.bias if layer.bias is not None else y for y, layer in zip(outputs, layers)]


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A's input dim (weight columns) split across TP ranks.

    Each rank multiplies its slice of X and the partial results are summed
    (all-reduce); the bias is replicated and added once, after the sum.
    input_is_parallel=False scatters a full X first. reduce_output=False (NxD's flag) returns this
    rank's partial sum unreduced, for a caller that sums several layers' outputs with one all-reduce
    (the experts of a mixture-of-experts layer); it takes no bias.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
        init_method: Callable | None = None,
        pad: bool = False,
        max_parts: int | None = None,
        unit: int = 1,
        reduce_output: bool = True,
    ):
        super().__init__()
        if bias and not reduce_output:
            raise ValueError("RowParallelLinear: reduce_output=False takes no bias (it would be added once per rank)")
        self.register_state_dict_post_hook(tag_sharded_state)
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel = input_is_parallel
        self.reduce_output = reduce_output
        tp = ps.get_tensor_model_parallel_size()
        self.spec = _spec("RowParallelLinear", "input_size", dim=1, full_size=input_size, tp=tp, max_parts=max_parts, unit=unit, pad=pad)
        weight_init, bias_init = _linear_inits(init_method, input_size)
        self.weight = _sharded_parameter((output_size, input_size), self.spec, weight_init, dtype, device)
        self.bias = _sharded_parameter((output_size,), None, bias_init, dtype, device) if bias else None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This rank's partial x W^T (+ b at tp=1); a quantized layer overrides it (nxd_core.quantization)."""
        return linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.tp == 1:  # built unsharded: nothing to exchange
            return self.matmul(x, self.bias)
        if not self.input_is_parallel:
            if self.spec.is_padded:
                x = F.pad(x, (0, self.spec.padded_size - self.input_size))
            x = scatter_to_tensor_model_parallel_region(x)
        if not self.reduce_output:
            return self.matmul(x, None)
        y = reduce_from_tensor_model_parallel_region(self.matmul(x, None))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_size={self.output_size}, tp={self.spec.tp}, "
            f"local_in={self.spec.shard_size}, input_is_parallel={self.input_is_parallel}"
        )


class ParallelEmbedding(nn.Module):
    """An embedding table split over the vocabulary (default) or the embedding dim.

    Vocabulary sharding: each rank looks up the ids in its range, zeros the
    rest, and the partial lookups are summed. The range is a buffer, not a
    Python value, so one traced graph serves every rank.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        init_method: Callable = init.normal_,
        dtype: torch.dtype = torch.float32,
        device=None,
        shard_across_embedding: bool = False,
        pad: bool = False,
    ):
        super().__init__()
        self.register_state_dict_post_hook(tag_sharded_state)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.shard_across_embedding = shard_across_embedding
        tp = ps.get_tensor_model_parallel_size()
        dim, size, what = (1, embedding_dim, "embedding_dim") if shard_across_embedding else (0, num_embeddings, "num_embeddings")
        self.spec = _spec("ParallelEmbedding", what, dim=dim, full_size=size, tp=tp, pad=pad)

        def fill(w):
            init_method(w)
            if padding_idx is not None:
                w[padding_idx].zero_()  # as torch.nn.Embedding does

        self.weight = _sharded_parameter((num_embeddings, embedding_dim), self.spec, fill, dtype, device)
        start, _ = self.spec.bounds(ps.get_tensor_model_parallel_rank())
        # The range is real even when the weights are built on the meta device: it is not in checkpoints.
        buffer_device = torch.device(device) if device is not None else torch.get_default_device()
        if buffer_device.type == "meta":
            buffer_device = torch.device("cpu")
        bounds = [start, start + self.spec.shard_size] if dim == 0 else [0, num_embeddings]
        self.register_buffer("vocab_range", torch.tensor(bounds, device=buffer_device), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.spec.tp == 1:
            return F.embedding(ids, self.weight)
        if self.shard_across_embedding:
            out = gather_from_tensor_model_parallel_region(F.embedding(ids, self.weight))
            return out[..., : self.embedding_dim] if self.spec.is_padded else out
        outside = (ids < self.vocab_range[0]) | (ids >= self.vocab_range[1])
        local_ids = (ids - self.vocab_range[0]).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out)

    def extra_repr(self) -> str:
        sharded = "embedding_dim" if self.shard_across_embedding else "vocab"
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.spec.tp}, sharded over {sharded}"


def resolve_device(device) -> torch.device:
    """A torch.device; "xla" means this process's XLA device (TPU, AWS Neuron), imported only then."""
    if isinstance(device, str) and device == "xla":
        try:
            import torch_xla.core.xla_model as xm
        except ImportError as exc:
            raise ImportError('device="xla" needs torch-xla (or torch-neuronx on AWS Neuron): pip install "nxd-zoo[xla]"') from exc
        return xm.xla_device()
    return torch.device(device)


def move_model_to_device(model: nn.Module, device) -> nn.Module:
    """model.to(device), keeping every parameter's tensor parallel attributes.

    Some backends (XLA) replace parameter objects on .to(); the attributes are
    copied across by name so the sharding metadata survives. device may be
    "xla" (torch-xla is imported only then).
    """
    device = resolve_device(device)
    before = {name: p for name, p in model.named_parameters() if get_sharding(p) is not None}
    model.to(device)
    for name, param in model.named_parameters():
        if name in before and param is not before[name]:
            copy_sharding_attributes(before[name], param)
    return model
