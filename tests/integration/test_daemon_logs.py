"""DESIGN §8 logs from the live daemon: level filter changed by SIGHUP, redaction, text format."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from tests.daemon import Daemon, Submitter, ThreadedPeer, to_ron

BODY = "From: s@origin.test\nSubject: logs\n\nhello\n"


def test_level_changes_on_reload_and_addresses_are_redacted(tmp_path: Path) -> None:
    with ThreadedPeer({"rcpt_default": "550 5.1.1 no such user"}) as hard:
        daemon = Daemon(
            tmp_path / "empath",
            overrides={
                "delivery": {"domains": {"hard.test": {"mx_override": hard.address}}},
                "dsn": {"enabled": False},
                "log": {"level": "warn"},
                "audit": {"redact_sender": True, "redact_recipients": True},
            },
        )
        daemon.start()
        try:
            with Submitter(daemon.smtp_port) as s:
                first = s.send("alice@origin.test", ["bob@hard.test"], BODY)
            (failed,) = daemon.wait_log("Delivery failed permanently", message_id=first)
            assert "ERROR" == failed["level"]
            assert "[REDACTED]@hard.test" == failed["fields"]["recipient"]
            assert "bob@" not in daemon.log_path.read_text()
            assert [] == [ln for ln in daemon.log_lines() if ln["level"] == "INFO"]

            daemon.config["log"]["level"] = "info"
            daemon.config_path.write_text(to_ron(daemon.config) + "\n")
            daemon.signal(signal.SIGHUP)
            daemon.wait_log("Config reloaded")
            with Submitter(daemon.smtp_port) as s:
                second = s.send("alice@origin.test", ["carol@hard.test"], BODY)
            (received,) = daemon.wait_log("Message received", message_id=second)
            assert "INFO" == received["level"]
            assert received["fields"]["audit"] is True
            assert "[REDACTED]@origin.test" == received["fields"]["sender"]
            assert "alice@" not in daemon.log_path.read_text()
        finally:
            daemon.stop()


def test_text_format_for_a_terminal(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "empath", overrides={"log": {"format": "text"}})
    daemon.start()
    try:
        lines = daemon.log_path.read_text().splitlines()
        ready = [ln for ln in lines if "Empath ready" in ln]
        assert 1 == len(ready), lines
        assert re.match(
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z INFO  empath\.app: Empath ready ", ready[0]
        )
        assert "component=config" in ready[0]
        assert [] == daemon.log_lines()  # nothing JSON
    finally:
        daemon.stop()


def test_remote_replies_naming_a_redacted_recipient_are_redacted(tmp_path: Path) -> None:
    """Issue 14 defect 9: with `redact_recipients`, the remote reply text in the `error`
    field (a 550 or a 451 that quotes the mailbox) no longer carries the local part."""
    with (
        ThreadedPeer({"rcpt_default": "550 5.1.1 <secret.user@hard.test>: unknown"}) as hard,
        ThreadedPeer({"rcpt_default": "451 4.2.2 secret.user... mailbox full"}) as soft,
    ):
        daemon = Daemon(
            tmp_path / "empath",
            overrides={
                "delivery": {
                    "domains": {
                        "hard.test": {"mx_override": hard.address},
                        "soft.test": {"mx_override": soft.address},
                    }
                },
                "dsn": {"enabled": False},
                "audit": {"redact_recipients": True},
            },
        )
        with daemon:
            with Submitter(daemon.smtp_port) as s:
                first = s.send("alice@origin.test", ["secret.user@hard.test"], BODY)
                second = s.send("alice@origin.test", ["secret.user@soft.test"], BODY)
            (failed,) = daemon.wait_log("Delivery failed permanently", message_id=first)
            (deferred,) = daemon.wait_log("Delivery deferred", message_id=second)
        assert "550 5.1.1 <[REDACTED]@hard.test>: unknown" in failed["fields"]["error"]
        assert "[REDACTED]... mailbox full" in deferred["fields"]["error"]
        assert "secret.user" not in daemon.log_path.read_text()
