"""A function compiled ahead of time: traced once, saved as bytes, loaded by a later process without tracing.

torch.compile in a new process re-runs dynamo's bytecode tracing (seconds for a decode step) even
when inductor's caches hold every kernel. torch's precompile (`torch.compile(fn, fullgraph=True)
.aot_compile(example)`, `save_compiled_function`, `torch.compiler.load_compiled_function`) keeps
dynamo's output too, so loading skips tracing and goes straight to inductor's compiled code.

EXPERIMENTAL: that API is marked experimental in torch 2.13 ("subject to change"), and what this module
does around it reaches into private parts of torch (torch._inductor.cpu_vec_isa). Every use is
fenced: a failure to compile, save or load ahead of time is reported to the caller, which falls back
to plain torch.compile. The cache key pins torch's version (compile_cache.full_key), so a torch
that changes the format gets new entries, never old bytes.

What the artifact holds and what it does not:
- `fn` takes the model as an argument (a module-level function, not a bound method or a partial):
  the compiled code reads the weights and the KV cache from the model it is given on every call,
  so no parameter or buffer is baked in: a checkpoint, a rank or a new process passes its own.
- Only shapes, dtypes and the Python values the trace specialised on (sampling parameters, the
  padding id, the process group's name in a collective) are in it. dynamo's guards, which would
  check them on every call, are dropped when saving (loading ~300 guards over the model's
  modules costs half a second), so the caller must check what they would have: `fingerprint`.
- The C++ kernels stay in inductor's cache (compile_cache.use_persistent_torch_cache); an artifact
  whose kernels were deleted still loads, rebuilding them from the source it carries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import torch


def fingerprint(args: tuple, **extra) -> str:
    """What a compiled call specialised on, as a digest: each tensor's shape, strides, offset, dtype and device,
    the same of each module's parameters and buffers, every other value as itself, plus `extra`
    (grad mode, the process group...). Two calls with the same fingerprint run the same graph."""
    described = [_describe(a) for a in args]
    described.append({"grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(), **extra})
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode()).hexdigest()[:24]


def _describe(value: Any):
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), list(value.stride()), value.storage_offset(), str(value.dtype), str(value.device)]
    if isinstance(value, torch.nn.Module):
        tensors = [*value.named_parameters(), *value.named_buffers()]
        return ["module", type(value).__qualname__, [[n, *_describe(t)[1:]] for n, t in tensors]]
    if dataclasses.is_dataclass(value):
        return ["dataclass", type(value).__qualname__, repr(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return ["object", type(value).__qualname__, repr(value)]


def compile_ahead(fn: Callable, args: tuple) -> Callable:
    """fn compiled for exactly these arguments' shapes and values (fullgraph: a graph break raises),
    without dynamo's guards; `save` turns it into bytes. Raises whatever torch raises."""
    options = {"guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, options=options).aot_compile((args, {}))
    compiled.disable_guard_check()
    return compiled


def save(compiled) -> bytes:
    """The compiled function's bytes (dynamo's bytecode and inductor's bundled output)."""
    return type(compiled).serialize(compiled).serialized_data


def load(blob: bytes, probed_isas: list[str] | None = None) -> Callable:
    """A function saved by `save`, ready to call with the same kind of arguments. Raises on bytes
    torch cannot read (another torch, a truncated file). probed_isas: `probed_vector_isas()` as an
    earlier compile on this machine recorded it (see `_trusted_cpu_probes`)."""
    with _trusted_cpu_probes(probed_isas):
        compiled = torch.compiler.load_compiled_function(io.BytesIO(blob))
    compiled.disable_guard_check()
    return compiled


# -- inductor's CPU probes -------------------------------------------------------------------


def probed_vector_isas() -> list[str] | None:
    """The vector instruction sets inductor found usable here, once it has probed (after a compile)."""
    try:
        from torch._inductor import cpu_vec_isa

        return [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]
    except Exception:  # private API: not worth failing a generation over
        return None


@contextlib.contextmanager
def _trusted_cpu_probes(recorded: list[str] | None):
    """Loading compiled kernels makes inductor probe each vector ISA the CPU's flags allow, by
    building and loading a test library in a subprocess (~1 s, more under load). Where this
    machine's earlier compile found every candidate usable (`recorded`; the cache key pins the CPU
    features and torch), the probes are skipped: inductor then picks the same ISA and finds the same
    kernels. Otherwise (a candidate failed, nothing recorded, torch's internals moved) they run."""
    patch = contextlib.nullcontext()
    try:
        if recorded and recorded == _candidate_isas():
            import torch._inductor.config as inductor_config

            patch = inductor_config.patch({"cpp.vec_isa_ok": True})
    except Exception:  # private API: the probes then run as usual
        pass
    with patch:
        yield


def _candidate_isas() -> list[str]:
    """The ISAs inductor would probe on this CPU (its own filter, without the probes)."""
    from torch._inductor import cpu_vec_isa

    flags = cpu_vec_isa.x86_isa_checker()
    return [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
