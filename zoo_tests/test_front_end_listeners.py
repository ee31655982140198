"""Rendezvous and control listen on loopback only, close with the group, and shrug off stray connections."""

import os
import socket
import threading
import time
from pathlib import Path

from nxd_core.workers import WorkerGroup


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _tcp_listeners(pids) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket these processes hold, read from /proc."""
    inodes = set().union(*(_socket_inodes(p) for p in pids))
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.split(":")
                raw = bytes.fromhex(address)
                if width == 8:
                    text = socket.inet_ntop(socket.AF_INET, raw[::-1])
                else:  # four little-endian words
                    text = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
                found.append((text, int(port, 16)))
    return found


def _unix_listeners(pid: int) -> list[str]:
    inodes = _socket_inodes(pid)
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and fields[5] == "01" and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON
            paths.append(fields[7])
    return paths


def test_every_listener_is_on_loopback_and_none_survives_close():
    before = set(_tcp_listeners([os.getpid()]))
    group = WorkerGroup(2)
    try:
        listeners = _tcp_listeners([os.getpid(), *group.pids])
        assert listeners, "the store and gloo listen somewhere"
        assert {address for address, _ in listeners} == {"127.0.0.1"}, listeners
        assert set(_tcp_listeners([os.getpid()])) - before, "the front end hosts the store"
        assert _unix_listeners(os.getpid()) == []  # the control socket closes once every worker is in
        assert group.run(os.getpid) == group.pids
    finally:
        group.close()
    assert set(_tcp_listeners([os.getpid()])) - before == set()


def test_stray_connections_during_start_up_do_not_break_it():
    """A local process that connects to whatever the front end listens on while workers start is refused."""
    own = set(_tcp_listeners([os.getpid()]))
    stop = threading.Event()
    hits = []

    def intrude():
        tried = set()
        while not stop.is_set():
            for address, port in set(_tcp_listeners([os.getpid()])) - own - tried:
                tried.add((address, port))
                with socket.create_connection((address, port), timeout=1) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(64))
                hits.append(port)
            for path in set(_unix_listeners(os.getpid())) - tried:
                tried.add(path)
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                    try:
                        s.sendall(os.urandom(64))
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # refused at once: what the group should do with a stranger
                hits.append(path)
            time.sleep(0.005)

    intruder = threading.Thread(target=intrude, daemon=True)
    intruder.start()
    try:
        group = WorkerGroup(2)
    finally:
        stop.set()
        intruder.join()
    try:
        assert hits, "the intruder reached a listener during start-up"
        assert group.run(lambda: 41 + 1) == [42, 42]
    finally:
        group.close()
