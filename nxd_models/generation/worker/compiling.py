"""A session in flight switches from eager to compiled steps here, through this machine's compile cache.

The front end decides when (generation/compile_policy.py) and sends the same decision to every
rank with the same step, so all ranks switch together. This side finds the cache entry, loads its
artifacts into torch's caches, swaps the session's step for the compiled one, times the first
compiled step (that is the compilation) and keeps what it learnt in the entry.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

from nxd_core import compile_cache

T = TypeVar("T")

# Keys compiled in this process already: their compiled steps are in memory, nothing to load.
_compiled_here: set[str] = set()


def writes_cache() -> bool:
    """One process per machine writes entries (every rank compiles the same thing): the node's first rank."""
    if os.environ.get("LOCAL_RANK") is not None:
        return os.environ["LOCAL_RANK"] == "0"
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def switch_to_compiled(fields: dict, switch: Callable[[], None], first_step: Callable[[], T]) -> tuple[T, dict]:
    """switch() the session to its compiled step, then first_step() (which compiles it): its result
    and a report {"compile_seconds", "cache": "hit" | "miss" | "process"}."""
    compile_cache.use_persistent_torch_cache()
    key = compile_cache.full_key(fields)
    name = str(compile_cache.entry_dir(key))
    entry = None
    if name in _compiled_here:
        source = "process"
    else:
        entry = compile_cache.lookup(key)
        source = "hit" if entry is not None and entry.has_artifacts and compile_cache.load_artifacts(entry) else "miss"
        if source == "miss":
            compile_cache.counters["misses"] += 1
    switch()
    began = time.perf_counter()
    out = first_step()
    seconds = time.perf_counter() - began
    _compiled_here.add(name)
    if writes_cache():
        if source == "hit":
            compile_cache.record(entry, warm_seconds=seconds)
        elif source == "miss":
            timings = {k: v for k, v in (entry.info if entry else {}).items() if k.endswith("step_seconds")}
            compile_cache.store(key, cold_seconds=seconds, **timings)
    return out, {"compile_seconds": seconds, "cache": source}


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
