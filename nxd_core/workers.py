"""A persistent group of tensor parallel worker processes, driven from one front end.

Driver mode: `WorkerGroup(n)` starts n processes on this machine that form
one process group (gloo on CPU, nccl on CUDA) with tensor parallel size n.
The front end ships callables to them (cloudpickle, so functions defined in
a notebook or a script work too) and gets each rank's result back:

    with WorkerGroup(2) as group:
        results = group.run(fn, *args)        # [rank 0 result, rank 1 result]

Workers are fresh interpreters started with `python -c` (not multiprocessing
spawn), so the user's script is never re-imported and needs no
`if __name__ == "__main__"` guard. The front end hosts the rendezvous store
on a port the OS picks. Per-process state (a model, a KV cache) lives in
`worker_state()` between calls.

An exception in a worker is re-raised in the front end with the worker's
traceback attached. A worker that dies, or ranks left stuck in a collective
after another rank failed, shut the group down and raise within seconds.

SPMD mode: under torchrun every rank runs the user's script; `start_workers`
then returns a `LocalGroup` with the same `run` API that runs in-process.
"""

from __future__ import annotations

import os
import pickle
import secrets
import subprocess
import sys
import time
import traceback
import weakref
from datetime import timedelta
from multiprocessing.connection import Client, Connection, Listener, wait

import cloudpickle
import torch
import torch.distributed as dist

from . import parallel_state as ps

_HOST = "127.0.0.1"
_SHUTDOWN = "__nxd_shutdown__"


class WorkerError(RuntimeError):
    """A worker raised an exception that could not be rebuilt in the front end."""


class WorkerDied(RuntimeError):
    """A worker process exited while the front end was waiting on it."""


_STATE: dict = {}


def worker_state() -> dict:
    """A dict that persists across calls inside one worker process (models, caches)."""
    return _STATE


def return_freed_memory() -> None:
    """Give memory freed by Python back to the OS (glibc keeps freed heap memory otherwise).

    Call after dropping a model in a long-lived worker: without it, the next model
    loaded there would count on top of the last one's leftovers.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -- the front end ------------------------------------------------------------------


class WorkerGroup:
    """`world_size` worker processes forming one process group; TP groups of size `tp`."""

    def __init__(
        self,
        world_size: int,
        tp: int | None = None,
        device: str = "cpu",
        backend: str | None = None,
        threads_per_worker: int | None = None,
        start_timeout: float = 120.0,
        collective_timeout: float = 600.0,
        error_grace: float = 10.0,
        collectives: str = "auto",
    ):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        tp = world_size if tp is None else tp
        ps.divide(world_size, tp, "world size")
        self.world_size, self.tp, self.device = world_size, tp, device
        self.backend = backend or ("nccl" if device == "cuda" else "gloo")
        self.error_grace = error_grace
        self._closed = False
        threads = threads_per_worker or max(1, _cpu_count() // world_size)

        # The front end hosts the store: the OS picks its port, so nothing can race for it.
        self._store = dist.TCPStore(_HOST, 0, is_master=True, wait_for_workers=False)
        authkey = secrets.token_bytes(32)
        self._listener = Listener((_HOST, 0), authkey=authkey)
        listen_port = self._listener.address[1]
        self._procs: list[subprocess.Popen] = []
        for rank in range(world_size):
            config = dict(
                rank=rank, world_size=world_size, tp=tp, device=device, backend=self.backend,
                threads=threads, listen=(_HOST, listen_port), store=(_HOST, self._store.port),
                collective_timeout=collective_timeout, collectives=collectives, sys_path=list(sys.path),
            )
            proc = subprocess.Popen(
                [sys.executable, "-c", "from nxd_core.workers import _worker_main; _worker_main()"],
                stdin=subprocess.PIPE,
            )
            # The secret and config travel on stdin, never on the command line.
            proc.stdin.write(pickle.dumps((authkey, config)))
            proc.stdin.close()
            self._procs.append(proc)
        self._finalizer = weakref.finalize(self, _kill, self._procs)
        self._conns: list[Connection | None] = [None] * world_size
        try:
            self._accept_all(start_timeout)
            self._collect(range(world_size), what="start-up")
        except BaseException:
            self._shutdown()
            raise

    def _accept_all(self, timeout: float) -> None:
        import threading

        accepted: list[Connection] = []

        def accept():
            try:
                while len(accepted) < self.world_size:
                    accepted.append(self._listener.accept())
            except OSError:
                pass  # listener closed because start-up failed

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while thread.is_alive():
            thread.join(0.2)
            self._raise_if_dead("start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker processes did not connect within {timeout:.0f}s")
        for conn in accepted:
            rank = pickle.loads(conn.recv_bytes())
            self._conns[rank] = conn
        self._listener.close()

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
        """Run fn(*args_per_rank[r], **kwargs) on rank r; return the results in rank order."""
        if self._closed:
            raise RuntimeError("this WorkerGroup is closed; start a new one")
        if len(args_per_rank) != self.world_size:
            raise ValueError(f"need {self.world_size} argument tuples, got {len(args_per_rank)}")
        for rank, conn in enumerate(self._conns):
            try:
                conn.send_bytes(cloudpickle.dumps((fn, tuple(args_per_rank[rank]), kwargs or {})))
            except OSError:
                self._raise_if_dead(f"sending {_name(fn)}")
                raise
        return self._collect(range(self.world_size), what=_name(fn))

    def _collect(self, ranks, what: str) -> list:
        results: dict[int, object] = {}
        pending = set(ranks)
        first_error: tuple[int, BaseException] | None = None
        error_deadline = None
        while pending:
            by_conn = {self._conns[r]: r for r in pending}
            for conn in wait(list(by_conn), timeout=0.5):
                rank = by_conn[conn]
                try:
                    status, payload = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    try:  # the connection closes a moment before the exit code lands
                        self._procs[rank].wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                    self._raise_if_dead(what)
                    raise
                pending.discard(rank)
                if status == "ok":
                    results[rank] = payload
                elif first_error is None:
                    first_error = (rank, _rebuild_exception(rank, payload))
                    error_deadline = time.monotonic() + self.error_grace
            if pending:
                self._raise_if_dead(what)
            if first_error and pending and time.monotonic() > error_deadline:
                self._shutdown()
                rank, exc = first_error
                exc.add_note(
                    f"ranks {sorted(pending)} did not finish within {self.error_grace:.0f}s after rank {rank} "
                    "failed (likely waiting in a collective); the worker group was shut down."
                )
                raise exc
        if first_error:
            raise first_error[1]
        return [results[r] for r in sorted(results)]

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def close(self, timeout: float = 20.0) -> None:
        """Ask every worker to leave the process group cleanly, then make sure they are gone."""
        if self._closed:
            return
        try:
            if all(p.poll() is None for p in self._procs):
                for conn in self._conns:
                    conn.send_bytes(cloudpickle.dumps(_SHUTDOWN))
                deadline = time.monotonic() + timeout
                for proc in self._procs:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._closed = True
        _kill(self._procs)
        for conn in self._conns:
            if conn is not None:
                conn.close()
        self._listener.close()
        self._finalizer.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running"
        return f"WorkerGroup(world_size={self.world_size}, tp={self.tp}, backend={self.backend}, {state}, pids={self.pids})"


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
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


# -- inside a worker ------------------------------------------------------------


def _exit_when_orphaned(parent: int) -> None:
    """End this worker when the front end dies, so no orphan is left behind.

    A thread polls the parent pid (PR_SET_PDEATHSIG would fire when the thread
    that started us exits, which is wrong for front ends started from a thread).
    """
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="nxd-orphan-watch").start()


def _reply(conn: Connection, status: str, payload) -> None:
    try:
        data = pickle.dumps((status, payload))
    except Exception as exc:  # an unpicklable result becomes an error the user can read
        error = TypeError(f"the result ({type(payload).__name__}) cannot be sent to the front end: {exc}")
        data = pickle.dumps(("error", _error_payload(error)))
    conn.send_bytes(data)


def _error_payload(exc: BaseException) -> dict:
    try:
        exception = pickle.dumps(exc)
        pickle.loads(exception)
    except Exception:
        exception = None
    return {
        "exception": exception,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _worker_main() -> None:
    _exit_when_orphaned(os.getppid())
    authkey, config = pickle.loads(sys.stdin.buffer.read())
    for entry in config["sys_path"]:
        if entry not in sys.path:
            sys.path.append(entry)
    conn = Client(tuple(config["listen"]), authkey=authkey)
    conn.send_bytes(pickle.dumps(config["rank"]))
    try:
        _init_worker(config)
    except BaseException as exc:
        _reply(conn, "error", _error_payload(exc))
        os._exit(1)
    _reply(conn, "ok", os.getpid())

    while True:
        try:
            message = cloudpickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            os._exit(1)  # the front end is gone
        if message == _SHUTDOWN:
            break
        try:
            fn, args, kwargs = message
            result = fn(*args, **kwargs)
        except BaseException as exc:
            _reply(conn, "error", _error_payload(exc))
        else:
            _reply(conn, "ok", result)

    # Processes that used functional collectives can abort in teardown: leave the
    # group cleanly and skip the interpreter's own shutdown (DESIGN.md).
    try:
        _STATE.clear()
        dist.barrier()
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    finally:
        os._exit(0)


def _init_worker(config: dict) -> None:
    torch.set_num_threads(config["threads"])
    rank, world = config["rank"], config["world_size"]
    timeout = timedelta(seconds=config["collective_timeout"])
    host, port = config["store"]
    store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    if config["device"] == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(config["backend"], store=store, rank=rank, world_size=world, timeout=timeout)
    ps.initialize_model_parallel(config["tp"], collectives=config["collectives"], timeout=timeout)


# -- SPMD (torchrun) ----------------------------------------------------------------


class LocalGroup:
    """The same `run` API for SPMD mode: every rank already runs this script, so run in-process."""

    def __init__(self):
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.tp = ps.get_tensor_model_parallel_size()

    def run(self, fn, *args, **kwargs) -> list:
        return [fn(*args, **kwargs)]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def launched_by_torchrun() -> bool:
    # torchrun (like env:// rendezvous in torch itself) hands each rank its identity in the environment.
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def start_workers(tp: int, device: str = "cpu", **kwargs) -> WorkerGroup | LocalGroup:
    """Driver mode: start a WorkerGroup of tp processes. Under torchrun: use its process group."""
    if dist.is_initialized() or launched_by_torchrun():
        if not dist.is_initialized():
            backend = "nccl" if device == "cuda" else "gloo"
            if device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_size() != tp:
            ps.initialize_model_parallel(tp)
        return LocalGroup()
    return WorkerGroup(tp, device=device, **kwargs)
