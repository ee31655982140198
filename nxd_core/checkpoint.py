"""Sharded checkpoints: save, load, consolidate, reshard, and conversion from full checkpoints.

A sharded checkpoint is a directory:

    save_dir/
      manifest.json                              format, version, tp, every tensor's layout, each file's checksum
      tp_rank_00/checkpoint.<save_id>.safetensors  rank 0's tensors; the rest of its dict as JSON metadata
      tp_rank_01/...

The manifest is the commit point. A save writes files under a new save_id
(earlier files untouched), then atomically replaces manifest.json, then
deletes the files of earlier saves. A save killed at any point leaves either
the previous checkpoint, intact and loadable, or no manifest at all; the
`.saving.<id>` marker it leaves makes the interrupted save visible.

Every slice goes through `sharding.shard_tensor`: loading an unsharded
checkpoint, converting one to a sharded checkpoint, and resharding (where the
source is a `ShardedView` over the old ranks' files). Files are opened per
tensor, so a process holds one tensor, not a checkpoint, in memory.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from . import parallel_state as ps
from .safetensors_stream import DTYPE_NAMES, SafetensorsWriter, file_checksum, nbytes, read_file, read_header, read_tensor
from .sharding import ShardedView, ShardSpec, copy_sharding_attributes, get_sharding, local_shape, shard_tensor

FORMAT = "nxd-zoo/sharded-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_MANIFEST_KEYS = ("save_id", "tp", "model_prefix", "checksum", "tensors", "ranks")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked: the message names the file and the fix."""


# -- names and errors --------------------------------------------------------------


def _describe_names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_keys(expected, found, source: str, strict: bool = True) -> list[str]:
    """The expected names present in `found`; with strict, an error listing missing and unexpected names."""
    expected, found = list(expected), set(found)
    missing = [k for k in expected if k not in found]
    unexpected = sorted(found - set(expected))
    if strict and (missing or unexpected):
        raise KeyError(
            f"checkpoint {source} does not match the model: "
            f"missing {len(missing)} [{_describe_names(missing)}], "
            f"unexpected {len(unexpected)} [{_describe_names(unexpected)}]. "
            "The checkpoint's names must equal the model's state_dict names (or pass strict=False)."
        )
    return [k for k in expected if k in found]


# -- putting tensors into a model -----------------------------------------------------


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Copy value into the tensor called `name`; on the meta device, replace it (in every module
    that shares it, so tied weights stay tied)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    current = getattr(owner, attr)
    if current.shape != value.shape:
        raise ValueError(f"{name}: checkpoint slice has shape {list(value.shape)}, model expects {list(current.shape)}")
    if not current.is_meta:
        with torch.no_grad():
            current.copy_(value)
        return
    value = value.to(current.dtype)
    if attr in owner._parameters:
        replacement = nn.Parameter(value, requires_grad=current.requires_grad)
        copy_sharding_attributes(current, replacement)
        for module in model.modules():
            for key, param in module._parameters.items():
                if param is current:
                    module._parameters[key] = replacement
    else:
        owner._buffers[attr] = value


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Tied names (a second name for a tensor already listed) -> the first name, e.g. lm_head.weight."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def load_state_dict_from_full(model: nn.Module, full_state: Mapping, strict: bool = True, source: str = "state dict") -> None:
    """Load an unsharded state dict (tensors or lazy safetensors slices) into a parallel model, in place.

    A tied name (lm_head.weight tied to the embedding) may be absent: it is filled through its twin.
    """
    rank = ps.get_tensor_model_parallel_rank()
    tp = ps.get_tensor_model_parallel_size()
    aliases = tied_aliases(model)
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in aliases}
    found = [k for k in full_state.keys() if k not in aliases]
    for name in check_keys(targets, found, source, strict):
        spec = get_sharding(targets[name])
        if spec is not None and spec.tp != tp:
            raise ValueError(f"{name} was built for tp={spec.tp} but the current tensor parallel size is {tp}")
        full = full_state[name]
        piece = shard_tensor(full, spec, rank, name) if spec is not None else _read_whole(full)
        _assign(model, name, piece)


def _read_whole(full) -> torch.Tensor:
    if isinstance(full, torch.Tensor):
        return full
    return full.read() if hasattr(full, "read") else full[:]


# -- unsharded checkpoints, read lazily -------------------------------------------------


class _LazySlice:
    """One tensor of a safetensors file, read only when asked: a slice through safetensors'
    lazy view, or the whole tensor with plain sequential reads."""

    def __init__(self, path: str, name: str, data_start: int, entry: dict):
        self.path, self.name, self._data_start, self._entry = path, name, data_start, entry
        self.shape, self.dtype = tuple(entry["shape"]), _DTYPES[entry["dtype"]]

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        first = index[0] if index else slice(None)
        if isinstance(first, slice) and first.step in (None, 1) and all(i == slice(None) for i in index[1:]):
            start, stop, _ = first.indices(self.shape[0])  # a row range: one exact read
            return read_tensor(self.path, self._data_start, self._entry, rows=(start, max(start, stop)))
        # Other slices through safetensors' lazy view, copied so no mapping of the file outlives the read.
        with safe_open(self.path, framework="pt") as handle:
            return handle.get_slice(self.name)[index].clone()

    @property
    def nbytes(self) -> int:
        begin, end = self._entry["data_offsets"]
        return end - begin

    def read(self, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return read_tensor(self.path, self._data_start, self._entry, buffer)


def open_full_checkpoint(path) -> dict:
    """name -> lazy tensor for an unsharded checkpoint: a .safetensors file, or a directory of
    Hugging Face safetensors shards (with model.safetensors.index.json) or one model.safetensors."""
    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
            if missing:
                raise FileNotFoundError(f"{index} lists files that are missing: {missing}; download them again")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"no safetensors weights in {path}: expected model.safetensors or model.safetensors.index.json"
                )
        paths = [str(path / f) for f in files]
    elif path.suffix == ".safetensors":
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        paths = [str(path)]
    else:
        raise ValueError(f"{path} is neither a .safetensors file nor a directory of them")
    tensors = {}
    for file in paths:
        data_start, header = read_header(file)
        for name, entry in header.items():
            tensors[name] = _LazySlice(file, name, data_start, entry)
    return tensors


def _load_unsharded(path: str, model: nn.Module, model_key: str, strict: bool) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path) or path.endswith(".safetensors"):
        load_state_dict_from_full(model, open_full_checkpoint(path), strict, source=path)
        return
    data = torch.load(path, map_location="cpu", weights_only=True)
    state = data.get(model_key, data) if isinstance(data, dict) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict under '{model_key}'")
    load_state_dict_from_full(model, state, strict, source=path)


# -- the non-tensor part of a checkpoint, as JSON ------------------------------------------


def _encode(obj, path: str, tensors: dict):
    """A JSON tree for obj; tensors are replaced by references and collected in `tensors`."""
    if isinstance(obj, torch.Tensor):
        name = path
        while name in tensors:
            name += "#"
        tensors[name] = obj
        return {"tensor": name}
    if isinstance(obj, Mapping):
        return {"dict": [[_encode(k, path, {}), _encode(v, f"{path}/{k}" if path else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{path}/{i}" if path else str(i), tensors) for i, v in enumerate(obj)]
        return {"list" if isinstance(obj, list) else "tuple": items}
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"float": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"cannot save {type(obj).__name__} at '{path}': checkpoints hold tensors, numbers, strings, "
        "None, lists, tuples and dicts (no pickled objects)"
    )


def _decode(node, read_tensor: Callable[[str], object]):
    if isinstance(node, dict):
        (kind, value), = node.items()
        if kind == "tensor":
            return read_tensor(value)
        if kind == "dict":
            return {_decode(k, read_tensor): _decode(v, read_tensor) for k, v in value}
        if kind == "list":
            return [_decode(v, read_tensor) for v in value]
        if kind == "tuple":
            return tuple(_decode(v, read_tensor) for v in value)
        if kind == "float":
            return float(value)
    return node


# -- the manifest and the commit ---------------------------------------------------------


def _new_save_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def _rank_file(rank: int, save_id: str) -> str:
    return f"tp_rank_{rank:02d}/checkpoint.{save_id}.safetensors"


def _marker(save_dir: Path, save_id: str) -> Path:
    return save_dir / f".saving.{save_id}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _begin(save_dir: Path, save_id: str) -> None:
    if save_dir.exists() and not save_dir.is_dir():
        raise NotADirectoryError(f"{save_dir} is a file, not a directory: a checkpoint is a directory; choose another path")
    save_dir.mkdir(parents=True, exist_ok=True)
    _marker(save_dir, save_id).write_text(f"an nxd-zoo save started at {time.ctime()} and has not completed\n")


def _tmp_manifest(save_dir: Path, save_id: str) -> Path:
    return save_dir / f"{MANIFEST}.{save_id}.tmp"


def remove_failed_save(save_dir: Path, save_id: str) -> None:
    """Delete what a save that failed wrote (its rank files, marker and temporary manifest), so that
    it leaves no partial files and takes no space; the previous checkpoint is not touched."""
    try:
        if json.loads((save_dir / MANIFEST).read_text()).get("save_id") == save_id:
            return  # it was committed after all: these files are the checkpoint now
    except (OSError, ValueError):
        pass
    for rank_dir in save_dir.glob("tp_rank_*"):
        for file in rank_dir.glob(f"checkpoint.{save_id}.safetensors*"):
            file.unlink(missing_ok=True)
        if rank_dir.is_dir() and not any(rank_dir.iterdir()):
            rank_dir.rmdir()
    _tmp_manifest(save_dir, save_id).unlink(missing_ok=True)
    _marker(save_dir, save_id).unlink(missing_ok=True)


def _commit(save_dir: Path, manifest: dict) -> None:
    """Make the new checkpoint the one that loads, atomically; then remove what earlier saves left."""
    tmp = _tmp_manifest(save_dir, manifest["save_id"])
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, save_dir / MANIFEST)
    _fsync_dir(save_dir)
    keep = {r["file"] for r in manifest["ranks"]}
    for rank_dir in save_dir.glob("tp_rank_*"):
        for file in rank_dir.glob("checkpoint.*.safetensors"):
            if f"{rank_dir.name}/{file.name}" not in keep:
                file.unlink()
        if not any(rank_dir.iterdir()):
            rank_dir.rmdir()
    for marker in save_dir.glob(".saving.*"):
        marker.unlink()


def read_manifest(load_dir) -> dict:
    """The manifest of a complete sharded checkpoint, or a clear error saying what is wrong."""
    load_dir = Path(load_dir)
    path = load_dir / MANIFEST
    if not path.exists():
        if not load_dir.exists():
            raise FileNotFoundError(f"checkpoint directory not found: {load_dir}")
        if list(load_dir.glob(".saving.*")) or list(load_dir.glob("tp_rank_*")):
            raise CheckpointError(
                f"{load_dir} holds an incomplete checkpoint: a save was interrupted before it wrote {MANIFEST}. "
                "Save again; nothing in this directory is loadable."
            )
        raise CheckpointError(f"{load_dir} is not a sharded checkpoint (no {MANIFEST}); for a single file use sharded=False")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): the checkpoint's manifest is damaged; restore it or save again") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path} is not a checkpoint manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this nxd-zoo reads {FORMAT!r} version {VERSION}. Re-save it with this version."
        )
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: the manifest is damaged or was edited; restore it or save again")
    interrupted = [m.name.split(".", 2)[2] for m in load_dir.glob(".saving.*")]
    if interrupted:
        warnings.warn(
            f"{load_dir}: an interrupted save ({', '.join(interrupted)}) left partial files; "
            f"loading the last complete checkpoint ({manifest['save_id']})",
            stacklevel=3,
        )
    return manifest


def verify_rank_file(load_dir, manifest: dict, rank: int) -> str:
    """The path of rank's file after checking that it exists, is whole, and matches its checksum."""
    path = _check_rank_file(load_dir, manifest, rank)
    if file_checksum(path) != manifest["ranks"][rank]["checksum"]:
        raise CheckpointError(f"checksum mismatch in {path}: the file is damaged; restore it or save again")
    return str(path)


def _check_rank_file(load_dir, manifest: dict, rank: int) -> Path:
    entry = manifest["ranks"][rank]
    path = Path(load_dir) / entry["file"]
    if not path.exists():
        raise CheckpointError(f"missing shard file {path} (tp rank {rank} of {manifest['tp']}); restore it or save again")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(
            f"truncated or damaged shard file {path}: {size} bytes, the manifest records {entry['bytes']}; "
            "restore it or save again"
        )
    return path


def read_rank_file(load_dir, manifest: dict, rank: int) -> tuple[dict, dict[str, torch.Tensor], str]:
    """Rank's (metadata, tensors, path), read in one pass and checked against the manifest's size and checksum."""
    path = _check_rank_file(load_dir, manifest, rank)
    metadata, tensors, checksum = read_file(path)
    if checksum != manifest["ranks"][rank]["checksum"]:
        raise CheckpointError(f"checksum mismatch in {path}: the file is damaged; restore it or save again")
    return metadata, tensors, str(path)


# -- writing ---------------------------------------------------------------------------------


def _write_rank_file(save_dir: Path, rank: int, save_id: str, tensors: dict[str, torch.Tensor], tree) -> dict:
    """Write one rank's safetensors file, one tensor at a time."""
    relative = _rank_file(rank, save_id)
    (save_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = SafetensorsWriter(save_dir / relative, entries, {"nxd_tree": json.dumps(tree)})
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        checksum = writer.close()
    except BaseException:
        writer.abort()
        (save_dir / relative).unlink(missing_ok=True)
        raise
    return {"file": relative, "bytes": (save_dir / relative).stat().st_size, "checksum": checksum}


def _manifest(save_id: str, tp: int, model_prefix: str, tensors: dict, ranks: list[dict]) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "save_id": save_id, "tp": tp,
        "model_prefix": model_prefix, "checksum": "crc32", "tensors": tensors, "ranks": ranks,
    }


def _tensor_entry(value, spec: ShardSpec | None, layout: str) -> dict:
    full_shape = list(value.shape) if spec is None else list(value.shape[: spec.dim]) + [spec.full_size] + list(value.shape[spec.dim + 1 :])
    return {
        "layout": layout, "dtype": DTYPE_NAMES[value.dtype],
        "shape": full_shape if layout != "rank_local" else None,
        "sharding": spec.to_json() if spec else None,
    }


def _model_prefix(state_dict: Mapping, model_key: str) -> str:
    # {"model": model.state_dict(), "epoch": ...} or a bare model.state_dict()
    return f"{model_key}/" if isinstance(state_dict.get(model_key), Mapping) else ""


def save(state_dict: Mapping, save_dir, model_key: str = "model") -> None:
    """Save each TP rank's shard under save_dir/tp_rank_XX/ (only data-parallel rank 0 writes).

    Every rank calls it. Tensors go to safetensors, the rest of the dict
    (epoch, loss, optimizer hyper-parameters) to JSON metadata; nothing is
    pickled. Model tensors (under `model_key`, or all of a bare state dict)
    carry their sharding; other tensors (optimizer state) are kept per rank.
    """
    save_dir = Path(save_dir)
    tp, tp_rank = ps.get_tensor_model_parallel_size(), ps.get_tensor_model_parallel_rank()
    if ps.get_data_parallel_rank() == 0:
        save_id = _broadcast_from_tp_rank0(_new_save_id() if tp_rank == 0 else None)
        # Every step ends with the TP ranks agreeing that it worked: a rank that failed
        # alone would leave the others waiting for it, and its files behind.
        _every_rank_succeeded(save_dir, save_id, _attempt(lambda: _begin(save_dir, save_id) if tp_rank == 0 else None))
        tensors: dict = {}
        tree = _encode(state_dict, "", tensors)
        prefix = _model_prefix(state_dict, model_key)
        entries = {}
        for name, value in tensors.items():
            in_model = name.startswith(prefix)
            spec = get_sharding(value) if in_model else None
            entries[name] = _tensor_entry(value, spec, "sharded" if spec else "replicated" if in_model else "rank_local")
        ranks = _every_rank_succeeded(save_dir, save_id, _attempt(lambda: _write_rank_file(save_dir, tp_rank, save_id, tensors, tree)))
        commit = (lambda: _commit(save_dir, _manifest(save_id, tp, prefix, entries, ranks))) if tp_rank == 0 else (lambda: None)
        _every_rank_succeeded(save_dir, save_id, _attempt(commit))
    if dist.is_initialized():
        dist.barrier()


def _attempt(step: Callable) -> tuple:
    """(result, None) or (None, the exception) of one step of a save."""
    try:
        return step(), None
    except Exception as exc:  # reported to every rank by _every_rank_succeeded
        return None, exc


def _every_rank_succeeded(save_dir: Path, save_id: str, outcome: tuple) -> list:
    """Every TP rank's result of a step, or, when any rank failed, the failed save's files removed
    (by TP rank 0) and an error raised on every rank: its own, or the rank that failed."""
    result, error = outcome
    outcomes = _gather_to_tp_rank0((result, None if error is None else f"{type(error).__name__}: {error}"))
    failures = [(rank, message) for rank, (_, message) in enumerate(outcomes) if message]
    if not failures:
        return [value for value, _ in outcomes]
    if ps.get_tensor_model_parallel_rank() == 0:
        remove_failed_save(save_dir, save_id)
    if error is not None:
        error.add_note(f"the save to {save_dir} was abandoned and its partial files removed; the previous checkpoint is intact")
        raise error
    rank, message = failures[0]
    raise CheckpointError(f"the save to {save_dir} failed on tp rank {rank} ({message}); its partial files were removed and the previous checkpoint is intact")


def _broadcast_from_tp_rank0(value):
    if ps.get_tensor_model_parallel_size() == 1:
        return value
    group = ps.get_tensor_model_parallel_group()
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _gather_to_tp_rank0(value) -> list:
    if ps.get_tensor_model_parallel_size() == 1:
        return [value]
    group = ps.get_tensor_model_parallel_group()
    gathered = [None] * ps.get_tensor_model_parallel_size()
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def _tp_barrier() -> None:
    if ps.get_tensor_model_parallel_size() > 1:
        dist.barrier(group=ps.get_tensor_model_parallel_group())


def _write_piece(writer: SafetensorsWriter, name: str, full: torch.Tensor, spec: ShardSpec | None, rank: int) -> None:
    writer.write(name, shard_tensor(full, spec, rank, name) if spec else full)


def _read_ahead(sources: Mapping[str, object], depth: int = 2):
    """(name, full tensor, release) in order, with the next `depth` tensors being read on threads.

    Reading releases the GIL, so the disk stays busy (and its queue full) while
    tensors are sliced and written. Whole-file tensors are read into reused
    buffers (fresh memory for every tensor costs more in page faults than the
    disk costs in time); call `release()` once the tensor is no longer used.
    """
    import queue
    from collections import deque
    from itertools import islice

    free: queue.Queue = queue.Queue()
    largest = max((getattr(s, "nbytes", 0) for s in sources.values()), default=0)
    for _ in range(depth + 2 if largest else 0):  # being read, in use, and being written
        free.put(torch.empty(largest, dtype=torch.uint8))

    def read(source):
        if isinstance(source, _LazySlice):
            buffer = free.get()
            return source.read(buffer), (lambda: free.put(buffer))
        return _read_whole(source), (lambda: None)

    names = iter(sources)
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="nxd-read-ahead") as pool:
        pending = deque((name, pool.submit(read, sources[name])) for name in islice(names, depth))
        while pending:
            name, future = pending.popleft()
            full, release = future.result()
            following = next(names, None)
            if following is not None:
                pending.append((following, pool.submit(read, sources[following])))
            yield name, full, release


def write_sharded(
    out_dir,
    tp: int,
    sources: Mapping[str, object],
    specs: Mapping[str, ShardSpec | None],
    tree=None,
    model_prefix: str = "",
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write a sharded checkpoint for `tp` ranks from full tensors (or lazy views of them), in one process.

    `sources[name]` is a full tensor or anything `shard_tensor` slices (safetensors
    slices, ShardedView); `specs[name]` its ShardSpec at this tp, or None to replicate.
    All tp files are written side by side, tensor by tensor: each source tensor is
    read once, in order, and only it is in memory. `progress(nbytes)` follows the reading.
    """
    out_dir = Path(out_dir)
    save_id = _new_save_id()
    _begin(out_dir, save_id)
    if tree is None:  # a bare state dict
        model_prefix = ""
        tree = {"dict": [[name, {"tensor": name}] for name in sources]}
    entries, plans = {}, [[] for _ in range(tp)]
    for name, source in sources.items():
        spec = specs.get(name)
        target = dtype or source.dtype
        entries[model_prefix + name] = {
            "layout": "sharded" if spec else "replicated", "dtype": DTYPE_NAMES[target],
            "shape": list(source.shape), "sharding": spec.to_json() if spec else None,
        }
        shape = local_shape(source.shape, spec) if spec else tuple(source.shape)
        for plan in plans:
            plan.append((model_prefix + name, target, shape))
    files = [_rank_file(rank, save_id) for rank in range(tp)]
    writers, threads = [], []
    try:
        for rank, plan in enumerate(plans):
            (out_dir / files[rank]).parent.mkdir(parents=True, exist_ok=True)
            writers.append(SafetensorsWriter(out_dir / files[rank], plan, {"nxd_tree": json.dumps(tree)}))
        # One thread per rank file (order within a file is kept): slicing, checksums and
        # writes of different files overlap each other and the read-ahead.
        threads = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nxd-write-{r}") for r in range(tp)]
        previous, release_previous = [], lambda: None
        for name, full, release in _read_ahead(sources):
            spec = specs.get(name)
            full = full.to(dtype or full.dtype)
            current = [
                thread.submit(_write_piece, writer, model_prefix + name, full, spec, rank)
                for rank, (thread, writer) in enumerate(zip(threads, writers))
            ]
            for future in previous:  # at most two tensors being written
                future.result()
            release_previous()
            previous, release_previous = current, release
            if progress:
                progress(full.numel() * full.element_size())
            del full
        for future in previous:
            future.result()
        checksums = [writer.close() for writer in writers]
    except BaseException:
        for writer in writers:
            writer.abort()
        for thread in threads:
            thread.shutdown(wait=True, cancel_futures=True)
        remove_failed_save(out_dir, save_id)
        raise
    finally:
        for thread in threads:
            thread.shutdown(wait=True, cancel_futures=True)
    ranks = [
        {"file": file, "bytes": (out_dir / file).stat().st_size, "checksum": checksum}
        for file, checksum in zip(files, checksums)
    ]
    manifest = _manifest(save_id, tp, model_prefix, entries, ranks)
    try:
        _commit(out_dir, manifest)
    except BaseException:
        remove_failed_save(out_dir, save_id)
        raise
    return manifest


# -- loading ---------------------------------------------------------------------------------


def load(load_dir, model: nn.Module | None = None, model_key: str = "model", sharded: bool = True, strict: bool = True):
    """Load a checkpoint; with a model, into the model in place.

    sharded=True: each rank reads only its own tp_rank_XX file (checked against
    the manifest's size and checksum), one tensor at a time. Returns the saved
    dict; when a model was given, without its model entry.
    sharded=False: one unsharded checkpoint, of which each rank reads only its
    slices: a torch file holding {model_key: state_dict} (weights_only=True),
    a .safetensors file, or a Hugging Face directory of safetensors shards.
    """
    path = os.fspath(load_dir)
    if not sharded:
        if model is None:
            raise ValueError("load(..., sharded=False) needs the model to load into: load(path, model, sharded=False)")
        _load_unsharded(path, model, model_key, strict)
        return model

    manifest = read_manifest(path)
    tp, rank = ps.get_tensor_model_parallel_size(), ps.get_tensor_model_parallel_rank()
    if manifest["tp"] != tp:
        raise CheckpointError(
            f"{path} was saved at tp={manifest['tp']} but this process runs at tp={tp}. "
            f"Reshard it: `nxd reshard {path} OUT --tp {tp}` or nxd_core.checkpoint.reshard({path!r}, OUT, tp={tp})"
        )
    metadata, tensors, file = read_rank_file(path, manifest, rank)
    tree = json.loads(metadata["nxd_tree"])
    prefix = manifest["model_prefix"]
    if model is not None:
        _load_into_model(model, tensors, file, manifest, strict)
        if not prefix:
            return {}
        tree["dict"] = [[k, v] for k, v in tree["dict"] if k != prefix[:-1]]
    return _decode(tree, lambda name: tensors[name].clone())


def _load_into_model(model: nn.Module, tensors: dict, file: str, manifest: dict, strict: bool) -> None:
    prefix = manifest["model_prefix"]
    saved = {name[len(prefix):]: meta for name, meta in manifest["tensors"].items() if name.startswith(prefix)}
    targets = model.state_dict(keep_vars=True)
    for name in check_keys(targets, saved, file, strict):
        meta, target = saved[name], targets[name]
        if _DTYPES[meta["dtype"]] != target.dtype:
            raise CheckpointError(
                f"{name} is {_DTYPES[meta['dtype']]} in {file} but the model holds {target.dtype}: "
                f"build the model with dtype={_DTYPES[meta['dtype']]} or convert the checkpoint"
            )
        spec = get_sharding(target)
        if (spec.to_json() if spec else None) != meta["sharding"]:
            raise CheckpointError(f"{name}: the checkpoint was sharded as {meta['sharding']}, the model as {spec}")
        _assign(model, name, tensors[prefix + name])


# -- consolidate and reshard ---------------------------------------------------------------


def _model_views(load_dir, manifest: dict) -> tuple[dict, dict, list[str]]:
    """name -> lazy full tensor over the ranks' files, name -> spec (every model tensor), and the
    ranks' files, each verified once here."""
    load_dir = Path(load_dir)
    files = [verify_rank_file(load_dir, manifest, r) for r in range(manifest["tp"])]
    data_start, header = read_header(files[0])  # replicated tensors are read from rank 0's file
    prefix = manifest["model_prefix"]
    views, specs = {}, {}
    for name, meta in manifest["tensors"].items():
        if meta["layout"] == "rank_local":
            continue
        dtype = _DTYPES[meta["dtype"]]
        spec = ShardSpec.from_json(meta["sharding"]) if meta["sharding"] else None
        short = name[len(prefix):]
        if spec is None:
            views[short] = _LazySlice(files[0], name, data_start, header[name])
        else:
            def read_piece(rank, start, stop, name=name, dim=spec.dim):
                index = (slice(None),) * dim + (slice(start, stop),)
                with safe_open(files[rank], framework="pt") as handle:
                    return handle.get_slice(name)[index]

            views[short] = ShardedView(spec, meta["shape"], dtype, read_piece)
        specs[short] = spec
    return views, specs, files


def consolidate(load_dir, out_dir, max_shard_size: int = 5 << 30) -> list[str]:
    """Merge the tp_rank_XX shards' model tensors into one full safetensors checkpoint.

    Big models are split Hugging Face style (model-0000k-of-0000n.safetensors
    plus model.safetensors.index.json). One tensor is in memory at a time.
    Returns the files written.
    """
    manifest = read_manifest(load_dir)
    views, _, _ = _model_views(load_dir, manifest)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, not a directory: choose another output path")
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name, view in views.items():
        tensor_bytes = nbytes(view.dtype, view.shape)
        if groups[-1] and size + tensor_bytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += tensor_bytes
    names = (
        ["model.safetensors"] if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    for file, group in zip(names, groups):
        tmp = out_dir / f"{file}.partial"
        writer = SafetensorsWriter(tmp, [(n, views[n].dtype, tuple(views[n].shape)) for n in group], {"format": "pt"})
        try:
            for name in group:
                writer.write(name, _read_whole(views[name]))
            writer.close()
        except BaseException:
            writer.abort()
            tmp.unlink(missing_ok=True)  # no partial file left behind
            raise
        os.replace(tmp, out_dir / file)
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(nbytes(v.dtype, v.shape) for v in views.values())},
            "weight_map": {name: file for file, group in zip(names, groups) for name in group},
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [str(out_dir / f) for f in names]


def retarget_specs(specs: Mapping[str, ShardSpec | None], tp: int) -> dict:
    """The same layout at another tp, or an error naming the first tensor that cannot be split that way."""
    retargeted = {}
    for name, spec in specs.items():
        try:
            retargeted[name] = spec.with_tp(tp) if spec else None
        except ValueError as exc:
            raise ValueError(f"cannot shard {name} for tp={tp}: {exc}") from None
    return retargeted


def reshard(load_dir, out_dir, tp: int) -> dict:
    """Rewrite a sharded checkpoint for another tp, never holding more than one tensor piece.

    Model weights and the non-tensor entries (epoch, ...) carry over; per-rank
    tensors such as optimizer state cannot be resharded and are left out (a
    warning lists them).
    """
    manifest = read_manifest(load_dir)
    views, specs, files = _model_views(load_dir, manifest)
    new_specs = retarget_specs(specs, tp)
    dropped = [n for n, m in manifest["tensors"].items() if m["layout"] == "rank_local"]
    if dropped:
        warnings.warn(f"reshard leaves out per-rank tensors (optimizer state): {_describe_names(dropped)}", stacklevel=2)
    with safe_open(files[0], framework="pt") as handle:
        tree = json.loads(handle.metadata()["nxd_tree"])
    tree = _drop_tensors(tree, set(dropped))
    return write_sharded(out_dir, tp, views, new_specs, tree=tree, model_prefix=manifest["model_prefix"])


def _drop_tensors(node, names: set):
    """The tree with references to `names` replaced by None."""
    if isinstance(node, dict):
        (kind, value), = node.items()
        if kind == "tensor":
            return None if value in names else node
        if kind == "dict":
            return {"dict": [[k, _drop_tensors(v, names)] for k, v in value]}
        if kind in ("list", "tuple"):
            return {kind: [_drop_tensors(v, names) for v in value]}
    return node


def convert_to_sharded(source, out_dir, tp: int, specs: Mapping[str, ShardSpec | None], dtype: torch.dtype | None = None,
                       progress: Callable[[int], None] | None = None, ignore: Callable[[str], bool] | None = None) -> dict:
    """Convert an unsharded checkpoint (HF directory or .safetensors file) to a sharded one for `tp`.

    `specs` maps every tensor name to its ShardSpec (any tp: it is retargeted)
    or None; build it from a model with `sharding.sharding_specs`. `ignore(name)`
    skips checkpoint entries the model does not hold (recomputed buffers).
    """
    sources = {k: v for k, v in open_full_checkpoint(source).items() if not (ignore and ignore(k))}
    check_keys(specs, sources, str(source))
    ordered = {name: sources[name] for name in specs}
    return write_sharded(out_dir, tp, ordered, retarget_specs(specs, tp), dtype=dtype, progress=progress)
