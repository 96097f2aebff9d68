"""Shared test utilities: tool lookup, free ports, polling, processes stopped by PID."""

from __future__ import annotations

import collections
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def require_tool(name: str) -> str:
    """Path of a command-line tool the test needs.

    `make test` installs every tool, so a missing one is an error, never a skip.
    """
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        pytest.fail(f"required tool {name!r} is not installed (run `make test`, which installs it)")
    return path


def listen_port_range() -> range:
    """The ports tests give their servers: those below the kernel's ephemeral range
    (``ip_local_port_range``), which it never hands to a client socket as its source
    port.  A port picked inside that range (bind to port 0) can be taken by any outgoing
    connection between the pick and the server's own bind ("address already in use":
    a CI run failed so)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 16384), low)


# ports handed out lately (a caller that picks two before binding either gets two)
_recent: collections.deque[int] = collections.deque(maxlen=256)
_pick = random.SystemRandom()  # not the random module's: a test may seed that one


def _free(kind: int, host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports = listen_port_range()
    for _ in range(1000):
        port = _pick.choice(ports)
        if port in _recent:
            continue
        with socket.socket(family, kind) as s:
            try:
                s.bind((host, port))  # no SO_REUSEADDR: a port in any use is skipped
            except OSError:
                continue
        _recent.append(port)
        return port
    raise RuntimeError(f"no free port on {host} in {ports}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on host right now, outside the ephemeral range."""
    return _free(socket.SOCK_STREAM, host)


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of count consecutive TCP ports that are all free on host right now (for a
    tool that numbers its ports from a base, as scripts/cluster.py does per node)."""
    top = listen_port_range().stop
    for _ in range(200):
        base = free_port(host)
        if base + count > top:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                held.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that is free on host right now (outside the range DNS clients' source
    ports come from)."""
    return _free(socket.SOCK_DGRAM, host)


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll predicate until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate!r}")
        time.sleep(interval)


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    def ok() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_for(ok, timeout, what=f"{host}:{port} to listen")


def stop_pid(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 10.0) -> None:
    """Stop a process we started, by its PID: TERM, then KILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


@contextlib.contextmanager
def running(args: list[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    """Start a process for the duration of a with-block and stop it by PID afterwards."""
    proc = subprocess.Popen(args, **kwargs)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        stop_pid(proc)


@contextlib.contextmanager
def tmpfs_mount(point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``"16m"``) mounted at ``point`` (created; we run as root),
    unmounted afterwards - lazily if something still holds it."""
    mount, umount = require_tool("mount"), require_tool("umount")
    point.mkdir(parents=True)
    subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(point)],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip
    try:
        yield point
    finally:
        if subprocess.run([umount, str(point)], check=False, timeout=10).returncode != 0:
            subprocess.run([umount, "--lazy", str(point)], check=True, timeout=10)


def fill(path: Path, leave_bytes: int = 0) -> None:
    """Append to ``path`` until the filesystem is full, then give back about ``leave_bytes``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (b"\0" * (256 * 1024), b"\0" * 4096, b"\0"):
            with contextlib.suppress(OSError):
                while os.write(fd, chunk):
                    pass
        if leave_bytes:
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave_bytes))
    finally:
        os.close(fd)
