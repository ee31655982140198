"""The on-disk format of a sharded checkpoint: its files, its manifest, and the JSON tree of a saved dict.

    save_dir/
      manifest.json                              format, version, tp, every tensor's layout, each file's checksum
      tp_rank_00/checkpoint.<save_id>.safetensors  rank 0's tensors; the rest of its dict as JSON metadata
      tp_rank_01/...
      .saving.<save_id>                          while a save is under way (left by one that was interrupted)

The manifest is the commit point (manifest_io.write_json_atomically). The
operations on checkpoints (save, load, reshard, ...) are in checkpoint.py.
"""

from __future__ import annotations

import json
import math
import secrets
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .manifest_io import MANIFEST, read_json, write_json_atomically
from .safetensors_stream import DTYPE_NAMES, SafetensorsWriter, file_checksum, read_file
from .sharding import ShardSpec

FORMAT = "nxd-zoo/sharded-checkpoint"
VERSION = 1
_MANIFEST_KEYS = ("save_id", "tp", "model_prefix", "checksum", "tensors", "ranks")

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST",
    "CheckpointError",
    "read_manifest",
    "verify_rank_file",
    "read_rank_file",
    "remove_failed_save",
]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked: the message names the file and the fix."""


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
        ((kind, value),) = node.items()
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


def _drop_tensors(node, names: set):
    """The tree with references to `names` replaced by None."""
    if isinstance(node, dict):
        ((kind, value),) = node.items()
        if kind == "tensor":
            return None if value in names else node
        if kind == "dict":
            return {"dict": [[k, _drop_tensors(v, names)] for k, v in value]}
        if kind in ("list", "tuple"):
            return {kind: [_drop_tensors(v, names) for v in value]}
    return node


# -- the manifest and the commit ---------------------------------------------------------


def _new_save_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def _rank_file(rank: int, save_id: str) -> str:
    return f"tp_rank_{rank:02d}/checkpoint.{save_id}.safetensors"


def _marker(save_dir: Path, save_id: str) -> Path:
    return save_dir / f".saving.{save_id}"


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


def _tensor_entry(layout: str, dtype: torch.dtype, shape, spec: ShardSpec | None) -> dict:
    """A tensor's line in the manifest; `shape` is the full (unsharded) shape, None for rank_local."""
    return {
        "layout": layout,
        "dtype": DTYPE_NAMES[dtype],
        "shape": list(shape) if shape is not None else None,
        "sharding": spec.to_json() if spec else None,
    }


def _manifest(save_id: str, tp: int, model_prefix: str, tensors: dict, ranks: list[dict]) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "save_id": save_id,
        "tp": tp,
        "model_prefix": model_prefix,
        "checksum": "crc32",
        "tensors": tensors,
        "ranks": ranks,
    }


def _commit(save_dir: Path, manifest: dict) -> None:
    """Make the new checkpoint the one that loads, atomically; then remove what earlier saves left."""
    write_json_atomically(save_dir / MANIFEST, manifest, tmp=_tmp_manifest(save_dir, manifest["save_id"]))
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
    manifest = read_json(path, CheckpointError, "the checkpoint's manifest is damaged; restore it or save again")
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


# -- the rank files ----------------------------------------------------------------------------


def _check_rank_file(load_dir, manifest: dict, rank: int) -> Path:
    entry = manifest["ranks"][rank]
    path = Path(load_dir) / entry["file"]
    if not path.exists():
        raise CheckpointError(f"missing shard file {path} (tp rank {rank} of {manifest['tp']}); restore it or save again")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(
            f"truncated or damaged shard file {path}: {size} bytes, the manifest records {entry['bytes']}; restore it or save again"
        )
    return path


def _check_checksum(path: Path, checksum: str, manifest: dict, rank: int) -> None:
    if checksum != manifest["ranks"][rank]["checksum"]:
        raise CheckpointError(f"checksum mismatch in {path}: the file is damaged; restore it or save again")


def verify_rank_file(load_dir, manifest: dict, rank: int) -> str:
    """The path of rank's file after checking that it exists, is whole, and matches its checksum."""
    path = _check_rank_file(load_dir, manifest, rank)
    _check_checksum(path, file_checksum(path), manifest, rank)
    return str(path)


def read_rank_file(load_dir, manifest: dict, rank: int) -> tuple[dict, dict[str, torch.Tensor], str]:
    """Rank's (metadata, tensors, path), read in one pass and checked against the manifest's size and checksum."""
    path = _check_rank_file(load_dir, manifest, rank)
    metadata, tensors, checksum = read_file(path)
    _check_checksum(path, checksum, manifest, rank)
    return metadata, tensors, str(path)


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
