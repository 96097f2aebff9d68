"""Issue 14, defects 6 and 7: the health endpoint judges the real SMTP socket, and
survives floods of silent connections - against the real daemon, with real sockets
and the real `ss -K`."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.daemon import Daemon
from tests.helpers import require_tool


@contextmanager
def silent_connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    """``n`` TCP connections to ``port`` that never send a byte."""
    with ExitStack() as stack:
        socks = []
        for _ in range(n):
            s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            socks.append(s)
        yield socks


def test_silent_connections_do_not_make_liveness_or_scrapes_fail(tmp_path: Path) -> None:
    """64, then 400 silent TCP connections to the health port: `/health/live` and
    `/metrics` still answer 200 (they once answered 503 for 10 s, and an orchestrator
    restarted a healthy MTA), and so does `/health/ready`."""
    with Daemon(tmp_path / "empath") as d:
        for n in (64, 400):
            with silent_connections(d.http_port, n):
                time.sleep(0.2)  # let the daemon accept them all (no assert on timing)
                assert 200 == d.http_status("/health/live")
                assert 200 == d.http_status("/metrics")
                assert 200 == d.http_status("/health/ready")
                assert "empath_smtp_connections_active" in d.http_get("/metrics")
        assert 200 == d.http_status("/health/live")


def test_readiness_fails_when_the_smtp_listening_socket_is_destroyed(tmp_path: Path) -> None:
    """`ss -K` destroys the SMTP listening socket under the daemon: connections are
    refused, and `/health/ready` says so (503, listeners check false) instead of 200."""
    ss = require_tool("ss")
    with Daemon(tmp_path / "empath") as d:
        status, ready = d.http_json("/health/ready")
        assert (200, True) == (status, ready["checks"]["listeners"]["ok"])
        subprocess.run(
            [ss, "-K", "-t", "state", "listening", "src", f"127.0.0.1:{d.smtp_port}"],
            check=True,
            capture_output=True,
            timeout=10,
        )
        try:
            socket.create_connection(("127.0.0.1", d.smtp_port), timeout=5).close()
            refused = False
        except ConnectionRefusedError:
            refused = True
        assert refused, "ss -K did not destroy the listening socket"
        status, ready = d.http_json("/health/ready")
        assert 503 == status
        assert not ready["checks"]["listeners"]["ok"]
        assert 200 == d.http_status("/health/live")
        assert 503 == d.http_status("/health/ready")  # it stays not ready
        (lost,) = d.logs("SMTP listening socket lost")
        assert "ERROR" == lost["level"]
