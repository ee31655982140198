"""A persistent group of tensor parallel worker processes, driven from one front end.

Driver mode: `WorkerGroup(n)` starts n processes on this machine that form
one process group (gloo on CPU, nccl on CUDA) with tensor parallel size n.
The front end ships callables to them (cloudpickle, so functions defined in
a notebook or a script work too) and gets each rank's result back:

    with WorkerGroup(2) as group:
        results = group.run(fn, *args)        # [rank 0 result, rank 1 result]

Workers are fresh interpreters started with `python -c` (not multiprocessing
spawn), so the user's script is never re-imported and needs no
`if __name__ == "__main__"` guard. What runs inside them is worker_process.py;
per-process state (a model, a KV cache) lives in `worker_state()` between calls.

Safety (docs/core.md, "A reply belongs to one request"):
- Every request carries an id that its replies echo; replies of an abandoned
  request are recognised and dropped. Calls from several threads are serialized.
- An interrupted call (KeyboardInterrupt in the front end) waits for its replies
  before it re-raises, so the next call gets its own answer; the workers ignore SIGINT.
- Liveness is judged by heartbeats: a worker that sends none for
  `heartbeat_timeout` seconds while running a request (stopped, wedged) fails the
  call with WorkerDied and the group is shut down; a worker that exits does so at once.
- The control channel is a Unix socket in a private directory that accepts only
  this group's own child processes; the rendezvous store listens on 127.0.0.1 only
  and closes with the group.

An exception in a worker is re-raised in the front end with the worker's
traceback attached. Ranks left stuck in a collective after another rank failed
shut the group down within `error_grace` seconds.

SPMD mode: under torchrun every rank runs the user's script; `start_workers`
then returns a `LocalGroup` with the same interface that runs in-process.
Both are a `Group` (the Protocol below): code that takes a group should take a Group.
"""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

import cloudpickle
import torch.distributed as dist

from . import compile_cache
from . import parallel_state as ps
from .worker_process import BEAT, CALL, SHUTDOWN, STARTUP_REQUEST, StateKey, drop_owned_by, return_freed_memory, worker_state

__all__ = [
    "Group",
    "WorkerGroup",
    "LocalGroup",
    "WorkerDied",
    "WorkerError",
    "start_workers",
    "worker_state",
    "StateKey",
    "drop_owned_by",
    "return_freed_memory",
]

_HOST = "127.0.0.1"
_SMALL_MESSAGE = 64 << 10  # fits a socket's buffer: sent without waiting on the receiver


class WorkerError(RuntimeError):
    """A worker raised an exception that could not be rebuilt in the front end."""


class WorkerDied(RuntimeError):
    """A worker process exited, or stopped answering, while the front end was waiting on it."""


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _loopback_interface() -> str:
    """The loopback interface's name (gloo's own listeners bind to it)."""
    for entry in sorted(Path("/sys/class/net").glob("*")):
        try:
            if int((entry / "flags").read_text(), 16) & 0x8:  # IFF_LOOPBACK
                return entry.name
        except (OSError, ValueError):
            continue
    return "lo"


class _Call:
    """One request in flight: which ranks still owe a reply, and when each was last heard from."""

    def __init__(self, request: int, ranks, what: str):
        now = time.monotonic()
        self.request, self.what = request, what
        self.pending = set(ranks)
        self.results: dict[int, object] = {}
        self.first_error: tuple[int, BaseException] | None = None
        self.error_deadline = None
        self.heard = {rank: now for rank in ranks}


@contextmanager
def _interrupts_deferred():
    """Hold a KeyboardInterrupt until the block ends (in the main thread, where signals land):
    a request half-sent to the ranks would leave the ranks that got it waiting for the others."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


# -- the interface ------------------------------------------------------------------


@runtime_checkable
class Group(Protocol):
    """A tensor parallel group that runs calls on its ranks: WorkerGroup (driver mode) or LocalGroup (torchrun).

    `world_size` processes in TP groups of `tp`. A call returns one result for each
    process it ran in, in rank order, and `pids` names those processes: every worker
    in driver mode; under torchrun, this rank's own process (each rank's script makes
    its own call), so `group.run(os.getpid) == group.pids` either way.
    """

    @property
    def world_size(self) -> int: ...

    @property
    def tp(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    @property
    def pids(self) -> list[int]: ...

    def exited_workers(self) -> list[str]:
        """Which workers have exited, and how (a health check: it changes nothing)."""

    def run(self, fn: Callable, *args, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank; the results in rank order."""
        ...

    def run_per_rank(self, fn: Callable, args_per_rank: list[tuple], kwargs: dict | None = None) -> list:
        """fn(*args_per_rank[r], **kwargs) on rank r (one tuple per rank, world_size of them); the results in rank order."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc) -> None: ...


# -- the front end ------------------------------------------------------------------


class WorkerGroup:
    """`world_size` worker processes forming one process group; TP groups of size `tp`.

    heartbeat_timeout: seconds without a heartbeat from a worker that is running a
    request before the call fails (the worker is stopped or wedged) and the group shuts down.
    collective_timeout: seconds a collective inside a worker waits for its peers before it
    raises there (a live worker stuck waiting on a peer that never comes).
    error_grace: seconds the other ranks get to finish after one rank raised.
    collectives: "auto" (shared memory within one host) or "gloo" to force the process group's.
    preload: modules each worker imports once it has joined the group, before its first call runs
    (those its first calls need), so that the imports overlap with the front end's own work.
    """

    def __init__(
        self,
        world_size: int,
        tp: int | None = None,
        device: str = "cpu",
        backend: str | None = None,
        threads_per_worker: int | None = None,
        start_timeout: float = 120.0,
        collective_timeout: float = 300.0,
        error_grace: float = 10.0,
        collectives: str = "auto",
        heartbeat_timeout: float = 20.0,
        preload: tuple[str, ...] = (),
    ):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if heartbeat_timeout <= 0 or collective_timeout <= 0:
            raise ValueError(f"heartbeat_timeout and collective_timeout must be > 0, got {heartbeat_timeout} and {collective_timeout}")
        tp = world_size if tp is None else tp
        ps.divide(world_size, tp, "world size")
        self.world_size, self.tp, self.device = world_size, tp, device
        self.backend = backend or ("nccl" if device == "cuda" else "gloo")
        self.error_grace, self.heartbeat_timeout = error_grace, heartbeat_timeout
        self._closed = False
        self._lock = threading.Lock()  # one request at a time on the group
        self._requests = itertools.count(STARTUP_REQUEST + 1)
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Connection | None] = [None] * world_size
        self._store = None
        threads = threads_per_worker or max(1, _cpu_count() // world_size)

        # Control: a Unix socket in a directory only this user can enter; connections from any
        # process other than our own workers are refused (the kernel tells us the peer's pid).
        self._socket_dir = tempfile.mkdtemp(prefix="nxd-workers-")
        control = os.path.join(self._socket_dir, "control")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._finalizer = weakref.finalize(self, _cleanup, self._procs, self._listener, self._socket_dir)
        try:
            self._listener.bind(control)
            self._listener.listen(world_size * 2)
            self._store = _loopback_store()
            environment = dict(os.environ)
            environment.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())  # gloo's listeners: loopback only
            for rank in range(world_size):
                config = dict(
                    rank=rank,
                    world_size=world_size,
                    tp=tp,
                    device=device,
                    backend=self.backend,
                    threads=threads,
                    control=control,
                    store=(_HOST, self._store.port),
                    collective_timeout=collective_timeout,
                    collectives=collectives,
                    heartbeat_interval=min(1.0, heartbeat_timeout / 5),
                    sys_path=list(sys.path),
                    preload=tuple(preload),
                )
                proc = subprocess.Popen(
                    [sys.executable, "-c", "from nxd_core.worker_process import main; main()"],
                    stdin=subprocess.PIPE,
                    env=environment,
                    start_new_session=True,  # a terminal's Ctrl-C reaches the front end only
                )
                proc.stdin.write(pickle.dumps(config))  # the config travels on stdin, never on the command line
                proc.stdin.close()
                self._procs.append(proc)
            self._accept_all(start_timeout)
            self._collect(_Call(STARTUP_REQUEST, range(world_size), "start-up"))
        except BaseException:
            self._shutdown()
            raise

    def _accept_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pids = {proc.pid: rank for rank, proc in enumerate(self._procs)}
        self._listener.settimeout(0.2)
        while any(conn is None for conn in self._conns):
            self._raise_if_dead("start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker processes did not connect within {timeout:.0f}s")
            try:
                sock, _ = self._listener.accept()
            except (TimeoutError, BlockingIOError):
                continue
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
            rank = pids.get(pid)
            if rank is None or self._conns[rank] is not None:
                sock.close()  # not one of our workers: refused, start-up goes on
                continue
            sock.settimeout(None)
            conn = Connection(sock.detach())
            if not conn.poll(max(1.0, deadline - time.monotonic())) or pickle.loads(conn.recv_bytes()) != rank:
                conn.close()
                raise RuntimeError(f"worker rank {rank} (pid {pid}) connected but did not identify itself")
            self._conns[rank] = conn
        self._listener.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _raise_if_dead(self, what: str) -> None:
        for rank, proc in enumerate(self._procs):
            code = proc.poll()
            if code is not None:
                self._shutdown()
                raise WorkerDied(
                    f"worker rank {rank} (pid {proc.pid}) exited with code {code} during {what}; "
                    "the worker group was shut down (its stderr above says why). Start a new group."
                )

    def run(self, fn, *args, **kwargs) -> list:
        """Run fn(*args, **kwargs) on every rank; return the results in rank order."""
        return self.run_per_rank(fn, [args] * self.world_size, kwargs)

    def run_per_rank(self, fn, args_per_rank: list[tuple], kwargs: dict | None = None) -> list:
        """Run fn(*args_per_rank[r], **kwargs) on rank r; return the results in rank order.

        Safe to call from several threads (calls run one at a time). A KeyboardInterrupt
        while waiting lets the workers finish this call first, then re-raises, so the
        group stays usable; a second one leaves the late replies to be dropped.
        """
        if len(args_per_rank) != self.world_size:
            raise ValueError(f"need {self.world_size} argument tuples, got {len(args_per_rank)}")
        with self._lock:
            if self._closed:
                raise RuntimeError("this WorkerGroup is closed; start a new one")
            call = _Call(next(self._requests), range(self.world_size), _name(fn))
            # The call itself is pickled inside: a worker reads the request id first and beats while
            # it unpickles the call (which may import modules for seconds on a loaded machine).
            messages = [pickle.dumps((CALL, call.request, cloudpickle.dumps((fn, tuple(args), kwargs or {})))) for args in args_per_rank]
            try:
                with _interrupts_deferred():  # an interrupt held here is raised once every rank has the call
                    self._send_all(messages, call)
                return self._collect(call)
            except KeyboardInterrupt:
                self._drain(call)
                raise

    def _send_all(self, messages: list[bytes], call: _Call) -> None:
        if max(len(m) for m in messages) <= _SMALL_MESSAGE:
            for rank, conn in enumerate(self._conns):
                self._send(rank, conn, messages[rank], call)
            return
        # Large arguments: a sender thread per rank, so a stopped worker cannot block us forever.
        errors: list[BaseException] = []

        def send(rank):
            try:
                self._send(rank, self._conns[rank], messages[rank], call)
            except BaseException as exc:
                errors.append(exc)

        senders = [threading.Thread(target=send, args=(r,), daemon=True) for r in range(self.world_size)]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + self.heartbeat_timeout + len(max(messages, key=len)) / (100 << 20)
        for rank, sender in enumerate(senders):
            while sender.is_alive():
                sender.join(0.2)
                self._raise_if_dead(f"sending {call.what}")
                if time.monotonic() > deadline:
                    self._shutdown()
                    raise WorkerDied(
                        f"worker rank {rank} (pid {self._procs[rank].pid}) did not take the arguments of {call.what}; the group was shut down"
                    )
        if errors:
            raise errors[0]

    def _send(self, rank: int, conn: Connection, data: bytes, call: _Call) -> None:
        try:
            conn.send_bytes(data)
        except OSError:
            self._raise_if_dead(f"sending {call.what}")
            raise

    def _drain(self, call: _Call) -> None:
        """Wait for an interrupted call's replies (and drop them): the workers finish it first."""
        try:
            self._collect(call)
        except KeyboardInterrupt:
            pass  # interrupted again: later calls drop this call's replies by their id
        except WorkerDied:
            raise
        except Exception:
            pass  # the call's own error: the interrupt is what the caller asked for

    def _collect(self, call: _Call) -> list:
        last_look = time.monotonic()
        while call.pending:
            by_conn = {self._conns[r]: r for r in call.pending}
            ready = wait(list(by_conn), timeout=0.25)  # an interrupt lands here, or after the block below
            # A reply read but not yet recorded would be lost (the call would wait for it until the
            # heartbeat limit), and a message half read would desynchronise the connection.
            with _interrupts_deferred():
                for conn in ready:
                    self._receive(by_conn[conn], conn, call)
            if not call.pending:
                break
            self._raise_if_dead(call.what)
            now = time.monotonic()
            if now - last_look > 2.0:  # this process itself was suspended: it heard nothing, the workers are not to blame
                for rank in call.heard:
                    call.heard[rank] += now - last_look
            last_look = now
            self._raise_if_silent(call, now)
            if call.first_error and now > call.error_deadline:
                self._shutdown()
                rank, exc = call.first_error
                exc.add_note(
                    f"ranks {sorted(call.pending)} did not finish within {self.error_grace:.0f}s after rank {rank} "
                    "failed (likely waiting in a collective); the worker group was shut down."
                )
                raise exc
        if call.first_error:
            raise call.first_error[1]
        return [call.results[r] for r in sorted(call.results)]

    def _receive(self, rank: int, conn: Connection, call: _Call) -> None:
        """Read one message from a rank and record it in the call."""
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            try:  # the connection closes a moment before the exit code lands
                self._procs[rank].wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._raise_if_dead(call.what)
            raise
        call.heard[rank] = time.monotonic()
        if message[0] == BEAT or message[1] != call.request:
            return  # a heartbeat, or a late reply of an abandoned call
        _, _, status, payload = message
        call.pending.discard(rank)
        if status == "ok":
            call.results[rank] = payload
        elif call.first_error is None:
            call.first_error = (rank, _rebuild_exception(rank, payload))
            call.error_deadline = time.monotonic() + self.error_grace

    def _raise_if_silent(self, call: _Call, now: float) -> None:
        silent = [r for r in sorted(call.pending) if now - call.heard[r] > self.heartbeat_timeout]
        if not silent:
            return
        rank = silent[0]
        pid = self._procs[rank].pid
        state = _process_state(pid)
        self._shutdown()
        raise WorkerDied(
            f"worker rank {rank} (pid {pid}{', ' + state if state else ''}) sent no heartbeat for "
            f"{self.heartbeat_timeout:.0f}s while running {call.what}: it is stopped or hung. "
            "The worker group was shut down; start a new one (heartbeat_timeout sets the limit)."
        )

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def exited_workers(self) -> list[str]:
        """Which workers have exited, and how (a health check: it changes nothing)."""
        return [
            f"worker rank {rank} (pid {p.pid}) exited with code {p.returncode}"
            for rank, p in enumerate(self._procs)
            if p.poll() is not None
        ]

    def close(self, timeout: float = 20.0) -> None:
        """Ask every worker to leave the process group cleanly, then make sure they are gone."""
        acquired = self._lock.acquire(timeout=timeout)  # a call in another thread finishes first
        try:
            if self._closed:
                return
            if acquired and all(p.poll() is None for p in self._procs):
                for conn in self._conns:
                    conn.send_bytes(pickle.dumps((SHUTDOWN,)))
                deadline = time.monotonic() + timeout
                for proc in self._procs:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            self._shutdown()
            if acquired:
                self._lock.release()

    def _shutdown(self) -> None:
        self._closed = True
        _cleanup(self._procs, self._listener, self._socket_dir)
        for conn in self._conns:
            if conn is not None:
                conn.close()
        self._store = None  # the store's server stops listening when it is dropped
        self._finalizer.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running"
        return f"WorkerGroup(world_size={self.world_size}, tp={self.tp}, backend={self.backend}, {state}, pids={self.pids})"


def _loopback_store() -> dist.TCPStore:
    """The rendezvous store, listening on 127.0.0.1 only (TCPStore's own server binds every
    interface); the OS picks the port, so nothing can race for it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((_HOST, 0))
        listener.listen(128)
    except BaseException:
        listener.close()
        raise
    port = listener.getsockname()[1]
    # The store takes the descriptor over and closes it when it is dropped.
    return dist.TCPStore(_HOST, port, is_master=True, wait_for_workers=False, master_listen_fd=listener.detach())


def _process_state(pid: int) -> str:
    """'stopped' / 'sleeping' / ... as /proc says, for the error message."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return {"T": "stopped", "t": "stopped by a debugger", "D": "in uninterruptible sleep", "Z": "exited"}.get(fields[0], "")


def _cleanup(procs: list[subprocess.Popen], listener: socket.socket, socket_dir: str) -> None:
    listener.close()
    shutil.rmtree(socket_dir, ignore_errors=True)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()  # SIGKILL ends stopped processes too
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _name(fn) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def _rebuild_exception(rank: int, payload: dict) -> BaseException:
    """The worker's exception with its traceback as a note, or a WorkerError if it cannot be rebuilt."""
    note = f"raised on worker rank {rank}; worker traceback:\n{payload['traceback']}"
    try:
        exc = pickle.loads(payload["exception"])
    except Exception:
        exc = WorkerError(f"{payload['type']}: {payload['message']}")
    exc.add_note(note)
    return exc


# -- SPMD (torchrun) ----------------------------------------------------------------


class LocalGroup:
    """A Group for SPMD mode: every rank already runs this script, so calls run in-process, on this rank only."""

    def __init__(self):
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.tp = ps.get_tensor_model_parallel_size()
        self._lock = threading.RLock()  # threads of one rank's script still take turns, as in driver mode
        self._closed = False

    def run(self, fn, *args, **kwargs) -> list:
        return self.run_per_rank(fn, [args], kwargs)

    def run_per_rank(self, fn, args_per_rank: list[tuple], kwargs: dict | None = None) -> list:
        """This rank's own call, with its tuple of args_per_rank: one per rank (world_size, as for a
        WorkerGroup), or this rank's alone (one tuple). Returns [this rank's result]."""
        if len(args_per_rank) == 1:
            args = args_per_rank[0]
        elif len(args_per_rank) == self.world_size:
            args = args_per_rank[dist.get_rank()]
        else:
            raise ValueError(
                f"in SPMD mode each rank runs its own call: need 1 argument tuple (this rank's) or {self.world_size} "
                f"(one per rank), got {len(args_per_rank)}"
            )
        with self._lock:
            if self._closed:
                raise RuntimeError("this LocalGroup is closed")
            return [fn(*args, **(kwargs or {}))]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pids(self) -> list[int]:
        return [os.getpid()]

    def exited_workers(self) -> list[str]:
        return []  # the ranks are torchrun's processes: this one is running

    def close(self) -> None:
        self._closed = True  # the process group belongs to torchrun's script, not to us

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_workers(tp: int, device: str = "cpu", **kwargs) -> Group:
    """Driver mode: start a WorkerGroup of tp processes. Under torchrun: use its process group."""
    if dist.is_initialized() or ps.launched_by_torchrun():
        compile_cache.use_persistent_torch_cache()
        if not dist.is_initialized():
            ps.join_torchrun_world("cuda" if device == "cuda" else "cpu")
        if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_size() != tp:
            ps.initialize_model_parallel(tp, collectives=kwargs.get("collectives", "auto"))
        return LocalGroup()
    return WorkerGroup(tp, device=device, **kwargs)
