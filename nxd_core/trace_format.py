"""The folder parallel_model_save writes, and the checks parallel_model_load makes before starting workers.

    folder/
      manifest.json                   format, version, tp_degree, buckets, inline flag, every file
      inline_weights_to_neff=True:    rank_00/bucket_00.pt2 ...   each rank: its graph with its weights
      inline_weights_to_neff=False:   graphs/bucket_00.pt2 ...    one graph per bucket, no weights, every rank
                                      weights/replicated.safetensors  weights equal on every rank, stored once
                                      weights/rank_00.safetensors ...  each rank's other weights (its shards)

Graphs are torch.export programs (.pt2) saved without example inputs, so
they hold JSON and raw tensors only; a .pt2 that would make torch.export.load
unpickle something is refused. Separated weights are safetensors. The
manifest is written last: a folder without one is not a traced model.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch.export.pt2_archive.constants import TENSOR_CONSTANT_FILENAME_PREFIX

from . import checkpoint_format
from .manifest_io import MANIFEST, read_json, write_json_atomically

FORMAT = "nxd-zoo/traced-model"
VERSION = 1


class TracedModelError(RuntimeError):
    """A folder that cannot be loaded as a traced model: the message names the file, the values and the fix."""


def graph_file(bucket: int, rank: int | None) -> str:
    """A bucket's graph: shared by every rank (rank None), or one rank's graph with its weights inlined."""
    return f"graphs/bucket_{bucket:02d}.pt2" if rank is None else f"rank_{rank:02d}/bucket_{bucket:02d}.pt2"


def weights_file(rank: int | None) -> str:
    """A rank's own weights, or (rank None) the weights every rank holds alike, stored once."""
    return "weights/replicated.safetensors" if rank is None else f"weights/rank_{rank:02d}.safetensors"


def files_of(tp: int, buckets: int, inline: bool) -> tuple[list[str], list[list[str]]]:
    """(files every rank reads, files of each rank)."""
    if inline:
        return [], [[graph_file(b, r) for b in range(buckets)] for r in range(tp)]
    shared = [graph_file(b, None) for b in range(buckets)] + [weights_file(None)]
    return shared, [[weights_file(r)] for r in range(tp)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TracedModelError(f"unknown dtype {name!r} in a traced model's manifest")
    return dtype


def tensor_meta(tensor: torch.Tensor) -> dict:
    return {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write manifest.json atomically and durably (fsync'd, renamed over the old one): the folder's commit point."""
    write_json_atomically(Path(folder) / MANIFEST, manifest)


def read_manifest(folder, tp_degree: int | None = None) -> dict:
    """The manifest of a traced model folder, checked: format, version, tp and every file present."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise TracedModelError(f"{folder} is not a folder: parallel_model_load needs the folder parallel_model_save wrote")
    if not path.exists():
        raise TracedModelError(
            f"{folder} is not a traced model: it has no {MANIFEST}. Write one with parallel_model_save(model, {str(folder)!r})"
            " (a save that was interrupted leaves no manifest: save again)"
        )
    # A manifest that is not UTF-8 raises UnicodeDecodeError here, as it always has (only invalid JSON is caught).
    manifest = read_json(path, TracedModelError, "save the model again", catch=json.JSONDecodeError)
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        hint = (
            " It is a sharded checkpoint: load it into a model with nxd_core.checkpoint.load, or trace a model from it."
            if found == checkpoint_format.FORMAT
            else ""
        )
        raise TracedModelError(f"{path} has format {found!r}, not a traced model ({FORMAT!r}).{hint}")
    if manifest.get("version") != VERSION:
        raise TracedModelError(
            f"{path} was written in version {manifest.get('version')} of {FORMAT}, and this nxd-zoo reads version {VERSION}. "
            "Trace and save the model again with this nxd-zoo, or load it with the nxd-zoo that wrote it."
        )
    saved_tp = manifest["tp_degree"]
    if tp_degree is not None and tp_degree != saved_tp:
        raise TracedModelError(
            f"{folder} was traced at tp_degree={saved_tp}, but tp_degree={tp_degree} was asked. A traced graph is fixed to "
            f"its tensor parallel degree: load it with tp_degree={saved_tp}, or trace the model again at tp_degree={tp_degree}."
        )
    shared, per_rank = manifest["files"]["shared"], manifest["files"]["ranks"]
    if len(per_rank) != saved_tp:
        raise TracedModelError(f"{path} lists files for {len(per_rank)} ranks but tp_degree is {saved_tp}: save the model again")
    for name in shared:
        if not (folder / name).is_file():
            raise TracedModelError(f"{folder / name} is missing (every rank reads it): copy the whole folder, or save the model again")
    for rank, names in enumerate(per_rank):
        for name in names:
            if not (folder / name).is_file():
                raise TracedModelError(
                    f"rank {rank}'s file {folder / name} is missing (the folder was saved at tp_degree={saved_tp} and needs "
                    "every rank's files): copy the whole folder, or save the model again"
                )
    for name in [*shared, *(n for names in per_rank for n in names)]:
        if name.endswith(".pt2"):
            check_graph_file(folder / name)
    return manifest


def check_graph_file(path: Path) -> None:
    """Refuse a .pt2 whose loading would unpickle (pickled tensors, custom objects, example inputs)."""

    def refuse(what: str):
        raise TracedModelError(
            f"{path} holds {what}, which loading would unpickle; parallel_model_save never writes that. "
            "Load only folders you trust, or trace and save the model again."
        )

    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise TracedModelError(f"{path} is not a torch.export archive (.pt2): save the model again") from None
    with archive:
        for info in archive.infolist():
            name = info.filename
            if name.endswith(".pt") and info.file_size > 0:
                refuse(f"a pickled file ({name})")
            is_constants = "/data/constants/" in name
            if name.endswith("_config.json") and (is_constants or "/data/weights/" in name):
                for fqn, payload in json.loads(archive.read(name)).get("config", {}).items():
                    if payload.get("use_pickle"):
                        refuse(f"a pickled tensor ({fqn})")
                    if is_constants and not payload.get("path_name", "").startswith(TENSOR_CONSTANT_FILENAME_PREFIX):
                        refuse(f"a non-tensor constant ({fqn})")


def folder_size(folder) -> int:
    """Bytes in the files of a folder (what parallel_model_save wrote)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
