"""manifest.json, the commit point of both on-disk formats (sharded checkpoints, traced models).

Each format's files are written first; the manifest is written last, through
`write_json_atomically`: a temporary file, fsync'd, renamed over the old
manifest, then the directory fsync'd. A crash at any point leaves the old
manifest or the new one, whole, never a torn one. What a manifest holds, and
how it is checked, is the format's own (checkpoint_format.py, trace_format.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = "manifest.json"


def fsync_dir(path) -> None:
    """Flush a directory's entries (a rename into it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomically(path, obj, tmp=None) -> None:
    """Replace the file `path` with obj as JSON, atomically and durably.

    `tmp` (default: .<name>.tmp beside it) is written and fsync'd, renamed over
    `path`, and the directory fsync'd. A failed write removes `tmp`.
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path, error: type[Exception], fix: str, catch: type[Exception] | tuple = ValueError):
    """The JSON in `path`, or error(...) naming the file, what is wrong and `fix`.

    `catch` says which decoding errors mean a damaged file (ValueError: invalid
    JSON and non-UTF-8 bytes alike).
    """
    try:
        return json.loads(Path(path).read_text())
    except catch as exc:
        raise error(f"{path} is not valid JSON ({exc}): {fix}") from None
