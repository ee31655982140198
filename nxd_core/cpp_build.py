"""Building nxd-zoo's C++ operators (bf16_linear.cpp, shm_collectives.cpp) on the machine that runs them.

torch's C++ extension loader compiles a source once per machine (its cache) and loads it into the
process. CPU features are read at run time, never assumed: the same wheel runs on AVX2-only,
AVX-512 and AMX hosts.
"""

from __future__ import annotations

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
    try:
        load(name=name, sources=[str(source)], is_python_module=False, extra_cflags=cflags, extra_ldflags=ldflags, verbose=False)
    except Exception as error:  # no compiler, no ninja: the fallback still works
        warnings.warn(f"nxd-zoo's {source.name} could not be built ({error}); {fallback}", stacklevel=3)
        return False
    return True
