"""SIGHUP reloads delivery settings without dropping mail; a broken file keeps the old config."""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path

from tests.daemon import Daemon
from tests.helpers import free_port, wait_for
from tests.sink import SmtpSink


def _messages(daemon: Daemon, text: str) -> list[dict[str, object]]:
    return [ln for ln in daemon.log_lines() if ln.get("fields", {}).get("message") == text]


def test_sighup_applies_a_new_route_and_queued_mail_follows_it(tmp_path: Path) -> None:
    """Mail deferred against a dead MX is delivered after SIGHUP points the domain at a sink."""
    dead = free_port()
    with SmtpSink(dump=True) as sink:
        daemon = Daemon(
            tmp_path / "d",
            {
                "delivery": {
                    "base_retry_delay_secs": 1,
                    "max_retry_delay_secs": 1,
                    "retry_jitter_factor": 0.0,
                    "domains": {"reload.test": {"mx_override": f"127.0.0.1:{dead}"}},
                }
            },
        )
        with daemon:
            with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
                client.sendmail("s@origin.test", ["r@reload.test"], b"Subject: t\r\n\r\nbody\r\n")
            wait_for(lambda: _messages(daemon, "Delivery deferred"), 10, what="a deferral")
            assert 0 == sink.message_count()

            daemon.config["delivery"]["domains"]["reload.test"]["mx_override"] = (
                f"127.0.0.1:{sink.port}"
            )
            daemon.write_config()
            daemon.signal(signal.SIGHUP)
            wait_for(lambda: _messages(daemon, "Config reloaded"), 10, what="the reload")
            sink.wait_messages(1, timeout=15)
            [msg] = sink.messages()
            assert ("r@reload.test",) == msg.recipients
            assert msg.body.endswith(b"Subject: t\r\n\r\nbody\r\n")


def test_a_broken_config_on_sighup_keeps_the_old_one_and_says_why(tmp_path: Path) -> None:
    """A reload of a file with an unknown key logs the error (file:line:col) and keeps serving."""
    daemon = Daemon(tmp_path / "d")
    with daemon:
        daemon.config_path.write_text(
            daemon.config_path.read_text().replace(
                '"delivery": {', '"delivery": {\n  "max_atempts": 3,', 1
            )
        )
        daemon.signal(signal.SIGHUP)
        failed = wait_for(
            lambda: _messages(daemon, "Config reload failed; keeping the old config"),
            10,
            what="the reload failure",
        )
        error = str(failed[0]["fields"]["error"])  # type: ignore[index]
        assert "max_atempts" in error
        assert str(daemon.config_path) in error
        assert "ERROR" == failed[0]["level"]
        assert 200 == daemon.http_status("/health/ready")
        with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
            code, _ = client.noop()
        assert 250 == code
