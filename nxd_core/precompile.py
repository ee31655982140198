"""A function compiled ahead of time: compiled once, saved as bytes, loaded by a later process without tracing.

torch.compile in a new process re-runs dynamo's bytecode tracing (seconds for a decode step) even
when inductor's caches hold every kernel. Two ways to keep the compiled step, in the order tried:

- "aoti": AOTInductor (`torch.export` + `torch._inductor.aoti_compile_and_package`): the step as a C++
  package; loading it (`aoti_load_package`) opens a shared library and imports no compiler module:
  milliseconds. The model's weights and KV cache are handed to it as user-managed constants.
- "dynamo": torch's precompile (`torch.compile(fn, fullgraph=True).aot_compile(example)`,
  `torch.compiler.load_compiled_function`) keeps dynamo's output, so loading skips tracing; but
  running inductor's Python wrapper imports inductor's modules (about a second of CPU).

EXPERIMENTAL: both APIs are young in torch 2.13 (precompile is marked "experimental, subject to
change"; AOTInductor's package format and `always_keep_tensor_constants` are inductor internals),
and what this module does around them reaches into private parts of torch
(torch._inductor.cpu_vec_isa). Every use is fenced: a failure to compile, save or load ahead of time
is reported to the caller, which falls back to the next way and then to plain torch.compile. The
cache key pins torch's version (compile_cache.full_key), so a torch that changes a format gets new
entries, never old bytes.

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
import os
import tempfile
import warnings
import weakref
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


# -- AOTInductor: the step as a C++ package, loaded without importing the compiler ---------------


class _Step(torch.nn.Module):
    """fn(model, *args) as a module for torch.export: the model's parameters and buffers become the
    package's constants (given back at load, never stored: `PackagedStep`), the tensors are its
    inputs, and every other argument (padding id, sampling parameters) is a constant of the graph."""

    def __init__(self, fn: Callable, model: torch.nn.Module, args: tuple):
        super().__init__()
        self.fn, self.model = fn, model
        self.is_tensor = [isinstance(a, torch.Tensor) for a in args]
        self.constants = [None if t else a for a, t in zip(args, self.is_tensor)]

    def forward(self, *tensors):
        given = iter(tensors)
        return self.fn(self.model, *(next(given) if t else c for t, c in zip(self.is_tensor, self.constants)))


def compile_package(fn: Callable, args: tuple) -> bytes:
    """fn(model, *rest) = fn(*args) exported and compiled by AOTInductor into a package (.pt2 bytes)
    that holds no weights: `load_package` runs it on any model of the same shapes. Raises whatever
    torch raises (a model torch.export cannot trace, a compiler error)."""
    model, rest = args[0], args[1:]
    options = {
        # the weights and the KV cache are the caller's, given at load (user-managed: no copy)
        "aot_inductor.package_constants_in_so": False,
        # and none of their values may end up in the code: inductor inlines buffers of up to 8
        # elements (ParallelEmbedding's vocabulary range: rank 0's range in rank 1's package)
        "always_keep_tensor_constants": True,
    }
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        # torch 2.13 trips its own deprecation (pytree's LeafSpec) while exporting: not the user's to fix
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        tensors = tuple(a for a in rest if isinstance(a, torch.Tensor))
        exported = torch.export.export(_Step(fn, model, rest), tensors, strict=False)
        path = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(folder, "step.pt2"), inductor_configs=options)
        with open(path, "rb") as file:
            return file.read()


class PackagedStep:
    """A package from `compile_package`, called as fn(model, *args) was. The model's tensors are
    handed to the package's runner as its constants (user-managed: the runner reads and writes them
    in place, the KV cache included, and keeps no reference to them) by `bind`: the caller binds at
    each session's first call (the model's tensors may have been re-allocated since), and a call
    with another model than the last bound one binds that one first (one identity check per call)."""

    def __init__(self, path: str):
        from torch.export.pt2_archive._package import AOTICompiledModel

        # torch's loader (the C++ runner: no compiler module imported), without the compatibility
        # check aoti_load_package adds: it probes the CPU's vector ISAs in subprocesses (seconds
        # under load) only to warn on a mismatch, which the cache key (CPU features, torch) rules out.
        # Private names (torch._C._aoti, pt2_archive._package): fenced by the caller's fallback.
        with _unpacked_in_a_folder_of_our_own():
            self.runner = AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1))
        self.names = self.runner.get_constant_fqns()
        self.bound: list[int] | None = None  # the bound tensors' addresses
        self.model = lambda: None  # a weak reference to the bound model: the cache of steps must not keep it alive

    def bind(self, model) -> None:
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        tensors = {f"model.{name}": t for name, t in named}
        chosen = {name: tensors[name] for name in self.names}  # a KeyError: another model than compiled for
        addresses = [t.data_ptr() for t in chosen.values()]
        if addresses != self.bound:
            self.runner.load_constants(chosen, check_full_update=True, user_managed=True)
            self.bound = addresses
        self.model = weakref.ref(model)

    def __call__(self, model, *args):
        if self.model() is not model:
            self.bind(model)
        out = self.runner(*(a for a in args if isinstance(a, torch.Tensor)))
        return tuple(out) if isinstance(out, list) else out


@contextlib.contextmanager
def _unpacked_in_a_folder_of_our_own():
    """torch's loader unpacks the package into $TMPDIR/aotinductor_* and never removes it (2 MB per
    load and rank, until a reboot): point it at a folder removed once the runner has opened its
    library and read its metadata (the loaded library stays mapped; it needs none of the files after)."""
    previous = os.environ.get("TMPDIR")
    with tempfile.TemporaryDirectory(prefix="nxd-aoti-") as folder:
        os.environ["TMPDIR"] = folder
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = previous


def load_package(path: str) -> PackagedStep:
    return PackagedStep(path)
