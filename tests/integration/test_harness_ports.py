"""The test harness's own promises about ports and daemons that fail to start.

A CI run failed twice over one port: a daemon's port, picked with a bind to port 0, was
taken by an outgoing connection's source port before the daemon bound it ("address already
in use"), and the failed start left the daemon's log file open, so a later test failed on
the unraisable ResourceWarning its garbage collection raised.
"""

from __future__ import annotations

import collections
import os
import socket
from pathlib import Path

import pytest

from tests import helpers
from tests.daemon import Daemon
from tests.helpers import free_port, free_ports, free_udp_port, listen_port_range


def ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_free_ports_are_never_ones_the_kernel_gives_outgoing_connections() -> None:
    low = ephemeral_low()
    assert listen_port_range().stop == low
    tcp = [free_port() for _ in range(300)]
    udp = [free_udp_port() for _ in range(100)]
    assert all(1024 <= p < low for p in tcp + udp), [p for p in tcp + udp if p >= low]
    base = free_ports(3)
    assert base + 3 <= low
    # picked back to back, none handed out twice (a caller may pick several, then bind)
    assert len(set(tcp[-100:])) == 100


def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Of a 16-port range, 12 are held: the ports handed out are the other 4."""
    base = free_ports(16)
    monkeypatch.setattr(helpers, "listen_port_range", lambda: range(base, base + 16))
    monkeypatch.setattr(helpers, "_recent", collections.deque(maxlen=256))
    held = [socket.create_server(("127.0.0.1", port)) for port in range(base, base + 12)]
    try:
        got = {free_port() for _ in range(4)}
        assert got == set(range(base + 12, base + 16)), got
    finally:
        for s in held:
            s.close()


def _open_files_named(path: Path) -> list[int]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                out.append(int(fd))
        except OSError:
            continue
    return out


def test_a_daemon_that_cannot_start_leaves_no_open_log_file(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d")
    taken = socket.create_server(("127.0.0.1", d.smtp_port))  # its SMTP port
    with taken, pytest.raises(RuntimeError, match="exited with 1"):
        d.start()
    assert _open_files_named(d.log_path) == []
    assert d.stop() == 1  # collected; its log says why
    assert "address already in use" in d.log_tail()
