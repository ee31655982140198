"""nxd_models: ready-made tensor parallel models that load Hugging Face checkpoints.

The names below load on first use, so that `nxd` can start its workers before this process has
imported transformers and the models (start-up: docs/startup.md).
"""

import importlib

__all__ = ["ParallelModel", "from_pretrained_parallel", "list_models"]

_HOMES = {"ParallelModel": ".handles", "from_pretrained_parallel": ".loading", "list_models": ".registry"}

# What a worker imports as it starts, in a thread (nxd_core.workers.WorkerGroup's preload): the
# modules every model's first calls need (loading a shard, then generating).
WORKER_MODULES = ("nxd_models.worker_ops", "nxd_models.generation.worker.decoding")


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nxd_models' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_HOMES])
