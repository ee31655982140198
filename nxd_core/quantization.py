"""Weight-only int8 quantization of the parallel linears: one symmetric scale per output channel.

    scale[n] = max_k |W[n, k]| / 127        (float32; a row of zeros gets 1.0)
    q[n, k]  = round(W[n, k] / scale[n])    clamped to [-127, 127], int8
    y        = (x q^T) * scale + b          activations stay in the model's dtype

A scale covers the whole output row, every rank's slice of it, so the int8 tensor and its scales do
not depend on tp: each rank's piece is the same slice of one quantized tensor, and loading,
conversion, resharding and consolidation slice them like any other tensor (the one sharding path).
A column-parallel layer's scales are sharded with its weight's rows; a row-parallel layer's are
replicated, and each rank applies them to its partial sum before the all-reduce (as NxD does).

A quantized layer holds `weight` (int8) and `weight_scale` (float32), the checkpoint names too.
The embedding and lm_head stay in the model's dtype (logits keep their precision).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from . import int8_kernels
from . import parallel_state as ps
from .layers import ColumnParallelLinear, RowParallelLinear
from .sharding import get_sharding, set_sharding

METHODS = ("int8",)
SCALE = "weight_scale"  # a quantized layer's scales, next to its int8 `weight`
DEFAULT_SKIP = ("lm_head",)


def check_method(quantize: str | None) -> None:
    if quantize is not None and quantize not in METHODS:
        raise ValueError(f"quantize={quantize!r} is not supported: choose one of {list(METHODS)} (or None for the model's dtype)")


# -- the arithmetic (every path goes through these, so all agree to the bit) ----------------


def scales_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))


def quantize_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 rows of weight [n, k] (any slice of the columns) with their full rows' scales [n]."""
    return torch.round(weight.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scales) of a full weight [out, in]."""
    scale = scales_from_absmax(weight.abs().amax(dim=1))
    return quantize_rows(weight, scale), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


# -- the layers ----------------------------------------------------------------------------


class _Int8Matmul:
    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_kernels.int8_linear(x, self.weight, self.weight_scale, bias)


class QuantizedColumnParallelLinear(_Int8Matmul, ColumnParallelLinear):
    """ColumnParallelLinear with int8 weights; its scales are sharded with the weight's rows."""


class QuantizedRowParallelLinear(_Int8Matmul, RowParallelLinear):
    """RowParallelLinear with int8 weights; its scales (whole rows) are replicated and scale the partial
    sums before the all-reduce."""


_QUANTIZED = {ColumnParallelLinear: QuantizedColumnParallelLinear, RowParallelLinear: QuantizedRowParallelLinear}


def quantizable(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Names of the parallel linears quantize_model would quantize (q/k/v/o, the MLPs, the experts)."""
    skip = tuple(skip)
    return [name for name, m in model.named_modules() if type(m) in _QUANTIZED and name.rpartition(".")[2] not in skip]


def quantize_model(model: nn.Module, quantize: str, layers: Iterable[str] | None = None) -> list[str]:
    """Quantize the model's parallel linears in place (`layers`: their names; default `quantizable`);
    returns the names. On the meta device only the shapes change (a checkpoint fills them); real
    weights are quantized here, the row-parallel scales agreed over the tp group."""
    check_method(quantize)
    names = list(layers) if layers is not None else quantizable(model)
    for name in names:
        layer = model.get_submodule(name)
        if type(layer) not in _QUANTIZED:
            raise TypeError(f"{name} is a {type(layer).__name__}, not a Column/RowParallelLinear: it cannot be quantized")
        if any(layer.weight is p for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(name + ".")):
            raise ValueError(f"{name}.weight is tied to another parameter: a tied weight cannot be quantized")
        _quantize_layer(layer)
    if names and next(model.parameters()).device.type == "cpu":
        int8_kernels.prepare()
    return names


def _quantize_layer(layer) -> None:
    weight, spec = layer.weight, get_sharding(layer.weight)
    column = isinstance(layer, ColumnParallelLinear)
    if weight.is_meta:
        q = torch.empty(weight.shape, dtype=torch.int8, device="meta")
        scale = torch.empty(weight.shape[0], dtype=torch.float32, device="meta")
    else:
        absmax = weight.detach().abs().amax(dim=1).float()
        if not column and layer.spec.tp > 1:  # a row's scale covers every rank's slice of it
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
        scale = scales_from_absmax(absmax)
        q = quantize_rows(weight.detach(), scale)
    # The class changes in place: the layer keeps its spec, sizes and flags, only its matmul differs.
    layer.__class__ = _QUANTIZED[type(layer)]
    layer.weight = nn.Parameter(q, requires_grad=False)
    set_sharding(layer.weight, spec)
    layer.weight_scale = nn.Parameter(scale, requires_grad=False)
    if column:
        set_sharding(layer.weight_scale, spec)  # dim 0, the weight's rows


# -- what a checkpoint holds ---------------------------------------------------------------------


def saved_quantized_layers(names: Iterable[str]) -> list[str]:
    """The layers a checkpoint holds quantized: those with a `weight_scale` next to their weight."""
    suffix = "." + SCALE
    return [n[: -len(suffix)] for n in names if n.endswith(suffix)]


def quantized_sources(sources: Mapping, layers: Iterable[str]) -> dict:
    """The checkpoint's tensors with each named layer's float weight seen as its int8 weight and
    scales, computed from what is read: a rank reads its slice (and, for a row-parallel slice, the
    rows' maxima), never the whole checkpoint."""
    out = dict(sources)
    for layer in layers:
        full = _QuantizedWeight(sources[layer + ".weight"])
        out[layer + ".weight"] = full
        out[layer + "." + SCALE] = full.scales
    return out


class _QuantizedWeight:
    """A full float weight (tensor or lazy slice) seen as int8, sliced as shard_tensor slices it."""

    dtype = torch.int8

    def __init__(self, full):
        self.full, self.shape = full, tuple(full.shape)
        self._scales: dict[tuple[int, int], torch.Tensor] = {}  # by row range: what reading those rows found
        self.scales = _Scales(self)

    def row_scales(self, start: int, stop: int) -> torch.Tensor:
        for (lo, hi), scale in self._scales.items():
            if lo <= start and stop <= hi:
                return scale[start - lo : stop - lo]
        # Rows in blocks of ~64 MB: the maxima of a row-parallel layer, without the whole tensor in memory.
        block = max(1, (64 << 20) // max(1, self.shape[1] * 4))
        try:
            pieces = [self.full[r : min(r + block, stop)].abs().amax(dim=1) for r in range(start, stop, block)]
        except IndexError:  # a view that slices along another dim only (a row-parallel ShardedView): whole
            pieces = [_whole(self.full)[start:stop].abs().amax(dim=1)]
        scale = scales_from_absmax(torch.cat(pieces) if pieces else torch.empty(0))
        self._scales[(start, stop)] = scale
        return scale

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        try:
            return self.full[start:stop]
        except IndexError:  # a view that slices along another dim only: read it whole
            return _whole(self.full)[start:stop]

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(self.shape[0])
        if all(i == slice(None) for i in index[1:]):  # whole rows (a column-parallel slice): their own scales
            weight = self._rows(start, stop)
            scale = scales_from_absmax(weight.abs().amax(dim=1))
            self._scales[(start, stop)] = scale
            return quantize_rows(weight, scale)
        return quantize_rows(self.full[index], self.row_scales(start, stop))  # part of every row

    def read(self) -> torch.Tensor:
        return self[:]


class _Scales:
    """The scales of a _QuantizedWeight, [out] float32, from the rows its weight's slices read."""

    dtype = torch.float32

    def __init__(self, weight: _QuantizedWeight):
        self._weight, self.shape = weight, (weight.shape[0],)

    def __getitem__(self, index) -> torch.Tensor:
        rows = index[0] if isinstance(index, tuple) else index
        start, stop, _ = rows.indices(self.shape[0])
        return self._weight.row_scales(start, stop).clone()

    def read(self) -> torch.Tensor:
        return self[:]


def _whole(full) -> torch.Tensor:
    if isinstance(full, torch.Tensor):
        return full
    return full.read() if hasattr(full, "read") else full[:]
