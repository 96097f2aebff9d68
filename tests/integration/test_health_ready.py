"""/health/ready on the live daemon (DESIGN §7): 503 naming the failing check, 200 after.

The spool directory is made immutable with ``chattr +i`` (we run as root, so
permissions alone would not stop us); the queue reaches ``max_queue_size`` while a
slow sink holds three deliveries, and drains when it answers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.daemon import Daemon, Submitter, ThreadedPeer
from tests.helpers import require_tool, wait_for


def chattr(flag: str, path: Path) -> None:
    subprocess.run([require_tool("chattr"), flag, str(path)], check=True, capture_output=True,
                   timeout=10)  # fmt: skip


Checks = dict[str, dict[str, object]]


def ready(daemon: Daemon) -> tuple[int, Checks]:
    status, body = daemon.http_json("/health/ready")
    return status, body["checks"]


def wait_status(daemon: Daemon, status: int) -> Checks:
    """Poll /health/ready until it answers `status`; its checks."""

    def probe() -> Checks:
        got, checks = ready(daemon)
        return checks if got == status else {}

    return wait_for(probe, timeout=10, what=f"/health/ready {status}")


def test_ready_is_503_naming_spool_writable_while_the_spool_is_immutable(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "empath")
    daemon.start()
    try:
        assert 200 == ready(daemon)[0]
        chattr("+i", daemon.spool_path)  # not even root may create a file in it now
        try:
            checks = wait_status(daemon, 503)
            assert {"ok": False, "value": False} == checks["spool_writable"]
            assert all(c["ok"] for name, c in checks.items() if name != "spool_writable")
        finally:
            chattr("-i", daemon.spool_path)
        wait_status(daemon, 200)
        assert not (daemon.spool_path / ".ready-probe").exists()
    finally:
        daemon.stop()


def test_ready_is_503_naming_pending_units_above_max_queue_size_then_200(tmp_path: Path) -> None:
    script = {"delay_secs": {"data_end": 3.0}}  # three units stay queued (in flight) for 3 s
    with ThreadedPeer(script) as sink:
        daemon = Daemon(
            tmp_path / "empath",
            overrides={
                "health": {"max_queue_size": 3},
                "delivery": {
                    "domains": {"busy.test": {"mx_override": sink.address}},
                },
            },
        )
        daemon.start()
        try:
            with Submitter(daemon.smtp_port) as s:
                for i in range(3):
                    s.send("a@origin.test", [f"u{i}@busy.test"], "Subject: q\n\nx\n")
            checks = wait_status(daemon, 503)
            assert {"ok": False, "value": 3} == checks["pending_units"]
            sink.wait_delivered(3, timeout=20)
            checks = wait_status(daemon, 200)
            assert {"ok": True, "value": 0} == checks["pending_units"]
        finally:
            daemon.stop()


def test_units_waiting_to_retry_do_not_make_the_node_unready(tmp_path: Path) -> None:
    """Issue 14 defect 12: 20 units deferred by a 451 with max_queue_size 10 made the node
    answer 503 - a destination's outage took every node out of the load balancer.  Units
    waiting for their retry say nothing about what the node can still take in."""
    script = {"rcpt_default": "451 4.2.1 mailbox busy, try later"}
    with ThreadedPeer(script) as peer:
        daemon = Daemon(
            tmp_path / "empath",
            overrides={
                "health": {"max_queue_size": 10},
                "delivery": {
                    "domains": {"busy.test": {"mx_override": peer.address}},
                    "circuit_breaker": {"failure_threshold": 1000},
                },
            },
        )
        daemon.start()
        try:
            with Submitter(daemon.smtp_port) as s:
                for i in range(20):
                    s.send("a@origin.test", [f"u{i}@busy.test"], "Subject: q\n\nx\n")
            wait_for(lambda: len(daemon.logs("Delivery deferred")) >= 20, timeout=20,
                     what="20 deferrals")  # fmt: skip
            # The last units logged as deferred may still be in flight for a moment (their
            # new state being saved): poll until none is, and the node is ready throughout.
            # Counted as before the fix, the 20 waiting units would keep it at 503.
            seen: list[tuple[int, object]] = []

            def settled() -> bool:
                status, checks = ready(daemon)
                seen.append((status, checks["pending_units"]))
                return checks["pending_units"] == {"ok": True, "value": 0}

            wait_for(settled, timeout=10, what="no unit in flight or due")
            assert {200} == {status for status, _ in seen}, seen
        finally:
            daemon.stop()
