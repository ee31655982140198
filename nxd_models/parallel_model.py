"""from_pretrained_parallel and the handle it returns.

Driver mode (a script or a notebook): a WorkerGroup of tp processes holds the
shards; each builds its shard on the meta device and streams only its own
slices from the checkpoint. SPMD mode (torchrun): the same loading runs in
every rank's own process. The family module says which handle fits it
(`HANDLE`: "encoder", "seq2seq"; causal LM by default); for a causal LM the
handle's call returns rank 0's gathered full-vocabulary logits.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

from nxd_core import parallel_state as ps
from nxd_core.checkpoint import MANIFEST, tied_aliases, check_keys, load, load_state_dict_from_full, open_full_checkpoint, read_manifest
from nxd_core.safetensors_stream import check_complete
from nxd_core.workers import WorkerGroup, start_workers, worker_state

from . import hub
from .handles import ParallelEncoderModel, ParallelHandle, ParallelSeq2SeqModel, model_device
from .inputs import check_below, check_mask, matching
from .families import lookup as family_module

_KEYS = itertools.count()


def _check_weights(path: Path) -> None:
    """Fail in the front end, before any process starts, when the weights are not all there."""
    if (path / MANIFEST).exists():
        return
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index} is not a valid weights index ({exc}); download it again") from None
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists weights files that are missing: {missing}; download them again")
    else:
        files = [p.name for p in sorted(path.glob("*.safetensors"))]
    if not files:
        legacy = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pth")]
        hint = f" (found {legacy}: nxd-zoo reads safetensors only; convert them)" if legacy else ""
        raise FileNotFoundError(f"no weights file in {path}: expected model.safetensors or model.safetensors.index.json{hint}")
    for file in files:
        check_complete(path / file)


def _load_shard(key: int, path: str, dtype, max_batch_size: int, max_seq_len: int, device: str, progress: bool, replicated: bool = False):
    """In each rank: build the shard on the meta device, stream in its slices, allocate the KV cache.
    replicated: build and load a whole copy (tp=1) in every rank of the group."""
    progress = progress and ps.get_tensor_model_parallel_rank() == 0
    with ps.replicated() if replicated else contextlib.nullcontext():
        return _build_and_load(key, path, dtype, max_batch_size, max_seq_len, device, progress)


def _build_and_load(key: int, path: str, dtype, max_batch_size: int, max_seq_len: int, device: str, progress: bool):
    config = AutoConfig.from_pretrained(path)
    family = family_module(config.model_type, path)
    model = family.build(config, dtype=dtype, device="meta")
    if (Path(path) / MANIFEST).exists():
        manifest = read_manifest(path)
        prefix = manifest["model_prefix"]
        saved = [name[len(prefix):] for name in manifest["tensors"] if name.startswith(prefix)]
        if hasattr(family, "adapt_checkpoint"):
            family.adapt_checkpoint(dict.fromkeys(saved), model)  # ties the model as the checkpoint was
        # Tied names (T5's embed_tokens, a tied lm_head) are not stored: check the others, then load leniently.
        aliases = tied_aliases(model)
        check_keys([n for n in model.state_dict() if n not in aliases], saved, path)
        load(path, model, sharded=True, strict=False)
    else:
        tensors = open_full_checkpoint(path)
        tensors = {k: v for k, v in tensors.items() if not family.IGNORED_CHECKPOINT_NAMES.search(k)}
        if hasattr(family, "adapt_checkpoint"):  # legacy names, heads the checkpoint has but the model lacks, tying
            tensors = family.adapt_checkpoint(tensors, model)
        if progress:
            tensors = _with_progress(tensors, f"loading {Path(path).name} at tp={ps.get_tensor_model_parallel_size()}")
        load_state_dict_from_full(model, tensors, source=path)
    model.to(device)
    if hasattr(model, "allocate_kv_cache"):  # encoders keep no cache
        model.allocate_kv_cache(max_batch_size, max_seq_len)
    model.eval()
    worker_state()[key] = model
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class _ProgressMapping(dict):
    """A name -> tensor mapping that advances a progress bar as tensors are read."""

    def __init__(self, tensors, bar):
        super().__init__(tensors)
        self._bar = bar

    def __getitem__(self, name):
        value = super().__getitem__(name)
        self._bar.update(1)
        if self._bar.n == self._bar.total:
            self._bar.close()
        return value


def _with_progress(tensors: dict, description: str):
    from tqdm.auto import tqdm

    return _ProgressMapping(tensors, tqdm(total=len(tensors), desc=description, unit="tensor", file=sys.stderr))


def _forward(key: int, input_ids, attention_mask, position_ids, cache_position, every_rank: bool):
    model = worker_state()[key]
    device = model_device(model)
    to_device = lambda t: t.to(device) if t is not None else None  # noqa: E731
    with torch.inference_mode():
        logits = model(
            to_device(input_ids), attention_mask=to_device(attention_mask),
            position_ids=to_device(position_ids), cache_position=to_device(cache_position),
        ).cpu()
    # Every rank holds the same gathered logits; in driver mode one copy crosses back.
    return logits if every_rank or ps.get_tensor_model_parallel_rank() == 0 else None


class ParallelModel(ParallelHandle):
    """A causal LM (Llama): logits, generate and stream."""

    padding_side = "left"  # new tokens follow every row of a batch

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache_position=None) -> torch.Tensor:
        """Full-vocabulary logits [batch, seq, vocab] (see the family's forward for the arguments)."""
        input_ids = self._ids(input_ids)
        batch, seq = input_ids.shape
        if cache_position is not None:
            cache_position = torch.as_tensor(cache_position)
            if cache_position.is_floating_point():
                raise ValueError(f"cache_position must be integer slot indices, got {cache_position.dtype}")
            if tuple(cache_position.shape) not in ((seq,), (batch, seq)):
                raise ValueError(f"cache_position has shape {list(cache_position.shape)}; it needs one slot per token: [{seq}] or [{batch}, {seq}]")
            check_below(cache_position, self.max_seq_len, "cache_position", f"the KV cache's max_seq_len={self.max_seq_len}")
            if batch > self.max_batch_size:
                raise ValueError(f"batch of {batch} exceeds the KV cache's max_batch_size={self.max_batch_size}")
            # The mask covers every slot written so far (prompt and cache), not just these tokens.
            mask = None if attention_mask is None else torch.as_tensor(attention_mask)
            if mask is not None and (mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] > self.max_seq_len):
                raise ValueError(f"attention_mask must be [batch={batch}, slots so far <= {self.max_seq_len}], got shape {list(mask.shape)}")
        else:
            attention_mask = check_mask(attention_mask, input_ids)
            if seq > self.config.max_position_embeddings:
                raise ValueError(f"{seq} tokens exceed this model's max_position_embeddings={self.config.max_position_embeddings}")
        position_ids = matching(position_ids, input_ids, "position_ids")
        with self.exclusive():
            results = self.group.run(_forward, self._key, input_ids, attention_mask, position_ids, cache_position, self.every_rank)
        return results[0]

    # -- generation (nxd_models.generation) --------------------------------------------------

    def generate(self, prompts=None, **kwargs):
        """Text or token generation; see nxd_models.generation.generate.generate for the arguments."""
        from .generation.generate import generate

        return generate(self, prompts, **kwargs)

    def stream(self, prompt, **kwargs):
        """Text pieces for one prompt as they are generated."""
        from .generation.generate import stream

        return stream(self, prompt, **kwargs)


_HANDLES = {"encoder": ParallelEncoderModel, "seq2seq": ParallelSeq2SeqModel}


def _default_dtype(config, path: Path) -> torch.dtype:
    if (path / MANIFEST).exists():
        first = next(iter(read_manifest(path)["tensors"].values()))
        from nxd_core.checkpoint import _DTYPES

        return _DTYPES[first["dtype"]]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def _default_max_seq_len(family, config) -> int:
    """The family's own default (T5 has relative positions: no maximum), else the config's."""
    if hasattr(family, "default_max_seq_len"):
        return family.default_max_seq_len(config)
    return config.max_position_embeddings


def from_pretrained_parallel(
    name_or_path,
    tp: int = 1,
    dtype: torch.dtype | None = None,
    max_batch_size: int = 1,
    max_seq_len: int | None = None,
    device: str = "cpu",
    workers: WorkerGroup | None = None,
    progress: bool = True,
) -> ParallelHandle:
    """Load a zoo model, Hugging Face repo id, local HF directory or `nxd convert` output, sharded over tp.

    In a plain process this starts tp worker processes (or uses `workers`, a
    WorkerGroup of size tp, shared with other models; tp=1 on a larger group
    keeps a whole copy in every worker, as for a speculative draft); under torchrun it uses
    the existing process group. Everything that can be checked is checked here
    first, so bad input fails before a process starts.
    """
    path = hub.resolve(name_or_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}: not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path / 'config.json'} cannot be read as a model config ({exc}); download or write it again") from None
    family = family_module(config.model_type, str(path))
    family.check_tp(config, tp)
    _check_weights(path)
    if (path / MANIFEST).exists():
        saved_tp = read_manifest(path)["tp"]
        if saved_tp != tp:
            raise ValueError(f"{path} was converted for tp={saved_tp}, not tp={tp}: run `nxd reshard {path} OUT --tp {tp}`")
    dtype = dtype or _default_dtype(config, path)
    max_seq_len = max_seq_len or _default_max_seq_len(family, config)
    # tp=1 on a larger group: every worker holds a whole copy (a small speculative draft: no collectives).
    replicated = workers is not None and tp == 1 and workers.tp > 1
    if workers is not None and workers.tp != tp and not replicated:
        raise ValueError(
            f"the worker group runs tp={workers.tp}, but tp={tp} was asked for: use tp={workers.tp} to shard "
            "over it, or tp=1 for a whole copy in every worker"
        )

    owns_group = workers is None
    group = workers if workers is not None else start_workers(tp, device=device)
    key = next(_KEYS)
    try:
        group.run(_load_shard, key, str(path), dtype, max_batch_size, max_seq_len, device, progress, replicated)
    except BaseException:
        if owns_group:
            group.close()
        raise
    handle = _HANDLES.get(getattr(family, "HANDLE", None), ParallelModel)
    return handle(group, key, config, path, tp, dtype, max_batch_size, max_seq_len, owns_group)
