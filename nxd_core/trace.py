"""parallel_model_trace / parallel_model_save / parallel_model_load: the NxD inference guide's flow.

    model = parallel_model_trace(get_model, example_inputs, tp_degree=2)
    parallel_model_save(model, "tp_models")
    model = parallel_model_load("tp_models")
    logits = model(*inputs)[0]

`get_model()` runs in each of tp_degree worker processes: it builds the
parallel model, loads its weights (nxd_core.checkpoint.load(..., sharded=False))
and returns the model, or (model, io_aliases) where io_aliases' keys are the
model's state tensors (KV caches): they stay in the workers and are updated in
place by every call. Each worker exports its model with torch.export (one
program per bucket) and runs it compiled (torch.compile, at the first call of
each bucket) or eager (compiled=False).

The returned TensorParallelModel takes and returns torch tensors: every
worker runs its shard and rank 0's output comes back, in the structure the
module returns (a tuple, a dict, a transformers ModelOutput). With a
bucket_config, the output is the bucket's: per-token outputs keep the padded
length (slice them to the input's length); pooled outputs need nothing.

inline_weights_to_neff=False keeps weights apart from graphs: one graph per
bucket serves every rank (the model may hold no rank-dependent Python value
in forward: docs/design.md, rule 4), each rank's weights are a safetensors file,
and replace_weights swaps them without tracing again. The saved format is
described in nxd_core/trace_format.py and docs/trace.md.
"""

from __future__ import annotations

import importlib
import json
import uuid
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from . import trace_worker
from .bucketing import BucketModelConfig
from .trace_format import FORMAT, MANIFEST, VERSION, TracedModelError, files_of, read_manifest, tensor_meta, write_manifest
from .workers import Group, WorkerGroup

__all__ = [
    "parallel_model_trace",
    "parallel_model_save",
    "parallel_model_load",
    "TensorParallelModel",
    "BucketModelConfig",
    "TracedModelError",
]


class TensorParallelModel:
    """A traced tensor parallel model: call it with tensors, as the module it was traced from."""

    def __init__(self, group: Group, key: str, meta: dict, bucket_config: BucketModelConfig | None, owns_group: bool):
        self.group, self.key, self.meta = group, key, meta
        self.bucket_config = bucket_config
        self._owns_group = owns_group
        self._out_specs: dict[int, pytree.TreeSpec] = {}
        self._closed = False

    @property
    def tp_degree(self) -> int:
        return self.meta["tp_degree"]

    @property
    def inline_weights_to_neff(self) -> bool:
        return self.meta["inline_weights_to_neff"]

    @property
    def bucket_shapes(self) -> list[list[list[int]]]:
        """Each bucket's input shapes."""
        return [[t["shape"] for t in bucket["inputs"]] for bucket in self.meta["buckets"]]

    def __call__(self, *inputs: torch.Tensor):
        self._check_open()
        tensors = list(inputs)
        for i, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"input {i} is a {type(tensor).__name__}: a traced model takes torch tensors only")
        bucket = 0
        if self.bucket_config is not None:
            tensors, bucket = self.bucket_config.select(tensors)
            if not 0 <= bucket < len(self.meta["buckets"]):
                raise ValueError(f"the bucket kernel chose bucket {bucket}, but the model has {len(self.meta['buckets'])} buckets")
        self._check_inputs(tensors, bucket)
        leaves = self.group.run(trace_worker.run_shard, self.key, bucket, tensors)[0]
        return pytree.tree_unflatten(list(leaves), self._out_spec(bucket))

    def _out_spec(self, bucket: int) -> pytree.TreeSpec:
        if bucket not in self._out_specs:
            self._out_specs[bucket] = _load_treespec(self.meta["buckets"][bucket]["output"])
        return self._out_specs[bucket]

    def _check_inputs(self, tensors: list[torch.Tensor], bucket: int) -> None:
        traced = self.meta["buckets"][bucket]["inputs"]
        given = [tensor_meta(t) for t in tensors]
        if given != traced:
            where = f"bucket {bucket}" if len(self.meta["buckets"]) > 1 else "the traced program"
            raise ValueError(
                f"inputs {_describe(given)} do not match {where}, traced with {_describe(traced)}. Traced programs have "
                "static shapes: pad the inputs to that shape, or trace with a bucket_config whose kernel pads them."
            )

    def replace_weights(self, weights) -> None:
        """Swap every rank's weights for those of an unsharded checkpoint (a path that
        nxd_core.checkpoint.load(..., sharded=False) reads) or a full state dict, without tracing again.

        Each rank takes its slices by the sharding its parameters carry (sharding.shard_tensor).
        A path is read by the workers, each only its slices; a state dict is sliced here.
        State tensors (io_aliases) are left as they are.
        """
        self._check_open()
        if self.inline_weights_to_neff:
            raise ValueError("replace_weights needs weights kept apart from the graphs: trace with inline_weights_to_neff=False")
        info = self.meta["weights"]
        if isinstance(weights, (str, Path)):
            args = [(self.key, None, str(weights), info)] * self.tp_degree
        else:
            args = [(self.key, trace_worker.rank_pieces(weights, info, rank, "state dict"), None, info) for rank in range(self.tp_degree)]
        self.group.run_per_rank(trace_worker.replace_shard_weights, args)

    def _check_open(self) -> None:
        if self._closed or self.group.closed:
            raise RuntimeError("this traced model is closed (or its workers are): load it again with parallel_model_load")

    def close(self) -> None:
        """Free the workers' programs and weights (and end the workers this model started)."""
        if self._closed or self.group.closed:
            self._closed = True
            return
        self._closed = True
        if self._owns_group:
            self.group.close()
        else:
            self.group.run(trace_worker.release_shard, self.key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        weights = "inlined" if self.inline_weights_to_neff else "separated"
        return f"TensorParallelModel(tp_degree={self.tp_degree}, buckets={self.bucket_shapes}, weights {weights})"


def _describe(metas: list[dict]) -> str:
    return "[" + ", ".join(f"{m['dtype']}{m['shape']}" for m in metas) + "]"


def _load_treespec(text: str) -> pytree.TreeSpec:
    """The output's structure. Its classes register themselves with pytree when their module is
    imported (transformers' ModelOutputs): import the modules the structure names, then read it."""
    try:
        return pytree.treespec_loads(text)
    except NotImplementedError:
        pass
    names, pending = set(), [json.loads(text)[1]]
    while pending:
        node = pending.pop()
        if node.get("type"):
            names.add(node["type"].rpartition(".")[0])
        pending.extend(node.get("children_spec", []))
    for module in sorted(names):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise TracedModelError(f"the traced model returns a class from {module}, which cannot be imported here: {exc}") from None
    return pytree.treespec_loads(text)


def _input_set(inputs, what: str) -> tuple:
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"{what} must be a tensor or a tuple of tensors, got {[type(t).__name__ for t in inputs]}")
    return inputs


def _example_sets(example_inputs, bucketed: bool) -> list[tuple]:
    if not bucketed:
        return [_input_set(example_inputs, "example_inputs")]
    if isinstance(example_inputs, torch.Tensor) or not example_inputs:
        raise TypeError("with bucket_config, example_inputs is a list with one input set per bucket: [inputs_128, inputs_512]")
    return [_input_set(inputs, f"example_inputs[{i}]") for i, inputs in enumerate(example_inputs)]


def _worker_group(tp_degree: int, workers: Group | None) -> tuple[Group, bool]:
    if workers is None:
        return WorkerGroup(tp_degree), True
    if workers.closed:
        raise RuntimeError("the WorkerGroup passed as workers= is closed; start a new one")
    if workers.world_size != tp_degree or workers.tp != tp_degree:
        raise ValueError(
            f"workers= has {workers.world_size} processes in TP groups of {workers.tp}, but tp_degree is {tp_degree}: "
            f"pass a WorkerGroup({tp_degree})"
        )
    return workers, False


def _check_kernel(config: BucketModelConfig, example_sets: list[tuple]) -> None:
    """Each example input set must be its own bucket's: the kernel sends it to its index, unpadded."""
    for index, inputs in enumerate(example_sets):
        padded, chosen = config.select(list(inputs))
        same = [tensor_meta(t) for t in padded] == [tensor_meta(t) for t in inputs]
        if chosen != index or not same:
            raise ValueError(
                f"the bucket kernel sends example_inputs[{index}] ({_describe([tensor_meta(t) for t in inputs])}) to bucket "
                f"{chosen} as {_describe([tensor_meta(t) for t in padded])}: list the example inputs in bucket order, "
                "each of its bucket's full shape"
            )


def parallel_model_trace(
    func,
    example_inputs,
    tp_degree: int = 1,
    inline_weights_to_neff: bool = True,
    bucket_config: BucketModelConfig | None = None,
    compiled: bool = True,
    workers: Group | None = None,
    compiler_workdir=None,
    compiler_args=None,
    max_parallel_compilations=None,
) -> TensorParallelModel:
    """Trace the model func() builds in each of tp_degree workers; return its front end.

    example_inputs: a tensor or tuple of tensors; with bucket_config, a list of
    them, one per bucket in the kernel's bucket order. workers: a running Group
    of tp_degree ranks to use (a WorkerGroup(tp_degree), or start_workers' group
    under torchrun; it stays open); by default the model starts its own
    WorkerGroup and closes it with close(). compiler_workdir, compiler_args and
    max_parallel_compilations are NxD's options for the Neuron compiler, accepted so that NxD's
    scripts run; there is no Neuron compiler here, so they change nothing.
    """
    del compiler_workdir, compiler_args, max_parallel_compilations
    if bucket_config is not None and inline_weights_to_neff:
        raise ValueError("bucket_config needs weights kept apart from the graphs: pass inline_weights_to_neff=False")
    example_sets = _example_sets(example_inputs, bucket_config is not None)
    if bucket_config is not None:
        _check_kernel(bucket_config, example_sets)
    group, owns_group = _worker_group(tp_degree, workers)
    key = uuid.uuid4().hex
    try:
        infos = group.run(trace_worker.trace_shard, key, func, example_sets, inline_weights_to_neff, compiled)
        if not inline_weights_to_neff and any(info["graph_hashes"] != infos[0]["graph_hashes"] for info in infos):
            raise ValueError(
                "the ranks traced different graphs, so one graph cannot serve every rank: the model's forward uses a "
                "rank-dependent Python value (keep such values in buffers: docs/design.md, rule 4), or trace with "
                "inline_weights_to_neff=True"
            )
    except BaseException:
        if owns_group:
            group.close()
        else:
            group.run(trace_worker.release_shard, key)
        raise
    meta = {
        "tp_degree": tp_degree,
        "inline_weights_to_neff": inline_weights_to_neff,
        "group_name": infos[0]["group_name"],
        "buckets": [
            {"inputs": [tensor_meta(t) for t in inputs], "output": spec} for inputs, spec in zip(example_sets, infos[0]["out_specs"])
        ],
        "bucket_kernel": bucket_config.to_json() if bucket_config else None,
        "bucket_kernel_name": bucket_config.kernel_name if bucket_config else None,
        "weights": infos[0]["weights"],
        "state": infos[0]["state"],
    }
    return TensorParallelModel(group, key, meta, bucket_config, owns_group)


def parallel_model_save(model: TensorParallelModel, path) -> None:
    """Write the traced model to the folder `path` (see nxd_core/trace_format.py); each worker writes its files."""
    model._check_open()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # An older model in the folder stops being loadable now; the new one becomes loadable when its manifest lands.
    (folder / MANIFEST).unlink(missing_ok=True)
    state = list(model.meta["state"])
    replicated = [] if model.inline_weights_to_neff else _replicated_weights(model, state)
    model.group.run(trace_worker.save_shard, model.key, str(folder.resolve()), state, replicated)
    shared, per_rank = files_of(model.tp_degree, len(model.meta["buckets"]), model.inline_weights_to_neff)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        **model.meta,
        "files": {"shared": shared, "ranks": per_rank},
        "torch_version": torch.__version__,
    }
    write_manifest(folder, manifest)


def _replicated_weights(model: TensorParallelModel, state: list[str]) -> list[str]:
    """The unsharded weights that are equal on every rank (checked, not assumed): stored once."""
    weights = model.meta["weights"]
    names = [n for n in weights["order"] if n not in state and n not in weights["sharding"]]
    digests = model.group.run(trace_worker.unsharded_digests, model.key, names)
    return [n for n in names if all(d[n] == digests[0][n] for d in digests)]


def parallel_model_load(
    path,
    tp_degree: int | None = None,
    compiled: bool = True,
    workers: Group | None = None,
    bucket_config: BucketModelConfig | None = None,
) -> TensorParallelModel:
    """Load a folder parallel_model_save wrote into tp_degree workers (the saved tp; tp_degree, if
    given, must equal it). A model traced with a custom bucket kernel needs its bucket_config again
    (code is not stored in the folder)."""
    folder = Path(path)
    manifest = read_manifest(folder, tp_degree)
    if bucket_config is None and manifest["bucket_kernel"] is not None:
        bucket_config = BucketModelConfig.from_json(manifest["bucket_kernel"])
    if bucket_config is None and manifest["bucket_kernel_name"] is not None:
        raise TracedModelError(
            f"{folder} was traced with the custom bucket kernel {manifest['bucket_kernel_name']!r}, which is code and is "
            "not saved: pass it again, parallel_model_load(path, bucket_config=BucketModelConfig(...))"
        )
    group, owns_group = _worker_group(manifest["tp_degree"], workers)
    key = uuid.uuid4().hex
    try:
        group.run(trace_worker.load_shard, key, str(folder.resolve()), manifest, compiled)
    except BaseException:
        if owns_group:
            group.close()
        elif not group.closed:
            group.run(trace_worker.release_shard, key)
        raise
    meta = {k: v for k, v in manifest.items() if k not in ("format", "version", "files", "torch_version")}
    return TensorParallelModel(group, key, meta, bucket_config, owns_group)
