"""Write a safetensors file one tensor at a time, with a running checksum.

The header (names, dtypes, shapes, offsets) is known before any data, so a
file is written by streaming each tensor's bytes in order: memory stays at
one tensor, however big the file. The result is a standard safetensors file.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
CHECKSUM = "crc32"


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors") from None


def nbytes(dtype: torch.dtype, shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Declare every tensor up front, then `write` them in declaration order; `close` returns the checksum."""

    def __init__(self, path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
        offset = 0
        self._order = []
        for name, dtype, shape in entries:
            size = nbytes(dtype, shape)
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, dtype, tuple(shape)))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.path, "wb")
        self._checksum = 0
        self._emit(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0

    def _emit(self, data) -> None:
        self._file.write(data)
        self._checksum = zlib.crc32(data, self._checksum)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self._order[self._next]
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.path}: expected {expected_name} {dtype} {list(shape)}, got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._emit(memoryview(data))
        self._next += 1

    def close(self) -> str:
        """Flush to disk and return the file's checksum as '<algorithm>:<hex>'."""
        if self._next != len(self._order):
            missing = [name for name, _, _ in self._order[self._next :]]
            self._file.close()
            raise ValueError(f"{self.path}: {len(missing)} declared tensors were never written: {missing[:5]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return f"{CHECKSUM}:{self._checksum:08x}"

    def abort(self) -> None:
        self._file.close()


def file_checksum(path, chunk: int = 16 << 20) -> str:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            value = zlib.crc32(block, value)
    return f"{CHECKSUM}:{value:08x}"
