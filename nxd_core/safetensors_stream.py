"""Write a safetensors file one tensor at a time, with a running checksum.

The header (names, dtypes, shapes, offsets) is known before any data, so a
file is written by streaming each tensor's bytes in order: memory stays at
one tensor, however big the file. The result is a standard safetensors file.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import zlib

import torch

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}  # a header's (or manifest's) "BF16" -> torch.bfloat16
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
    """Declare every tensor up front, then `write` them in declaration order; `close` returns the checksum.

    Data goes through an aligned staging buffer straight to the disk (O_DIRECT)
    where the file system allows it: writing gigabytes through the page cache
    makes the kernel throttle the writer and starve concurrent reads.
    """

    _BLOCK = 4096
    _STAGING = 16 << 20

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
        self._fd = _open_for_writing(self.path)
        self._staging = mmap.mmap(-1, self._STAGING)  # page-aligned, as O_DIRECT needs
        self._fill = self._offset = 0
        self._checksum = 0
        self._emit(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0

    def _emit(self, data) -> None:
        self._checksum = zlib.crc32(data, self._checksum)
        view = memoryview(data).cast("B")
        while len(view):
            n = min(len(view), self._STAGING - self._fill)
            self._staging[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == self._STAGING:
                self._flush(self._STAGING)

    def _flush(self, size: int) -> None:
        _write_fully(self._fd, memoryview(self._staging)[:size], self._offset, self.path)
        self._offset += size
        self._staging.seek(0)
        remainder = self._fill - size
        if remainder:
            self._staging[:remainder] = self._staging[size : self._fill]
        self._fill = remainder

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self._order[self._next]
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected {expected_name} {dtype} {list(shape)}, got {name} {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._emit(memoryview(data))
        self._next += 1

    def close(self) -> str:
        """Write the rest, flush to disk and return the file's checksum as '<algorithm>:<hex>'."""
        if self._next != len(self._order):
            missing = [name for name, _, _ in self._order[self._next :]]
            self.abort()
            raise ValueError(f"{self.path}: {len(missing)} declared tensors were never written: {missing[:5]}")
        aligned = self._fill - self._fill % self._BLOCK
        if aligned:
            self._flush(aligned)
        if self._fill:  # the unaligned tail goes through an ordinary descriptor
            tail = os.open(self.path, os.O_WRONLY)
            try:
                _write_fully(tail, memoryview(self._staging)[: self._fill], self._offset, self.path)
                os.fsync(tail)
            finally:
                os.close(tail)
        os.fsync(self._fd)
        self.abort()
        return f"{CHECKSUM}:{self._checksum:08x}"

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self._staging.close()
        except BufferError:
            pass  # a failed write's traceback still holds a view of it: freed with the traceback


def _write_fully(fd: int, data: memoryview, offset: int, path: str) -> None:
    """pwrite all of data; a full disk is reported as such (a short write is how it often shows first)."""
    done = 0
    try:
        while done < len(data):
            written = os.pwrite(fd, data[done:], offset + done)
            if written == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += written
    except OSError as exc:
        free = _free_bytes(path)
        if exc.errno == errno.ENOSPC or (done < len(data) and free is not None and free < len(data) - done):
            raise OSError(
                errno.ENOSPC, f"No space left on device writing {path} ({free} bytes free); free some space or save elsewhere"
            ) from None
        raise OSError(exc.errno, f"{path}: {exc.strerror or exc}") from None


def _free_bytes(path: str) -> int | None:
    try:
        stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _open_for_writing(path: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o644)
        except OSError:
            pass  # tmpfs and some file systems refuse O_DIRECT: use the page cache
    return os.open(path, flags, 0o644)


def file_checksum(path, chunk: int = 16 << 20) -> str:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            value = zlib.crc32(block, value)
    return f"{CHECKSUM}:{value:08x}"


def read_header(path) -> tuple[int, dict]:
    """(offset where the data starts, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def check_complete(path) -> None:
    """Raise ValueError naming the file when it is not a whole safetensors file (truncated, not
    safetensors at all): checked in the front end, before any worker starts to read it."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"its header claims {length} bytes")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); download or write it again") from None
    if size < 8 + length + end:
        raise ValueError(f"{path} is truncated: {size} bytes, but its header describes {8 + length + end}; download or write it again")


def _read_fully(f, view: memoryview, path, block: int = 64 << 20) -> memoryview:
    """Fill `view` from the file's current position, in blocks; a file that ends first is truncated."""
    done = 0
    while done < len(view):
        n = f.readinto(view[done : done + block])
        if not n:
            raise EOFError(f"{path} ended early: it is truncated")
        done += n
    return view


def read_tensor(
    path, data_start: int, entry: dict, buffer: torch.Tensor | None = None, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """A whole tensor, or rows [start, stop) of its first dim, with plain sequential reads.

    No mmap: the data is really in memory when this returns, and the GIL is
    released while reading. Reading into a reused `buffer` (uint8, large
    enough) avoids faulting in fresh memory for every tensor, which costs more
    than the disk on big checkpoints; the result then views the buffer.
    """
    begin, end = entry["data_offsets"]
    shape = list(entry["shape"])
    if rows is not None:
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        shape[0] = rows[1] - rows[0]
    size = end - begin
    data = torch.empty(size, dtype=torch.uint8) if buffer is None else buffer[:size]
    view = memoryview(data.numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(data_start + begin)
        _read_fully(f, view, path)
    return data.view(TORCH_DTYPES[entry["dtype"]]).reshape(shape)


def read_file(path, chunk: int = 64 << 20) -> tuple[dict, dict[str, torch.Tensor], str]:
    """A whole safetensors file in one sequential pass: (metadata, name -> tensor, checksum).

    The tensors are views into one buffer of the file's size, so loading a shard
    costs one read and one shard of memory; the checksum is computed on the way.
    """
    from concurrent.futures import ThreadPoolExecutor

    size = os.path.getsize(path)
    buffer = torch.empty(size, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    checksum = 0
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(max_workers=1) as reader:

        def read_chunk(start: int) -> memoryview:
            return _read_fully(f, view[start : min(start + chunk, size)], path)

        # The checksum of one chunk is computed while the next one is read (both release the GIL).
        pending = reader.submit(read_chunk, 0)
        for start in range(0, size, chunk):
            block = pending.result()
            if start + chunk < size:
                pending = reader.submit(read_chunk, start + chunk)
            checksum = zlib.crc32(block, checksum)
    (length,) = struct.unpack("<Q", bytes(view[:8]))
    header = json.loads(bytes(view[8 : 8 + length]))
    metadata = header.pop("__metadata__", {})
    data = buffer[8 + length :]
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        tensors[name] = data[begin:end].view(TORCH_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return metadata, tensors, f"{CHECKSUM}:{checksum:08x}"
