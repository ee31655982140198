"""Autobucketing: one traced program per input shape, and a kernel that picks the program.

A bucket kernel is a function of the list of input tensors that returns the
inputs padded to a bucket's shape and the bucket's index (the NxD inference
guide's shape):

    def kernel(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | int]

`BucketModelConfig(bucket_kernel, bucket_kernel_constant_args)` takes, like
torch_neuronx, a factory that returns the kernel (`get_bucket_kernel(*args)`),
or the kernel itself; a torch.jit.script'ed kernel works too.

Ready-made kernels, which parallel_model_save records in the folder's manifest
so that parallel_model_load restores them (a custom kernel is code, which is
not saved: pass bucket_config to parallel_model_load again):

* `SequenceLengthKernel(buckets)`: the smallest bucket that holds the
  sequence length; pads with zeros (right padding by default, as the guide).
* `PositionKernel(buckets, position_input)`: for token generation, the
  smallest bucket whose KV length covers a position input (e.g.
  cache_position); pads the inputs that grow with the position (the attention
  mask) to the bucket's length.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch


class BucketModelConfig:
    """Which bucket an input goes to: `bucket_kernel(*bucket_kernel_constant_args)` returns the kernel.

    A callable that cannot be called with the constant args alone (it needs the
    input list) is taken as the kernel itself.
    """

    def __init__(self, bucket_kernel: Callable, bucket_kernel_constant_args: Sequence = ()):
        if not callable(bucket_kernel):
            raise TypeError(f"bucket_kernel must be callable, got {type(bucket_kernel).__name__}")
        args = tuple(bucket_kernel_constant_args)
        self.kernel = bucket_kernel(*args) if _is_factory(bucket_kernel, args) else bucket_kernel
        if not callable(self.kernel):
            raise TypeError(f"the bucket kernel factory returned {type(self.kernel).__name__}, not a callable kernel")

    def select(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        """(inputs padded to their bucket, bucket index)."""
        padded, index = self.kernel(list(tensors))
        return list(padded), int(index.reshape(-1)[0]) if isinstance(index, torch.Tensor) else int(index)

    def to_json(self) -> dict | None:
        """The ready-made kernel as data (restored by parallel_model_load); None for a custom kernel."""
        to_json = getattr(self.kernel, "to_json", None)
        return to_json() if to_json else None

    @property
    def kernel_name(self) -> str:
        kernel = self.kernel
        return getattr(kernel, "__qualname__", None) or getattr(kernel, "qualified_name", None) or type(kernel).__name__

    @classmethod
    def from_json(cls, data: dict) -> BucketModelConfig:
        kinds = {k.__name__: k for k in (SequenceLengthKernel, PositionKernel)}
        if data.get("kind") not in kinds:
            raise ValueError(f"unknown bucket kernel {data.get('kind')!r}: known ones are {sorted(kinds)}")
        fields = {k: v for k, v in data.items() if k != "kind"}
        return cls(kinds[data["kind"]](**fields))


def _is_factory(fn: Callable, args: tuple) -> bool:
    try:
        inspect.signature(fn).bind(*args)
    except TypeError:
        return False  # it needs the input list: the kernel itself
    except ValueError:
        return False  # no Python signature (a scripted function): a kernel
    return True


def _pad(tensor: torch.Tensor, dim: int, size: int, value, side: str) -> torch.Tensor:
    missing = size - tensor.shape[dim]
    if missing == 0:
        return tensor
    if missing < 0:
        raise ValueError(f"an input of size {tensor.shape[dim]} along dim {dim} is longer than its bucket ({size})")
    shape = list(tensor.shape)
    shape[dim] = missing
    fill = torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, fill] if side == "right" else [fill, tensor], dim=dim)


def _too_long(what: str, value: int, buckets: list[int]) -> ValueError:
    return ValueError(
        f"{what} {value} does not fit the largest bucket ({max(buckets)}); buckets are {buckets}. "
        "Shorten the input, or trace again with a larger bucket."
    )


class SequenceLengthKernel:
    """The smallest bucket >= the sequence length (size of `dim` in the first input); pads to it.

    `inputs`: indices of the tensors to pad (default: every tensor whose `dim`
    has the first input's length). side="left" pads at the start (left-padded
    generation prompts); "right" (default) at the end.
    """

    def __init__(self, buckets: Sequence[int], dim: int = 1, pad_value=0, side: str = "right", inputs: Sequence[int] | None = None):
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        self.buckets = sorted(int(b) for b in buckets)
        self.dim, self.pad_value, self.side = dim, pad_value, side
        self.inputs = None if inputs is None else [int(i) for i in inputs]

    def __call__(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        length = tensors[0].shape[self.dim]
        index = next((i for i, b in enumerate(self.buckets) if length <= b), None)
        if index is None:
            raise _too_long("sequence length", length, self.buckets)
        size = self.buckets[index]
        padded = []
        for i, tensor in enumerate(tensors):
            chosen = i in self.inputs if self.inputs is not None else (tensor.dim() > self.dim and tensor.shape[self.dim] == length)
            padded.append(_pad(tensor, self.dim, size, self.pad_value, self.side) if chosen else tensor)
        return padded, torch.tensor([index])

    def to_json(self) -> dict:
        return {
            "kind": type(self).__name__,
            "buckets": self.buckets,
            "dim": self.dim,
            "pad_value": self.pad_value,
            "side": self.side,
            "inputs": self.inputs,
        }


class PositionKernel:
    """For token generation: the smallest bucket > the largest value of input `position_input`
    (a cache position: the KV slots written so far must fit the bucket).

    Inputs listed in `pad_inputs` (e.g. the attention mask over the slots so
    far) are right-padded with `pad_value` along `dim` to the bucket's length.
    """

    def __init__(self, buckets: Sequence[int], position_input: int, pad_inputs: Sequence[int] = (), dim: int = 1, pad_value=0):
        self.buckets = sorted(int(b) for b in buckets)
        self.position_input, self.pad_inputs = int(position_input), [int(i) for i in pad_inputs]
        self.dim, self.pad_value = dim, pad_value

    def __call__(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        position = int(tensors[self.position_input].max())
        index = next((i for i, b in enumerate(self.buckets) if position < b), None)
        if index is None:
            raise _too_long("position", position, self.buckets)
        size = self.buckets[index]
        padded = [_pad(t, self.dim, size, self.pad_value, "right") if i in self.pad_inputs else t for i, t in enumerate(tensors)]
        return padded, torch.tensor([index])

    def to_json(self) -> dict:
        return {
            "kind": type(self).__name__,
            "buckets": self.buckets,
            "position_input": self.position_input,
            "pad_inputs": self.pad_inputs,
            "dim": self.dim,
            "pad_value": self.pad_value,
        }
