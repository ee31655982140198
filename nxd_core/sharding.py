"""Which slice of a full tensor rank r of tp holds: pure functions over `ShardSpec`.

A parallel parameter carries a `ShardSpec` (docs/design.md, rule 1). The one
function `shard_tensor` turns a full tensor, or a lazy safetensors slice,
into rank r's piece; a `ShardedView` presents the pieces of all ranks as one
lazy full tensor that `shard_tensor` can slice again. Loading unsharded
checkpoints, HF conversion, consolidation and resharding all go through them.

Layout of a sharded dim of `full_size` elements at tensor parallel size tp:

* it is split into `parts` equal pieces, `parts = min(tp, max_parts)`;
  `max_parts` bounds the split (e.g. the number of KV heads, so a head is
  never cut); when tp > max_parts each piece is replicated on tp // parts
  consecutive ranks;
* when `parts` does not divide `full_size`, the dim is zero-padded at the end
  to `padded_size` so that every piece has the same `shard_size`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from .parallel_state import divisors


@dataclass(frozen=True)
class ShardSpec:
    dim: int
    full_size: int
    tp: int
    max_parts: int | None = None
    # Size of the unit a piece must hold whole (head_dim for attention), so a split never cuts a head.
    unit: int = 1
    # May the dim be zero-padded to a multiple of parts? (Vocabularies, MLP widths: yes. Heads: no.)
    pad: bool = False

    def __post_init__(self):
        if self.max_parts is not None and self.tp % self.max_parts and self.max_parts % self.tp:
            valid = sorted(set(divisors(self.max_parts)) | {self.max_parts * k for k in (2, 4, 8)})
            raise ValueError(
                f"tensor parallel size {self.tp} can neither split {self.max_parts} pieces evenly "
                f"nor replicate them evenly; valid tp values are {valid}"
            )
        if self.is_padded and not self.pad:
            raise ValueError(
                f"{self.full_size} is not divisible by tensor parallel size {self.tp}. "
                f"Use a tp in {divisors(self.full_size // self.unit)}, or pad=True to zero-pad it to {self.padded_size}."
            )

    @property
    def parts(self) -> int:
        return self.tp if self.max_parts is None else min(self.tp, self.max_parts)

    @property
    def shard_size(self) -> int:
        units = math.ceil(self.full_size / self.unit)
        return math.ceil(units / self.parts) * self.unit

    @property
    def padded_size(self) -> int:
        return self.shard_size * self.parts

    @property
    def is_padded(self) -> bool:
        return self.padded_size != self.full_size

    def part_of(self, rank: int) -> int:
        return rank // (self.tp // self.parts)

    def bounds(self, rank: int) -> tuple[int, int]:
        """[start, stop) of rank's piece in the full (unpadded) dim; stop - start may be < shard_size."""
        start = min(self.part_of(rank) * self.shard_size, self.full_size)
        return start, min(start + self.shard_size, self.full_size)

    def with_tp(self, tp: int) -> ShardSpec:
        return replace(self, tp=tp)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ShardSpec:
        return cls(**data)


def local_shape(full_shape, spec: ShardSpec) -> tuple[int, ...]:
    shape = list(full_shape)
    shape[spec.dim] = spec.shard_size
    return tuple(shape)


def _full_shape(full) -> tuple[int, ...]:
    # torch tensors have .shape; safetensors' lazy slices have get_shape().
    return tuple(full.shape) if hasattr(full, "shape") else tuple(full.get_shape())


def shard_tensor(full, spec: ShardSpec, rank: int, name: str = "tensor") -> torch.Tensor:
    """Rank `rank`'s piece of `full` (a tensor or a safetensors slice), zero-padded to shard_size.

    Only the piece is read, so a lazy safetensors slice never loads the whole tensor.
    """
    shape = _full_shape(full)
    if spec.dim >= len(shape) or shape[spec.dim] != spec.full_size:
        raise ValueError(f"{name}: expected size {spec.full_size} along dim {spec.dim}, got shape {list(shape)}")
    start, stop = spec.bounds(rank)
    index = (slice(None),) * spec.dim + (slice(start, stop),)
    piece = full[index]
    if not isinstance(piece, torch.Tensor):
        piece = torch.as_tensor(piece)
    missing = spec.shard_size - (stop - start)
    if missing:
        pad_shape = list(piece.shape)
        pad_shape[spec.dim] = missing
        piece = torch.cat([piece, piece.new_zeros(pad_shape)], dim=spec.dim)
    return piece.contiguous()


class ShardedView:
    """A full tensor seen through the pieces that tp ranks hold, read lazily.

    `read_piece(rank, start, stop)` returns rows [start, stop) along spec.dim of
    rank's piece. Indexing the view with slices, as `shard_tensor` does, reads
    only the pieces that overlap, and each replicated piece once; so a full
    tensor (consolidation) or another tp's piece (resharding) comes out of the
    same code path as loading.
    """

    def __init__(self, spec: ShardSpec, full_shape, dtype: torch.dtype, read_piece):
        self.spec, self.shape, self.dtype = spec, tuple(full_shape), dtype
        self._read_piece = read_piece

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        dim = self.spec.dim
        wanted = index[dim] if len(index) > dim else slice(None)
        if any(i != slice(None) for k, i in enumerate(index) if k != dim) or wanted.step not in (None, 1):
            raise IndexError("ShardedView supports a contiguous slice along the sharded dim only")
        start, stop, _ = wanted.indices(self.spec.full_size)
        stride = self.spec.tp // self.spec.parts
        pieces = []
        for part in range(self.spec.parts):
            lo, hi = self.spec.bounds(part * stride)
            lo, hi = max(lo, start), min(hi, stop)
            if lo < hi:
                offset = part * self.spec.shard_size
                pieces.append(self._read_piece(part * stride, lo - offset, hi - offset))
        if not pieces:
            shape = list(self.shape)
            shape[dim] = 0
            return torch.empty(shape, dtype=self.dtype)
        return torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0]


def valid_mask(spec: ShardSpec, rank: int, shape, device=None) -> torch.Tensor:
    """1 where rank's piece holds real data, 0 on its padding; broadcastable to `shape`."""
    start, stop = spec.bounds(rank)
    mask_shape = [1] * len(shape)
    mask_shape[spec.dim] = spec.shard_size
    mask = torch.zeros(spec.shard_size, device=device)
    mask[: stop - start] = 1
    return mask.view(mask_shape)


# -- the metadata on the parameter ------------------------------------------------


def set_sharding(param: torch.Tensor, spec: ShardSpec) -> None:
    param.sharding = spec
    # The attribute names NxD/Megatron code looks for.
    param.tensor_model_parallel = True
    param.partition_dim = spec.dim
    param.partition_stride = 1


def get_sharding(param: torch.Tensor) -> ShardSpec | None:
    return getattr(param, "sharding", None)


def is_sharded(param: torch.Tensor) -> bool:
    return get_sharding(param) is not None


_TP_ATTRIBUTES = ("sharding", "tensor_model_parallel", "partition_dim", "partition_stride")


def copy_sharding_attributes(source: torch.Tensor, target: torch.Tensor) -> None:
    for attr in _TP_ATTRIBUTES:
        if hasattr(source, attr):
            setattr(target, attr, getattr(source, attr))


def tag_sharded_state(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the detached tensors of a state dict carry their parameter's ShardSpec too."""
    for name, param in module.named_parameters(recurse=False):
        spec = get_sharding(param)
        key = prefix + name
        if spec is not None and key in state_dict and state_dict[key] is not param:
            state_dict[key].sharding = spec


def sharding_specs(module: torch.nn.Module) -> dict[str, ShardSpec | None]:
    """Every state-dict entry's ShardSpec, or None for replicated ones, by name."""
    return {name: get_sharding(t) for name, t in module.state_dict(keep_vars=True).items()}
