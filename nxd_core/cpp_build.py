"""Building nxd-zoo's C++ operators (bf16_linear.cpp, shm_collectives.cpp) on the machine that runs them.

torch's C++ extension loader compiles a source once per machine (its cache) and loads it into the
process. CPU features are read at run time, never assumed: the same wheel runs on AVX2-only,
AVX-512 and AMX hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import warnings
from pathlib import Path


def cpu_flags() -> set[str]:
    """The feature flags of this machine's CPU (/proc/cpuinfo); empty where they cannot be read."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def build_and_load(name: str, source: Path, cflags: list[str], ldflags: list[str], fallback: str) -> bool:
    """Compile (or take from the cache) and load `source` as the extension `name`; False, with one
    warning naming `fallback` (what runs instead), where it cannot be built."""
    from torch.utils.cpp_extension import load

    # ninja comes with the package's dependencies, next to this interpreter, which may not be on PATH.
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    # torch's loader rebuilds when a listed source or a flag changes, not a header: the headers beside
    # the source (cpu_common.h) go into the flags as a digest
    headers = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))).hexdigest()[:16]
    cflags = [*cflags, f"-DNXD_HEADERS_DIGEST={headers}"]
    try:
        with _build_lock(name):
            load(name=name, sources=[str(source)], is_python_module=False, extra_cflags=cflags, extra_ldflags=ldflags, verbose=False)
    except Exception as error:  # no compiler, no ninja: the fallback still works
        warnings.warn(f"nxd-zoo's {source.name} could not be built ({error}); {fallback}", stacklevel=3)
        return False
    return True


@contextlib.contextmanager
def _build_lock(name: str):
    """One build of `name` at a time on this machine, by a lock the kernel drops when its holder
    dies. torch's own lock is a file that a killed build leaves behind, and every later load would
    wait on it for ever: while we hold ours, no build of ours is running, so such a file is stale."""
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory(name, verbose=False))
    with open(build_dir.parent / f"{name}.build-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        yield
