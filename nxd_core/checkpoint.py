"""Sharded checkpoints: save, load, consolidate, reshard, and conversion from full checkpoints.

A sharded checkpoint is a directory (its format: checkpoint_format.py):

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
checkpoint (checkpoint_read.py), converting one to a sharded checkpoint, and
resharding (where the source is a `ShardedView` over the old ranks' files).
Files are opened per tensor, so a process holds one tensor, not a checkpoint,
in memory.

The names of checkpoint_format.py and checkpoint_read.py that callers use are
importable from here too (from nxd_core.checkpoint import read_manifest, ...).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from . import parallel_state as ps
from .checkpoint_format import (
    FORMAT,
    MANIFEST,
    VERSION,
    CheckpointError,
    _begin,
    _commit,
    _decode,
    _drop_tensors,
    _encode,
    _manifest,
    _new_save_id,
    _rank_file,
    _tensor_entry,
    _write_rank_file,
    read_manifest,
    read_rank_file,
    remove_failed_save,
    verify_rank_file,
)
from .checkpoint_read import (
    _assign,
    _describe_names,
    _LazySlice,
    _load_unsharded,
    _read_whole,
    check_keys,
    load_state_dict_from_full,
    open_full_checkpoint,
    open_full_weights,
    rank_slice,
    tied_aliases,
)
from .quantization import SCALE, quantized_sources
from .safetensors_stream import TORCH_DTYPES, SafetensorsWriter, nbytes, read_header
from .sharding import ShardedView, ShardSpec, get_sharding, local_shape

__all__ = [
    # operations
    "save",
    "load",
    "consolidate",
    "reshard",
    "convert_to_sharded",
    "open_sharded_checkpoint",
    "write_sharded",
    "retarget_specs",
    # the format (checkpoint_format.py)
    "FORMAT",
    "VERSION",
    "MANIFEST",
    "CheckpointError",
    "read_manifest",
    "read_rank_file",
    "verify_rank_file",
    "remove_failed_save",
    # reading full checkpoints (checkpoint_read.py)
    "check_keys",
    "tied_aliases",
    "load_state_dict_from_full",
    "open_full_checkpoint",
    "open_full_weights",
]


# -- saving -----------------------------------------------------------------------------------


def _model_prefix(state_dict: Mapping, model_key: str) -> str:
    # {"model": model.state_dict(), "epoch": ...} or a bare model.state_dict()
    return f"{model_key}/" if isinstance(state_dict.get(model_key), Mapping) else ""


def _unsharded_shape(piece: torch.Tensor, spec: ShardSpec | None) -> list[int]:
    """The unsharded shape of this rank's piece."""
    if spec is None:
        return list(piece.shape)
    return list(piece.shape[: spec.dim]) + [spec.full_size] + list(piece.shape[spec.dim + 1 :])


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
            layout = "sharded" if spec else "replicated" if in_model else "rank_local"
            entries[name] = _tensor_entry(layout, value.dtype, None if layout == "rank_local" else _unsharded_shape(value, spec), spec)
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
    raise CheckpointError(
        f"the save to {save_dir} failed on tp rank {rank} ({message}); its partial files were removed and the previous checkpoint is intact"
    )


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


# -- writing a checkpoint from full tensors ----------------------------------------------------


def _write_piece(writer: SafetensorsWriter, name: str, full: torch.Tensor, spec: ShardSpec | None, rank: int) -> None:
    writer.write(name, rank_slice(full, spec, rank, name))


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
    dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write a sharded checkpoint for `tp` ranks from full tensors (or lazy views of them), in one process.

    `sources[name]` is a full tensor or anything `shard_tensor` slices (safetensors
    slices, ShardedView); `specs[name]` its ShardSpec at this tp, or None to replicate.
    All tp files are written side by side, tensor by tensor: each source tensor is
    read once, in order, and only it is in memory. `progress(nbytes)` follows the reading.
    `dtype` casts every tensor, or (a mapping) the tensors it names.
    """
    dtypes = dtype if isinstance(dtype, Mapping) else dict.fromkeys(sources, dtype) if dtype else {}
    out_dir = Path(out_dir)
    save_id = _new_save_id()
    _begin(out_dir, save_id)
    if tree is None:  # a bare state dict
        model_prefix = ""
        tree = {"dict": [[name, {"tensor": name}] for name in sources]}
    entries, plans = {}, [[] for _ in range(tp)]
    for name, source in sources.items():
        spec = specs.get(name)
        target = dtypes.get(name) or source.dtype
        entries[model_prefix + name] = _tensor_entry("sharded" if spec else "replicated", target, source.shape, spec)
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
            full = full.to(dtypes.get(name) or full.dtype)
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
    ranks = [{"file": file, "bytes": (out_dir / file).stat().st_size, "checksum": checksum} for file, checksum in zip(files, checksums)]
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
    saved = {name[len(prefix) :]: meta for name, meta in manifest["tensors"].items() if name.startswith(prefix)}
    targets = model.state_dict(keep_vars=True)
    for name in check_keys(targets, saved, file, strict):
        meta, target = saved[name], targets[name]
        if TORCH_DTYPES[meta["dtype"]] != target.dtype:
            raise CheckpointError(
                f"{name} is {TORCH_DTYPES[meta['dtype']]} in {file} but the model holds {target.dtype}: "
                f"build the model with dtype={TORCH_DTYPES[meta['dtype']]} or convert the checkpoint"
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
        dtype = TORCH_DTYPES[meta["dtype"]]
        spec = ShardSpec.from_json(meta["sharding"]) if meta["sharding"] else None
        short = name[len(prefix) :]
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


def open_sharded_checkpoint(load_dir) -> dict:
    """name -> lazy full tensor of a sharded checkpoint's model, read from the ranks' pieces (what
    consolidate and reshard read; loading quantized from an unquantized sharded checkpoint too)."""
    return _model_views(load_dir, read_manifest(load_dir))[0]


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
        ["model.safetensors"] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
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


def convert_to_sharded(
    source,
    out_dir,
    tp: int,
    specs: Mapping[str, ShardSpec | None],
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
    ignore: Callable[[str], bool] | None = None,
    quantize_layers: list[str] = (),
    quantize: str = "int8",
) -> dict:
    """Convert an unsharded checkpoint (HF directory or .safetensors file) to a sharded one for `tp`.

    `specs` maps every tensor name to its ShardSpec (any tp: it is retargeted)
    or None; build it from a model with `sharding.sharding_specs`. `ignore(name)`
    skips checkpoint entries the model does not hold (recomputed buffers).
    `quantize_layers` are written quantized by `quantize` (weights and scales: nxd_core.quantization);
    `dtype` casts the other floating-point tensors.
    """
    sources = {k: v for k, v in open_full_checkpoint(source).items() if not (ignore and ignore(k))}
    if quantize_layers:
        sources = quantized_sources(sources, quantize_layers, quantize)
    check_keys(specs, sources, str(source))
    ordered = {name: sources[name] for name in specs}
    dtypes = {name: dtype for name, s in ordered.items() if dtype and s.dtype.is_floating_point and not name.endswith(SCALE)}
    return write_sharded(out_dir, tp, ordered, retarget_specs(specs, tp), dtype=dtypes, progress=progress)
