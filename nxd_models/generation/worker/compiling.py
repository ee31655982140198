"""A session in flight switches from eager to compiled steps here, through this machine's compile cache.

The front end decides when (generation/compile_policy.py) and sends the same decision to every
rank with the same step, so all ranks switch together. This side finds the cache entry, swaps the
session's step for the compiled one, times the first compiled step (that is the compilation) and
keeps what it learnt in the entry.

The step is compiled ahead of time (nxd_core.precompile) on its first call, for that call's
arguments: a process that finds the step precompiled for the same fingerprint in the entry loads it
without tracing (milliseconds for an AOTInductor package, about a second for torch's precompile,
against seconds for torch.compile with warm caches); otherwise it loads the entry's mega-cache
artifacts into torch's caches, compiles, and keeps the precompiled step in the entry for the next
process. Where AOTInductor cannot compile the step (torch.export fails on the model, a compiler
error) it tries torch's precompile, then plain torch.compile, warned once each.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from nxd_core import compile_cache, precompile

T = TypeVar("T")

# Keys compiled in this process already: their compiled steps are in memory, nothing to load.
_compiled_here: set[str] = set()
# Steps compiled (or loaded) ahead of time in this process, by (entry, fingerprint): they take the
# model as an argument, so every model of the same key and shapes shares them.
_ahead: dict[tuple[str, str], Callable] = {}
_warned: set[tuple[str, str]] = set()  # (step, what failed) warned about in this process


class AheadOfTime:
    """Compiles a session's step on its first call, through the cache entry (see the module's docstring).
    outcome: None before the first call, then "memory" (this process had it), "precompiled" (loaded
    from the entry) or "compiled" (cold, or warm from the entry's mega-cache artifacts)."""

    def __init__(self, name: str, entry: compile_cache.Entry | None):
        self.name, self.entry = name, entry
        self.outcome: str | None = None
        self.artifacts_loaded = False
        self.load_seconds: float | None = None  # loading the package compiled here (the next process's warm cost)
        self.new: tuple[str, str, bytes] | None = None  # (fingerprint, kind, bytes) compiled here, for the entry

    def step(self, fn: Callable) -> Callable:
        """fn(model, *args) compiled on its first call; fn must be a module-level function of the model."""
        compiled = None

        def call(*args):
            nonlocal compiled
            if compiled is None:
                compiled = self._compile(fn, args)
                if isinstance(compiled, precompile.PackagedStep):
                    compiled.bind(args[0])  # this session's tensors (a package may serve several)
            return compiled(*args)

        return call

    def _compile(self, fn: Callable, args: tuple) -> Callable:
        fingerprint = precompile.fingerprint(args, step=f"{fn.__module__}.{fn.__qualname__}", collectives=_collectives())
        known = _ahead.get((self.name, fingerprint))
        if known is not None:
            self.outcome = "memory"
            return known
        if self.entry is not None:
            found = compile_cache.precompiled(self.entry, fingerprint)
            if found is not None:
                kind, path = found
                try:
                    if kind == "aoti":
                        loaded = precompile.load_package(str(path))
                    else:
                        loaded = precompile.load(path.read_bytes(), self.entry.info.get("vector_isas"))
                except Exception as error:  # torch's young formats: never fail a generation over them
                    compile_cache.precompiled_failed(self.entry, fingerprint, error)
                else:
                    compile_cache.counters["hits"] += 1
                    compile_cache.counters["precompiled"] += 1
                    _ahead[(self.name, fingerprint)] = loaded
                    self.outcome = "precompiled"
                    return loaded
            self.artifacts_loaded = compile_cache.load_artifacts(self.entry)
        self.outcome = "compiled"
        compiled = self._compile_new(fn, args, fingerprint)
        _ahead[(self.name, fingerprint)] = compiled
        return compiled

    def _compile_new(self, fn: Callable, args: tuple, fingerprint: str) -> Callable:
        """AOTInductor, else torch's precompile, else torch.compile; self.new: what the entry keeps."""
        try:
            blob = precompile.compile_package(fn, args)
            with tempfile.TemporaryDirectory() as folder:  # the loader unpacks the package elsewhere
                path = os.path.join(folder, "step.pt2")
                with open(path, "wb") as file:
                    file.write(blob)
                began = time.perf_counter()
                compiled = precompile.load_package(path)
                self.load_seconds = time.perf_counter() - began  # what the next process will pay, about
        except Exception as error:
            _warn_fallback(fn, "compiled by AOTInductor", "trying torch's precompile", error)
        else:
            self.new = (fingerprint, "aoti", blob)
            return compiled
        try:
            compiled = precompile.compile_ahead(fn, args)
        except Exception as error:
            _warn_fallback(fn, "precompiled", "using torch.compile, which traces it again in every new process", error)
            return _plain_compile(fn)
        try:
            self.new = (fingerprint, "dynamo", precompile.save(compiled))
        except Exception as error:
            _warn_fallback(fn, "saved precompiled", "it will be compiled again in the next process", error)
        return compiled


def _plain_compile(fn: Callable) -> Callable:
    from .decoding import RECOMPILE_LIMIT

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, dynamic=False)


def _warn_fallback(fn: Callable, what: str, instead: str, error: Exception) -> None:
    if (fn.__qualname__, what) not in _warned:
        _warned.add((fn.__qualname__, what))
        warnings.warn(f"nxd-zoo: {fn.__qualname__} could not be {what} ({type(error).__name__}: {error}); {instead}", stacklevel=3)


def _collectives() -> dict | None:
    """The TP group a compiled collective names (its name is a constant in the compiled code)."""
    from nxd_core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    if ps.get_tensor_model_parallel_size() == 1 or group is None:
        return None
    return {"group": group.group_name, "shm": ps.tp_shared_memory_group()}


def writes_cache() -> bool:
    """One process per machine writes entries (every rank compiles the same thing): the node's first rank."""
    if os.environ.get("LOCAL_RANK") is not None:
        return os.environ["LOCAL_RANK"] == "0"
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def switch_to_compiled(fields: dict, switch: Callable[[AheadOfTime], None], first_step: Callable[[], T]) -> tuple[T, dict]:
    """switch(ahead) the session to its compiled step (built with ahead.step), then first_step()
    (which compiles or loads it): its result and a report {"compile_seconds", "compile_cpu_seconds"
    (this process's CPU time), "cache": "hit" | "miss" | "process", "precompiled": whether it was loaded
    precompiled}."""
    compile_cache.use_persistent_torch_cache()
    key = compile_cache.full_key(fields)
    name = str(compile_cache.entry_dir(key))
    in_process = name in _compiled_here
    entry = compile_cache.lookup(key)
    ahead = AheadOfTime(name, entry)
    switch(ahead)
    began, cpu_began = time.perf_counter(), time.process_time()
    out = first_step()
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu_began
    if in_process or ahead.outcome == "memory":
        source = "process"
    elif ahead.outcome == "precompiled" or ahead.artifacts_loaded:
        source = "hit"
    else:
        source = "miss"
        compile_cache.counters["misses"] += 1
    if ahead.outcome is not None:
        _compiled_here.add(name)
    if writes_cache() and ahead.outcome is not None:
        if source == "hit":
            compile_cache.record(entry, warm_seconds=seconds, precompiled=ahead.new)
        elif source == "miss":
            timings = {k: v for k, v in (entry.info if entry else {}).items() if k.endswith("step_seconds")}
            isas = precompile.probed_vector_isas()
            learnt = {"vector_isas": isas} if isas else {}
            if ahead.load_seconds is not None:
                learnt["package_load_seconds"] = ahead.load_seconds
            compile_cache.store(key, cold_seconds=seconds, precompiled=ahead.new, **timings, **learnt)
        elif ahead.new is not None and entry is not None:  # this process compiled another fingerprint
            compile_cache.record(entry, precompiled=ahead.new)
    # the CPU time this process spent too: on a shared machine, wall time also counts other jobs
    return out, {
        "compile_seconds": seconds,
        "compile_cpu_seconds": cpu_seconds,
        "cache": source,
        "precompiled": ahead.outcome == "precompiled",
    }


class CachedSteps:
    """What decode_step's `ahead` is for a step compiled from the start through the compile cache
    (speculative rounds): .step(fn) compiles fn on its first call through the entry of `fields`."""

    def __init__(self, fields: dict):
        self.fields = fields

    def step(self, fn: Callable) -> Callable:
        return cached_step(self.fields, fn)


def cached_step(fields: dict, fn: Callable) -> Callable:
    """fn(model, *args) compiled ahead of time through this machine's compile cache (the entry of
    `fields`: a package compiled by an earlier process loads in milliseconds), on the first call of
    each signature (the tensors' shapes and dtypes, the other arguments' values: prompt lookup's
    verification width varies), which the entry learns from as a switch's (switch_to_compiled)."""
    compiled: dict[tuple, Callable] = {}

    def call(*args):
        signature = (id(args[0]), *((a.shape, a.dtype) if isinstance(a, torch.Tensor) else a for a in args[1:]))
        known = compiled.get(signature)
        if known is not None:
            return known(*args)

        def switch(ahead: AheadOfTime) -> None:
            compiled[signature] = ahead.step(fn)

        out, _ = switch_to_compiled(fields, switch, lambda: compiled[signature](*args))
        return out

    return call


def record_step_times(fields: dict, eager_step_seconds: float | None, compiled_step_seconds: float | None) -> None:
    """Keep a session's measured step times (either or both) in its entry, if this machine has one: the
    next decision weighs them instead of a guess."""
    times = {"eager_step_seconds": eager_step_seconds, "compiled_step_seconds": compiled_step_seconds}
    times = {name: seconds for name, seconds in times.items() if seconds}
    if not times or not writes_cache():
        return
    entry = compile_cache.lookup(compile_cache.full_key(fields))
    if entry is None:
        return
    # a write is an fsync: only when a time moved by a tenth or more
    if any(abs(seconds - entry.info.get(name, 0.0)) > 0.1 * seconds for name, seconds in times.items()):
        compile_cache.record(entry, **times)
