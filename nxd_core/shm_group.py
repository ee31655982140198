"""Give a process group a shared-memory segment for its collectives (shm_ops.py), when it can have one.

Called once per TP group by parallel_state.initialize_model_parallel, collectively over the group's
ranks. A group qualifies when every rank runs on this host (hostname and boot id, exchanged through
the group), on CPU (a gloo group), and every rank could build the kernels and open the segment.
Otherwise it keeps its backend's collectives, and every rank agrees on that.

The segment's name is unique per group (rank 0's pid and a random token), and it is unlinked as
soon as every rank has mapped it: a process killed later leaves nothing in /dev/shm, and the memory
goes away with the last process that maps it.

Waits: a rank waiting for a peer checks every 0.1 s that the peer's process is alive (a killed peer
is reported within a second, and the other ranks are told to stop), and gives up after `timeout`
seconds: the group's timeout if it has one (WorkerGroup's collective_timeout), else DEFAULT_TIMEOUT.
"""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from . import shm_ops

DEFAULT_TIMEOUT = 30.0  # seconds a live peer may take to join a collective when the group has no timeout
# Per rank and step parity; larger tensors are sent in chunks of this size.
BUFFER_BYTES = 1 << 20
SEGMENT_PREFIX = "/nxd-tp-"
_SEGMENTS: dict[str, str] = {}  # group name -> its segment's (already unlinked) name, for diagnostics


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _visible(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def attach(group, timeout: timedelta | None = None) -> bool:
    """Map a shared-memory segment for `group` in every rank of it; True on every rank, or False on every rank."""
    if dist.get_backend(group) != "gloo":
        return False  # nccl and others: the device's own collectives
    ranks = dist.get_world_size(group)
    rank = dist.get_rank(group)
    built = shm_ops.load()
    mine = (socket.gethostname(), _boot_id(), os.getpid(), built)
    everyone = [None] * ranks
    dist.all_gather_object(everyone, mine, group=group)
    same_host = all(entry[:2] == mine[:2] for entry in everyone)
    if not (same_host and all(entry[3] for entry in everyone)):
        return False
    pids = [entry[2] for entry in everyone]
    if not all(_visible(pid) for pid in pids):
        pids = []  # another pid namespace: peers are found dead by the timeout only
    seconds = timeout.total_seconds() if timeout is not None else DEFAULT_TIMEOUT
    name = group.group_name

    segment = [None]
    error = None
    if rank == 0:
        segment[0] = f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            torch.ops.nxd_shm.attach(name, segment[0], True, 0, ranks, BUFFER_BYTES, seconds, pids)
        except RuntimeError as exc:
            error, segment[0] = exc, None
    dist.broadcast_object_list(segment, src=dist.get_global_rank(group, 0), group=group)
    if segment[0] is not None and rank != 0:
        try:
            torch.ops.nxd_shm.attach(name, segment[0], False, rank, ranks, BUFFER_BYTES, seconds, pids)
        except RuntimeError as exc:
            error = exc
    outcomes = [None] * ranks
    dist.all_gather_object(outcomes, None if error is None else str(error), group=group)
    if rank == 0 and segment[0] is not None:
        torch.ops.nxd_shm.unlink(segment[0])  # every rank has mapped it (or given up): nothing stays in /dev/shm
    failures = [o for o in outcomes if o is not None]
    if segment[0] is None or failures:
        torch.ops.nxd_shm.detach(name)
        if rank == 0:
            reason = failures[0] if failures else "rank 0 could not create the segment"
            warnings.warn(f"shared-memory collectives unavailable for this tensor parallel group ({reason}); using gloo", stacklevel=3)
        return False
    _SEGMENTS[name] = segment[0]
    return True


def segment_name(group_name: str) -> str | None:
    """The name the group's segment had in /dev/shm (unlinked since every rank mapped it)."""
    return _SEGMENTS.get(group_name)


def detach(group_name: str) -> None:
    """Unmap the group's segment in this process (its memory is freed when the last rank unmaps)."""
    _SEGMENTS.pop(group_name, None)
    if shm_ops.load():
        torch.ops.nxd_shm.detach(group_name)
