"""nxd_core: the tensor parallel library, under NxD's API names.

Submodules load on first use, so `import nxd_core` costs nothing and NxD's
spellings work as attributes: `nxd_core.trace.parallel_model_trace(...)`,
`nxd_core.parallel_state.initialize_model_parallel(...)`,
`nxd_core.parallel_layers.load(...)`.
"""

import importlib

_SUBMODULES = (
    "bucketing",
    "checkpoint",
    "grads",
    "layers",
    "mappings",
    "parallel_layers",
    "parallel_state",
    "quantization",
    "trace",
    "workers",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # also binds it on the package: asked once
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])
