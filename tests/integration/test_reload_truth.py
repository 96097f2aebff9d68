"""A reload applies what it says and says what it did not apply (issue 14, defects 1, 20).

Relay access narrowed in the file and reloaded (SIGHUP) is refused at once - to new
sessions and to the next RCPT of sessions already open.  A change only a restart can
apply (a listener, the spool path) is reported as pending by every channel until the
daemon restarts: the WARN log line, `config reload`'s exit code 1 and stderr,
`system status`, `config check` and ``empath_config_restart_pending``; meanwhile
status and readiness keep judging the spool in use, and mail keeps going to it.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.ctl import ctl
from tests.daemon import Daemon, RawSmtp, parked_overrides, read_spool, submit
from tests.helpers import free_port, wait_for


def _reloaded(daemon: Daemon, n: int) -> None:
    wait_for(lambda: len(daemon.logs("Config reloaded")) >= n, 10, what=f"reload {n}")


def _metric(daemon: Daemon, name: str) -> float:
    for line in daemon.http_get("/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _rcpt(c: RawSmtp, address: str) -> int:
    c.send(f"RCPT TO:<{address}>\r\n".encode())
    return c.reply()[0]


def test_sighup_that_narrows_relay_access_applies_at_once(tmp_path: Path) -> None:
    overrides = parked_overrides("elsewhere.example", "ours.test")
    overrides["smtp_controller"] = {
        "relay": {"trusted_networks": ["127.0.0.0/8"], "accepted_domains": ["ours.test"]}
    }
    daemon = Daemon(tmp_path / "d", overrides)
    with daemon, RawSmtp("127.0.0.1", daemon.smtp_port) as open_session:
        assert 220 == open_session.reply()[0]
        open_session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\n")
        assert [250, 250] == open_session.codes(2)
        assert 250 == _rcpt(open_session, "r1@elsewhere.example")  # trusted: relays
        # the operator revokes loopback and the accepted domain, and sends SIGHUP
        daemon.config["smtp_controller"]["relay"] = {
            "trusted_networks": ["10.9.9.0/24"],
            "accepted_domains": [],
        }
        daemon.write_config()
        daemon.signal(signal.SIGHUP)
        _reloaded(daemon, 1)
        assert 554 == _rcpt(open_session, "r2@elsewhere.example")  # the open session too
        assert 554 == _rcpt(open_session, "r3@ours.test")
        with RawSmtp("127.0.0.1", daemon.smtp_port) as fresh:
            assert 220 == fresh.reply()[0]
            fresh.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\n")
            assert [250, 250] == fresh.codes(2)
            assert 554 == _rcpt(fresh, "r4@elsewhere.example")
            assert 554 == _rcpt(fresh, "r5@ours.test")
        assert 0.0 == _metric(daemon, "empath_config_restart_pending")
        assert not daemon.logs("Config reloaded; some changes wait for a restart")


def test_restart_only_changes_are_pending_everywhere_until_restart(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "d", parked_overrides("park.test"))
    with daemon:
        first = submit(daemon.smtp_port, "a@x.example", ["r@park.test"], "Subject: 1\n\nx\n")
        old_spool = str(daemon.spool_path)
        new_spool = tmp_path / "elsewhere-spool"  # does not exist: never used before a restart
        daemon.config["spool"]["path"] = str(new_spool)
        daemon.config["smtp_controller"]["listeners"][0]["socket"] = f"127.0.0.1:{free_port()}"
        daemon.config["log"]["level"] = "debug"  # this one applies
        daemon.write_config()

        reload = ctl(daemon, "config", "reload")
        assert 1 == reload.returncode, reload.stdout + reload.stderr
        assert "WARNING" in reload.stderr and "NOT applied" in reload.stderr
        assert "spool.path" in reload.stderr and "smtp_controller.listeners" in reload.stderr
        assert "log.level" in reload.stdout  # what was applied is listed
        warn = daemon.logs("Config reloaded; some changes wait for a restart")
        assert warn and "WARN" == warn[0]["level"]
        assert {"spool.path", "smtp_controller.listeners"} <= set(
            warn[0]["fields"]["pending_restart"]
        )

        # status and readiness judge the spool in use, and mail still goes there
        status = json.loads(ctl(daemon, "--json", "system", "status").stdout)
        assert old_spool == status["spool"]["path"]
        pending = status["config"]["restart_pending"]
        assert any(p.startswith("spool.path:") for p in pending)
        plain = ctl(daemon, "system", "status").stdout
        assert "RESTART PENDING: 2 change(s)" in plain
        assert 200 == daemon.http_status("/health/ready")
        assert 2.0 == _metric(daemon, "empath_config_restart_pending")
        second = submit(daemon.smtp_port, "a@x.example", ["r@park.test"], "Subject: 2\n\nx\n")

        # `config check` still sees the difference (it compared with the file before)
        check = json.loads(ctl(daemon, "--json", "config", "check").stdout)
        assert {"spool.path", "smtp_controller.listeners"} == set(check["need_restart"])
        assert "applied only by a restart" in ctl(daemon, "config", "check").stdout

        # a second reload of the same file: still pending, still exit 1
        assert 1 == ctl(daemon, "config", "reload").returncode
        # the operator reverts the restart-only part: nothing pending, exit 0
        daemon.config["spool"]["path"] = old_spool
        daemon.config["smtp_controller"]["listeners"][0]["socket"] = f"127.0.0.1:{daemon.smtp_port}"
        daemon.write_config()
        reverted = ctl(daemon, "config", "reload")
        assert (0, "") == (reverted.returncode, reverted.stderr)
        assert 0.0 == _metric(daemon, "empath_config_restart_pending")
        assert (
            []
            == json.loads(ctl(daemon, "--json", "system", "status").stdout)["config"][
                "restart_pending"
            ]
        )
    assert not new_spool.exists()
    assert {first, second} <= set(read_spool(daemon.spool_path).messages)
