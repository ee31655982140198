"""Shared fixtures: one worker group per world size for the whole session (spawning is the cost)."""

import os
import shutil
import signal
import tempfile

import pytest

from nxd_core import parallel_state as ps
from nxd_core.workers import WorkerGroup


def pytest_configure(config):
    """Compiled steps go to a compile cache of this test session (the workers read NXD_CACHE_DIR when
    they start), never the user's ~/.cache/nxd-zoo: a test sees a cold cache, and leaves nothing."""
    if "NXD_CACHE_DIR" not in os.environ:
        config._nxd_cache_dir = os.environ["NXD_CACHE_DIR"] = tempfile.mkdtemp(prefix="nxd-test-cache-")
    # A run started in the background by a non-interactive shell inherits SIGINT ignored, and then
    # _thread.interrupt_main() does nothing: the interrupt tests need Python's own handler, as at a terminal.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config):
    folder = getattr(config, "_nxd_cache_dir", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _set_tp(tp: int) -> None:
    ps.initialize_model_parallel(tp)


class TPRunner:
    """Runs a function on tp x dp ranks: in-process for a single rank, else on a reused WorkerGroup."""

    def __init__(self):
        self._groups: dict[int, WorkerGroup] = {}
        self._tp: dict[int, int] = {}

    def group(self, world_size: int) -> WorkerGroup:
        group = self._groups.get(world_size)
        if group is None or group.closed:
            group = self._groups[world_size] = WorkerGroup(world_size)
            self._tp[world_size] = world_size
        return group

    def run(self, tp: int, fn, *args, dp: int = 1, **kwargs) -> list:
        world = tp * dp
        if world == 1:
            return [fn(*args, **kwargs)]
        group = self.group(world)
        if self._tp[world] != tp:
            group.run(_set_tp, tp)
            self._tp[world] = tp
        return group.run(fn, *args, **kwargs)

    def workers(self, tp: int) -> WorkerGroup:
        """The reused group of tp processes, laid out as one TP group (for from_pretrained_parallel)."""
        group = self.group(tp)
        if self._tp[tp] != tp:
            group.run(_set_tp, tp)
            self._tp[tp] = tp
        return group

    def close(self) -> None:
        for group in self._groups.values():
            group.close()


@pytest.fixture(scope="session")
def tp_runner():
    runner = TPRunner()
    yield runner
    runner.close()
