"""What runs inside a worker process of a WorkerGroup (the front end is workers.py).

The protocol on the control connection (a Unix socket to the front end):
  front end -> worker:  (CALL, request_id, cloudpickle of (fn, args, kwargs))   pickle
                        (SHUTDOWN,)
  worker -> front end:  (REPLY, request_id, "ok" | "error", payload)   pickle
                        (BEAT, request_id)   every `heartbeat_interval` s while a request runs
Every reply echoes its request's id, so the front end never takes a reply for
another request. Heartbeats come from a thread, so they keep coming while the
main thread computes or waits in a collective, and stop when the process is
stopped, killed or wedged: the front end judges liveness by them.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Client, Connection

import cloudpickle
import torch
import torch.distributed as dist

from . import compile_cache
from . import parallel_state as ps

CALL, SHUTDOWN, REPLY, BEAT = "call", "shutdown", "reply", "beat"
STARTUP_REQUEST = 0  # the id of the start-up "request" (the first reply is the worker's pid)

_STATE: dict = {}


@dataclass(frozen=True)
class StateKey:
    """A name in worker_state(): what is kept (`kind`: "model", "session", "compiled", ...) for
    which owner (a model's key). Typed, so that dropping a model can find everything it owns."""

    kind: str
    owner: int | str


def worker_state() -> dict:
    """A dict that persists across calls inside one worker process (models, caches), keyed by StateKey."""
    return _STATE


def drop_owned_by(owner: int | str) -> None:
    """Forget every entry of worker_state() that `owner` owns (its model, sessions, compiled steps)."""
    for key in [k for k in _STATE if isinstance(k, StateKey) and k.owner == owner]:
        del _STATE[key]


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


class _Channel:
    """The control connection: one sender at a time (the main thread replies, a thread beats)."""

    def __init__(self, conn: Connection, heartbeat_interval: float):
        self.conn = conn
        self._send_lock = threading.Lock()
        self._busy_with: int | None = None  # the request being run, or None when idle
        self._interval = heartbeat_interval
        threading.Thread(target=self._beat, daemon=True, name="nxd-heartbeat").start()

    def _beat(self) -> None:
        while True:
            time.sleep(self._interval)
            request = self._busy_with
            if request is not None:
                try:
                    self._send(pickle.dumps((BEAT, request)))
                except OSError:
                    os._exit(1)  # the front end is gone

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.conn.send_bytes(data)

    def busy(self, request: int | None) -> None:
        self._busy_with = request

    def reply(self, request: int, status: str, payload) -> None:
        try:
            data = pickle.dumps((REPLY, request, status, payload))
        except Exception as exc:  # an unpicklable result becomes an error the user can read
            error = TypeError(f"the result ({type(payload).__name__}) cannot be sent to the front end: {exc}")
            data = pickle.dumps((REPLY, request, "error", error_payload(error)))
        self._busy_with = None
        self._send(data)


def error_payload(exc: BaseException) -> dict:
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


def _exit_when_orphaned(parent: int) -> None:
    """End this worker when the front end dies, so no orphan is left behind.

    A thread polls the parent pid (PR_SET_PDEATHSIG would fire when the thread
    that started us exits, which is wrong for front ends started from a thread).
    """

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="nxd-orphan-watch").start()


def main() -> None:
    # Ctrl-C in a terminal signals the whole process group; an interrupt belongs to the
    # front end, which cancels the call: a worker interrupted inside a collective would
    # leave its peers waiting (and the next call a stale KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_when_orphaned(os.getppid())
    config = pickle.loads(sys.stdin.buffer.read())
    for entry in config["sys_path"]:
        if entry not in sys.path:
            sys.path.append(entry)
    conn = Client(config["control"], family="AF_UNIX")
    conn.send_bytes(pickle.dumps(config["rank"]))
    channel = _Channel(conn, config["heartbeat_interval"])
    channel.busy(STARTUP_REQUEST)
    try:
        _init_worker(config)
    except BaseException as exc:
        channel.reply(STARTUP_REQUEST, "error", error_payload(exc))
        os._exit(1)
    channel.reply(STARTUP_REQUEST, "ok", os.getpid())
    preloading = _preload(config.get("preload", ()))

    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            os._exit(1)  # the front end is gone
        if message[0] == SHUTDOWN:
            break
        _, request, call = message
        channel.busy(request)  # heartbeats from here on, while the call unpickles and runs
        if preloading is not None:  # one thread imports at a time: a call waits for the preload to end
            preloading.join()
            preloading = None
        try:
            fn, args, kwargs = cloudpickle.loads(call)
            result = fn(*args, **kwargs)
        except BaseException as exc:
            channel.reply(request, "error", error_payload(exc))
        else:
            channel.reply(request, "ok", result)

    # Processes that used functional collectives can abort in teardown: leave the
    # group cleanly and skip the interpreter's own shutdown (docs/core.md).
    try:
        _STATE.clear()
        dist.barrier()
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    finally:
        os._exit(0)


def _preload(modules) -> threading.Thread | None:
    """Import the modules the first calls will need, in a thread, from the moment this worker has
    joined its group until its first call (which waits for it: imports never run in two threads at
    once), while the front end goes on with its own work: imports are most of a worker's start-up.
    One that fails is left for the call that needs it to raise."""

    def load():
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: S112 - the call that needs it raises the real error
                continue

    if not modules:
        return None
    thread = threading.Thread(target=load, daemon=True, name="nxd-preload")
    thread.start()
    return thread


def _init_worker(config: dict) -> None:
    compile_cache.use_persistent_torch_cache()  # before anything asks inductor where its cache is
    torch.set_num_threads(config["threads"])
    rank, world = config["rank"], config["world_size"]
    timeout = timedelta(seconds=config["collective_timeout"])
    host, port = config["store"]
    store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    if config["device"] == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(config["backend"], store=store, rank=rank, world_size=world, timeout=timeout)
    ps.initialize_model_parallel(config["tp"], collectives=config["collectives"], timeout=timeout)
