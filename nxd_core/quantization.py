"""Weight-only quantization of the parallel linears: int8 per output channel, int4 per group.

    int8      scale[n]    = max_k |W[n, k]| / 127                  float32, one per output row
              q[n, k]     = round(W[n, k] / scale[n])              in [-127, 127], int8
    int4-gG   scale[n, j] = max |W[n, jG:(j+1)G]| / 7              bfloat16, one per group of G inputs
              q[n, k]     = round(W[n, k] / scale[n, k // G])      in [-8, 7], two per byte (+8, low nibble first)
    y = (x q^T) * scale + b, activations in the model's dtype

An int8 scale covers a whole row, every rank's slice of it; an int4 group lies within one rank's
slice (the group size must divide it). Either way the quantized tensors do not depend on tp: each
rank's piece is the same slice of one quantized tensor, and loading, conversion, resharding and
consolidation slice them like any other tensor (the one sharding path). Column-parallel layers shard
their scales with the weight's rows; a row-parallel int8 layer replicates its scales (each rank scales
its partial sum before the all-reduce, as NxD does), an int4 one shards its groups with the inputs.

A quantized layer holds `weight` (int8, or uint8 for packed int4) and `weight_scale`, the checkpoint
names too: that is how a checkpoint says it is quantized, and how. The embedding and lm_head stay in
the model's dtype (logits keep their precision).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from . import int4_kernels, int8_kernels
from . import parallel_state as ps
from .checkpoint_read import _read_whole
from .layers import ColumnParallelLinear, RowParallelLinear
from .sharding import ShardSpec, get_sharding, set_sharding

METHODS = ("int8", "int4-g32", "int4-g64", "int4-g128")
SCALE = "weight_scale"  # a quantized layer's scales, next to its quantized `weight`
DEFAULT_SKIP = ("lm_head",)


def check_method(quantize: str | None) -> None:
    if quantize is not None and quantize not in METHODS:
        raise ValueError(f"quantize={quantize!r} is not supported: choose one of {list(METHODS)} (or None for the model's dtype)")


def check_lm_head_option(
    quantize: str | None, quantize_lm_head: bool, source, tied: bool, saved: str | None, saved_layers: Iterable[str]
) -> None:
    """Whether the lm_head of checkpoint `source` can be quantized, as loading and converting ask: with
    a method (the other linears'), not tied to the embedding (which stays in the model's dtype), and,
    if the checkpoint is saved quantized (`saved`: its method, `saved_layers`), saved with it quantized."""
    if not quantize_lm_head:
        return
    if not quantize:
        raise ValueError(
            f"quantize_lm_head=True quantizes the lm_head with the other linears: pass quantize= as well (one of {', '.join(METHODS)})"
        )
    if tied:
        raise ValueError(f"{source}'s lm_head is tied to its embedding, which stays in the model's dtype: leave out quantize_lm_head")
    if saved is not None and not any(layer.rpartition(".")[2] == "lm_head" for layer in saved_layers):
        raise ValueError(
            f"{source} was saved with its lm_head unquantized: load it without quantize_lm_head, or convert the original "
            f"checkpoint with --quantize {saved} --quantize-lm-head"
        )


def group_size(method: str) -> int | None:
    """An int4 method's group size (None for int8)."""
    return int(method.removeprefix("int4-g")) if method.startswith("int4-g") else None


# -- the arithmetic (every path goes through these, so all agree to the bit) ----------------


def scales_from_absmax(absmax: torch.Tensor, levels: int = 127) -> torch.Tensor:
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / levels, torch.ones_like(absmax))


def quantize_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 rows of weight [n, k] (any slice of the columns) with their full rows' scales [n]."""
    return torch.round(weight.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scales) of a full weight [out, in]."""
    scale = scales_from_absmax(weight.abs().amax(dim=1))
    return quantize_rows(weight, scale), scale


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [n, k / 2], bfloat16 scales [n, k / group]) of weight [n, k] (whole groups)."""
    n, k = weight.shape
    grouped = weight.float().reshape(n, k // group, group)
    scale = scales_from_absmax(grouped.abs().amax(dim=-1), 7).to(torch.bfloat16)
    q = torch.round(grouped / scale.float()[..., None]).clamp_(-8, 7).to(torch.int16).reshape(n, k) + 8
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8), scale


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [n, 2 * packed columns]."""
    low, high = (packed & 15).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight of an int8 (q int8, scale [n]) or int4 (q packed uint8, scale [n, groups]) one."""
    if q.dtype == torch.int8:
        return (q.float() * scale.float()[:, None]).to(dtype)
    values = unpack_int4(q).float()
    group = values.shape[1] // scale.shape[1]
    return (values * scale.float().repeat_interleave(group, dim=1)).to(dtype)


# -- the layers ----------------------------------------------------------------------------


class _QuantizedMatmul:
    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight.dtype == torch.int8:
            return int8_kernels.int8_linear(x, self.weight, self.weight_scale, bias)
        return int4_kernels.int4_linear(x, self.weight, self.weight_scale, bias)

    @staticmethod
    def matmuls(layers: list, x: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's x W^T (no bias), in one kernel call where their weights are of one kind."""
        weights, scales = [layer.weight for layer in layers], [layer.weight_scale for layer in layers]
        kinds = {w.dtype for w in weights}
        if kinds == {torch.int8}:
            return int8_kernels.int8_linear_many(x, weights, scales)
        if kinds == {torch.uint8}:
            return int4_kernels.int4_linear_many(x, weights, scales)
        return [layer.matmul(x, None) for layer in layers]


class QuantizedColumnParallelLinear(_QuantizedMatmul, ColumnParallelLinear):
    """ColumnParallelLinear with int8 or int4 weights; its scales are sharded with the weight's rows."""


class QuantizedRowParallelLinear(_QuantizedMatmul, RowParallelLinear):
    """RowParallelLinear with quantized weights, scaling each rank's partial sum before the all-reduce
    (int8: whole-row scales, replicated; int4: the groups of this rank's inputs)."""


_QUANTIZED = {ColumnParallelLinear: QuantizedColumnParallelLinear, RowParallelLinear: QuantizedRowParallelLinear}


def quantizable(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP, lm_head: bool = False) -> list[str]:
    """Names of the parallel linears quantize_model would quantize (q/k/v/o, the MLPs, the experts;
    the lm_head too with lm_head=True)."""
    skip = tuple(s for s in skip if not (lm_head and s == "lm_head"))
    return [name for name, m in model.named_modules() if type(m) in _QUANTIZED and name.rpartition(".")[2] not in skip]


def check_group_size(model: nn.Module, method: str, tp: int, valid_tp_values: Iterable[int], lm_head: bool = False) -> None:
    """An int4 group must lie within one rank's slice of every layer's inputs: an error naming the tp
    values that work, when tp is not one of them. (`model`: built at tp=1, on the meta device.)"""
    group = group_size(method)
    if group is None:
        return
    layers = [model.get_submodule(name) for name in quantizable(model, lm_head=lm_head)]

    def fits(layer, tp: int) -> bool:
        if isinstance(layer, ColumnParallelLinear):
            return layer.input_size % group == 0
        spec = layer.spec.with_tp(tp)
        return not spec.is_padded and spec.shard_size % group == 0

    bad = next((layer for layer in layers if not fits(layer, tp)), None)
    if bad is not None:
        valid = [t for t in valid_tp_values if all(fits(layer, t) for layer in layers)]
        raise ValueError(
            f"{method}: groups of {group} inputs must lie within each rank's inputs, and at tp={tp} a "
            f"{type(bad).__name__}'s {bad.input_size} inputs do not split so: valid tp values for {method} are "
            f"{valid}" + ("" if group == 32 else "; or choose a smaller group size")
        )


def quantize_model(model: nn.Module, quantize: str, layers: Iterable[str] | None = None, lm_head: bool = False) -> list[str]:
    """Quantize the model's parallel linears in place (`layers`: their names; default `quantizable`,
    with the lm_head where lm_head=True); returns the names. On the meta device only the shapes change (a checkpoint fills them); real
    weights are quantized here (int8: the row-parallel scales agreed over the tp group)."""
    check_method(quantize)
    names = list(layers) if layers is not None else quantizable(model, lm_head=lm_head)
    for name in names:
        layer = model.get_submodule(name)
        if type(layer) not in _QUANTIZED:
            raise TypeError(f"{name} is a {type(layer).__name__}, not a Column/RowParallelLinear: it cannot be quantized")
        if any(layer.weight is p for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(name + ".")):
            raise ValueError(f"{name}.weight is tied to another parameter: a tied weight cannot be quantized")
        _quantize_layer(layer, quantize, name)
    prepare_kernels(model)
    return names


def prepare_kernels(model: nn.Module) -> None:
    """Build and switch on the kernels a model's quantized layers on the CPU use (call it once the
    weights are on their device: a model quantized on the meta device is not there yet)."""
    dtypes = {m.weight.dtype for m in model.modules() if isinstance(m, _QuantizedMatmul) and m.weight.device.type == "cpu"}
    if torch.int8 in dtypes:
        int8_kernels.prepare()
    if torch.uint8 in dtypes:
        int4_kernels.prepare()


def _quantize_layer(layer, method: str, name: str) -> None:
    weight, spec = layer.weight, get_sharding(layer.weight)
    column = isinstance(layer, ColumnParallelLinear)
    group = group_size(method)
    if group is None:
        q, scale = _int8_tensors(layer, weight, column)
        scale_spec = spec if column else None  # dim 0 with the weight's rows; replicated
        weight_spec = spec
    else:
        local_inputs = weight.shape[1]
        if local_inputs % group or (not column and spec.is_padded):
            raise ValueError(f"{name}: {method} needs its {local_inputs} inputs per rank in whole groups of {group} (unpadded)")
        if weight.is_meta:
            q = torch.empty(weight.shape[0], local_inputs // 2, dtype=torch.uint8, device="meta")
            scale = torch.empty(weight.shape[0], local_inputs // group, dtype=torch.bfloat16, device="meta")
        else:
            q, scale = quantize_int4(weight.detach(), group)
        if column:
            weight_spec = scale_spec = spec
        else:  # the inputs split as before, in bytes (two per byte) and in groups
            weight_spec = ShardSpec(dim=1, full_size=layer.input_size // 2, tp=spec.tp, max_parts=spec.max_parts)
            scale_spec = ShardSpec(dim=1, full_size=layer.input_size // group, tp=spec.tp, max_parts=spec.max_parts)
    # The class changes in place: the layer keeps its spec, sizes and flags, only its matmul differs.
    layer.__class__ = _QUANTIZED[type(layer)]
    layer.weight = nn.Parameter(q, requires_grad=False)
    set_sharding(layer.weight, weight_spec)
    layer.weight_scale = nn.Parameter(scale, requires_grad=False)
    if scale_spec is not None:
        set_sharding(layer.weight_scale, scale_spec)


def _int8_tensors(layer, weight: torch.Tensor, column: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if weight.is_meta:
        return torch.empty(weight.shape, dtype=torch.int8, device="meta"), torch.empty(weight.shape[0], dtype=torch.float32, device="meta")
    absmax = weight.detach().abs().amax(dim=1).float()
    if not column and layer.spec.tp > 1:  # a row's scale covers every rank's slice of it
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    scale = scales_from_absmax(absmax)
    return quantize_rows(weight.detach(), scale), scale


# -- what a checkpoint holds ---------------------------------------------------------------------


def saved_quantization(tensors: Mapping) -> tuple[str | None, list[str]]:
    """(method, layers) a checkpoint holds quantized: the layers with a `weight_scale` next to their
    weight, and from their shapes which method. `tensors`: name -> tensor, lazy slice or manifest entry."""
    suffix = "." + SCALE
    layers = [n[: -len(suffix)] for n in tensors if n.endswith(suffix)]
    if not layers:
        return None, []
    weight, scale = (_shape(tensors[layers[0] + end]) for end in (".weight", suffix))
    return ("int8" if len(scale) == 1 else f"int4-g{2 * weight[1] // scale[1]}"), layers


def _shape(tensor) -> tuple:
    return tuple(tensor["shape"]) if isinstance(tensor, Mapping) else tuple(tensor.shape)


def quantized_sources(sources: Mapping, layers: Iterable[str], method: str = "int8") -> dict:
    """The checkpoint's tensors with each named layer's float weight seen as its quantized weight and
    scales, computed from what is read: a rank reads its slice (and, for a row-parallel int8 slice,
    the rows' maxima), never the whole checkpoint."""
    out = dict(sources)
    group = group_size(method)
    for layer in layers:
        full = sources[layer + ".weight"]
        view = _Int8Weight(full) if group is None else _Int4Weight(full, group)
        out[layer + ".weight"] = view
        out[layer + "." + SCALE] = view.scales
    return out


def _slices(index, shape) -> tuple[slice, slice]:
    index = index if isinstance(index, tuple) else (index,)
    rows = index[0] if index else slice(None)
    cols = index[1] if len(index) > 1 else slice(None)
    return slice(*rows.indices(shape[0])[:2]), slice(*cols.indices(shape[1])[:2]) if len(shape) > 1 else None


def _read(full, rows: slice, cols: slice | None = None) -> torch.Tensor:
    """full[rows, cols] of a tensor or lazy view; a view that cannot slice so is read whole."""
    try:
        return full[rows] if cols is None or cols == slice(0, full.shape[1]) else full[rows, cols]
    except IndexError:  # a ShardedView slices only along its sharded dim
        whole = _read_whole(full)
        return whole[rows] if cols is None else whole[rows, cols]


class _Int8Weight:
    """A full float weight (tensor or lazy slice) seen as int8, sliced as shard_tensor slices it."""

    dtype = torch.int8

    def __init__(self, full):
        self.full, self.shape = full, tuple(full.shape)
        self._scales: dict[tuple[int, int], torch.Tensor] = {}  # by row range: what reading those rows found
        self.scales = _Scales(self, (self.shape[0],), torch.float32)

    def scale_of(self, rows: slice, _cols=None) -> torch.Tensor:
        start, stop = rows.start, rows.stop
        for (lo, hi), scale in self._scales.items():
            if lo <= start and stop <= hi:
                return scale[start - lo : stop - lo]
        # Rows in blocks of ~64 MB: the maxima of a row-parallel layer, without the whole tensor in memory.
        block = max(1, (64 << 20) // max(1, self.shape[1] * 4))
        pieces = [_read(self.full, slice(r, min(r + block, stop))).abs().amax(dim=1) for r in range(start, stop, block)]
        scale = scales_from_absmax(torch.cat(pieces) if pieces else torch.empty(0))
        self._scales[(start, stop)] = scale
        return scale

    def __getitem__(self, index) -> torch.Tensor:
        rows, cols = _slices(index, self.shape)
        if cols == slice(0, self.shape[1]):  # whole rows (a column-parallel slice): their own scales
            weight = _read(self.full, rows)
            scale = self._scales[(rows.start, rows.stop)] = scales_from_absmax(weight.abs().amax(dim=1))
            return quantize_rows(weight, scale)
        return quantize_rows(_read(self.full, rows, cols), self.scale_of(rows))  # part of every row

    def read(self) -> torch.Tensor:
        return self[:]


class _Int4Weight:
    """A full float weight seen as packed int4 [n, k / 2]; each slice quantizes the groups it reads."""

    dtype = torch.uint8

    def __init__(self, full, group: int):
        n, k = full.shape
        if k % group:
            raise ValueError(f"{k} inputs are not whole groups of {group}")
        self.full, self.group, self.shape = full, group, (n, k // 2)
        self._scales: dict[tuple, torch.Tensor] = {}  # by (rows, groups) read
        self.scales = _Scales(self, (n, k // group), torch.bfloat16)

    def _quantize(self, rows: slice, first: int, last: int) -> torch.Tensor:
        """Packed rows for inputs [first, last) (whole groups); records their scales."""
        q, scale = quantize_int4(_read(self.full, rows, slice(first, last)), self.group)
        self._scales[(rows.start, rows.stop, first // self.group, last // self.group)] = scale
        return q

    def __getitem__(self, index) -> torch.Tensor:
        rows, cols = _slices(index, self.shape)
        if (2 * cols.start) % self.group or (2 * cols.stop) % self.group:
            raise IndexError(f"a slice of int4 weights must hold whole groups of {self.group} inputs")
        return self._quantize(rows, 2 * cols.start, 2 * cols.stop)

    def scale_of(self, rows: slice, groups: slice) -> torch.Tensor:
        key = (rows.start, rows.stop, groups.start, groups.stop)
        if key not in self._scales:
            self._quantize(rows, groups.start * self.group, groups.stop * self.group)
        return self._scales[key]

    def read(self) -> torch.Tensor:
        return self[:]


class _Scales:
    """The scales of a quantized weight view, from the slices its weight reads."""

    def __init__(self, weight, shape: tuple, dtype: torch.dtype):
        self._weight, self.shape, self.dtype = weight, shape, dtype

    def __getitem__(self, index) -> torch.Tensor:
        return self._weight.scale_of(*_slices(index, self.shape)).clone()

    def read(self) -> torch.Tensor:
        return self[:]
