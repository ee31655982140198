"""torch.compile's work kept on this machine, so that a second process compiles in a fraction of the time.

Two layers:
- torch's own caches (inductor's FX graphs and C++ builds, AOTAutograd, its CPU-feature probes) live
  under our cache directory instead of /tmp (`use_persistent_torch_cache`), so they outlive a reboot.
- One entry per compiled step and key: `entry.json` (the whole key, the artifacts' checksums, how long
  compiling took cold and warm, the step's time eager and compiled), `artifacts-<sha>.bin`, torch's
  "mega-cache" bytes (`torch.compiler.save_cache_artifacts`), and `precompiled-<sha>.pt2` (or `.bin`),
  the step compiled ahead of time by AOTInductor (or torch's precompile: nxd_core.precompile), one
  per fingerprint of the arguments it was compiled for. A process that finds a precompiled step for its fingerprint loads it and skips
  tracing (a fraction of a second); else it loads the mega-cache bytes into torch's caches before
  compiling, so inductor and AOTAutograd hit (seconds: dynamo still traces).

The key is what the caller says matters (model config, dtype, tp, batch size, max_seq_len, the
step) plus what this module adds: torch's version and the CPU's features. An entry whose JSON does
not parse, whose key is another's (a hash collision, an edited file) or whose bytes fail their
checksum (or that torch cannot load) is ignored with a warning, never used.

Where: $NXD_CACHE_DIR, else $XDG_CACHE_HOME/nxd-zoo, else ~/.cache/nxd-zoo. The C++ kernels
(bf16_linear.cpp and the others) are cached separately, by torch's extension builder.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .cpp_build import cpu_flags
from .manifest_io import write_json_atomically

ENTRY = "entry.json"
FORMAT = 1

# CPU features inductor's code depends on (what it vectorises with); the rest of /proc/cpuinfo's
# flags (microcode quirks, virtualisation) would only split the cache between identical machines.
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16")

# What this process did with entries (tests and `nxd generate` read it): a hit used an entry (its
# precompiled step or its artifacts), precompiled counts the hits that loaded a precompiled step, a
# miss found none, stored wrote one, ignored skipped a damaged or foreign one (or one of its files).
counters = {"hits": 0, "misses": 0, "stored": 0, "ignored": 0, "precompiled": 0}
# At most this many precompiled steps per entry (one per fingerprint: eos ids, padding, sampling
# parameters); the oldest goes.
MAX_PRECOMPILED = 4
# The kinds of precompiled step (nxd_core.precompile) and their files' suffixes.
PRECOMPILED_KINDS = {"aoti": "pt2", "dynamo": "bin"}


def cache_root() -> Path:
    if os.environ.get("NXD_CACHE_DIR"):
        return Path(os.environ["NXD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nxd-zoo"


def use_persistent_torch_cache() -> None:
    """Point inductor's cache at ours, unless the user chose another: /tmp, torch's default, is
    emptied at reboot, and a cold inductor cache re-runs its compiler probes (~10 s here). torch
    writes its default into the environment once asked, so that value counts as not chosen."""
    import torch

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not chosen or os.path.abspath(chosen) == _torch_default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / f"torchinductor-{torch.__version__}")


def _torch_default_cache_dir() -> str:
    """torch._inductor.runtime.cache_dir_utils.default_cache_dir(), written out: importing that module
    imports all of inductor and dynamo (2 s), which a worker that never compiles must not pay."""
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}"
    return os.path.abspath(os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user)))


def full_key(fields: dict) -> dict:
    """The caller's fields plus what every compiled artifact depends on: torch, Python, the CPU."""
    import torch

    flags = cpu_flags()
    return {
        **fields,
        "format": FORMAT,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_features": sorted(f for f in _ISA_FLAGS if f in flags),
    }


def entry_dir(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / "compiled" / digest


@dataclass
class Entry:
    key: dict
    path: Path
    info: dict  # cold_seconds, warm_seconds, eager_step_seconds, compiled_step_seconds (any may be absent)

    @property
    def has_artifacts(self) -> bool:
        return "artifacts_sha256" in self.info or bool(self.info.get("precompiled"))


def lookup(key: dict) -> Entry | None:
    """The entry for this (full) key, or None: none yet, or one that cannot be trusted (warned)."""
    path = entry_dir(key)
    try:
        data = json.loads((path / ENTRY).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return _ignore(path, f"its {ENTRY} cannot be read ({error})")
    if not isinstance(data, dict) or not isinstance(data.get("info"), dict):
        return _ignore(path, f"its {ENTRY} is not an nxd-zoo compile entry")
    if data.get("key") != key:
        return _ignore(path, f"it was written for another key ({_difference(data.get('key'), key)})")
    return Entry(key, path, data["info"])


def load_artifacts(entry: Entry) -> bool:
    """Load the entry's compiled artifacts into torch's caches; False (warned) where they fail their checksum."""
    import torch

    if "artifacts_sha256" not in entry.info:
        return False
    name = _artifacts_name(entry.info["artifacts_sha256"])
    try:
        blob = (entry.path / name).read_bytes()
    except OSError as error:
        _ignore(entry.path, f"its {name} cannot be read ({error})")
        return False
    if hashlib.sha256(blob).hexdigest() != entry.info.get("artifacts_sha256"):
        _ignore(entry.path, f"its {name} does not match the checksum in {ENTRY} (truncated or altered)")
        return False
    torch.compiler.load_cache_artifacts(blob)
    counters["hits"] += 1
    return True


def store(key: dict, precompiled: tuple[str, str, bytes] | None = None, **info) -> None:
    """Save what this process has compiled so far (torch's mega-cache) as the key's entry, with info,
    and precompiled = (fingerprint, kind, bytes) of the step compiled ahead of time, if any.
    The files are written first, under their checksum's name, and entry.json last, replaced
    atomically: a reader sees the old entry or the new one, never half of one, even with two writers."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None and precompiled is None:  # nothing was compiled (torch's caches off): nothing to keep
        return
    path = entry_dir(key)
    path.mkdir(parents=True, exist_ok=True)
    info = {**info, "written": time.time()}
    if saved is not None:
        info["artifacts_sha256"] = _write_blob(path, saved[0], _artifacts_name)
    if precompiled is not None:
        _add_precompiled(path, info, *precompiled)
    write_json_atomically(path / ENTRY, {"key": key, "info": info}, tmp=path / f".{ENTRY}.{os.getpid()}.tmp")
    counters["stored"] += 1


def record(entry: Entry, precompiled: tuple[str, str, bytes] | None = None, **info) -> None:
    """Add timings to an existing entry, and a precompiled step (fingerprint, kind, bytes) if given
    (the other files stay as they are)."""
    entry.info.update(info)
    if precompiled is not None:
        _add_precompiled(entry.path, entry.info, *precompiled)
    path = entry.path / ENTRY
    write_json_atomically(path, {"key": entry.key, "info": entry.info}, tmp=entry.path / f".{ENTRY}.{os.getpid()}.tmp")


def precompiled(entry: Entry, fingerprint: str) -> tuple[str, Path] | None:
    """The entry's precompiled step for this fingerprint: (its kind, "aoti" or "dynamo", and its file),
    checked against its checksum; None where there is none, or (warned, counted as ignored) where
    its file is missing or altered."""
    known = (entry.info.get("precompiled") or {}).get(fingerprint)
    if not isinstance(known, dict) or not isinstance(known.get("sha256"), str) or known.get("kind") not in PRECOMPILED_KINDS:
        return None
    path = entry.path / precompiled_name(known["kind"], known["sha256"])
    try:
        blob = path.read_bytes()
    except OSError as error:
        _ignore(entry.path, f"its {path.name} cannot be read ({error})")
        return None
    if hashlib.sha256(blob).hexdigest() != known["sha256"]:
        _ignore(entry.path, f"its {path.name} does not match the checksum in {ENTRY} (truncated or altered)")
        return None
    return known["kind"], path


def precompiled_failed(entry: Entry, fingerprint: str, error: BaseException) -> None:
    """torch could not load the entry's precompiled step (its checksum matched): warn, count it as
    ignored, and forget it in the entry so that the next process compiles it afresh."""
    _ignore(entry.path, f"torch cannot load its precompiled step ({type(error).__name__}: {error})")
    (entry.info.get("precompiled") or {}).pop(fingerprint, None)


def precompiled_name(kind: str, sha: str) -> str:
    return f"precompiled-{sha[:16]}.{PRECOMPILED_KINDS[kind]}"


def _write_blob(path: Path, blob: bytes, name) -> str:
    sha = hashlib.sha256(blob).hexdigest()
    tmp = path / f".blob.{os.getpid()}.tmp"
    tmp.write_bytes(blob)
    os.replace(tmp, path / name(sha))
    return sha


def _add_precompiled(path: Path, info: dict, fingerprint: str, kind: str, blob: bytes) -> None:
    """Write the bytes and name them in info["precompiled"] (fingerprint -> kind and checksum, newest last)."""
    sha = _write_blob(path, blob, lambda sha: precompiled_name(kind, sha))
    known = {k: v for k, v in (info.get("precompiled") or {}).items() if k != fingerprint and isinstance(v, dict)}
    known[fingerprint] = {"kind": kind, "sha256": sha}
    for old in list(known)[: max(0, len(known) - MAX_PRECOMPILED)]:
        gone = known.pop(old)
        if gone["sha256"] not in {v["sha256"] for v in known.values()} and gone.get("kind") in PRECOMPILED_KINDS:
            (path / precompiled_name(gone["kind"], gone["sha256"])).unlink(missing_ok=True)
    info["precompiled"] = known


def entries() -> list[Entry]:
    """Every readable entry on this machine (for estimates); damaged ones are skipped silently here."""
    found = []
    for path in sorted((cache_root() / "compiled").glob(f"*/{ENTRY}")):
        try:
            data = json.loads(path.read_text())
            found.append(Entry(data["key"], path.parent, dict(data["info"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _artifacts_name(sha: str) -> str:
    return f"artifacts-{sha[:16]}.bin"


def _ignore(path: Path, why: str) -> None:
    counters["ignored"] += 1
    warnings.warn(
        f"nxd-zoo ignores the compile cache entry {path}: {why}; compiling afresh (delete the folder to silence this)", stacklevel=3
    )
    return None


def _difference(theirs, ours: dict) -> str:
    if not isinstance(theirs, dict):
        return "no key"
    names = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    return ", ".join(f"{n}: {theirs.get(n)!r} here, {ours.get(n)!r} wanted" for n in names[:3])
