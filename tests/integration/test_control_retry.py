"""`queue retry` on an expired unit reopens it with a fresh expiry window: once its peer is
fixed it is attempted and delivered, not expired again at once."""

from __future__ import annotations

import json
from pathlib import Path

from tests.ctl import ctl
from tests.daemon import Daemon, submit
from tests.sink import SmtpSink

SENDER = "ops@origin.test"


def test_retry_reopens_an_expired_unit_with_a_fresh_window(tmp_path: Path) -> None:
    with (
        SmtpSink(soft_reject=("RCPT",)) as soft,
        SmtpSink() as ok,
    ):
        overrides = {
            "delivery": {
                "message_expiration_secs": 1.0,
                "base_retry_delay_secs": 0.3,
                "max_retry_delay_secs": 0.3,
                "retry_jitter_factor": 0.0,
                "domains": {
                    "exp.test": {"mx_override": f"127.0.0.1:{soft.port}"},
                    "origin.test": {"mx_override": f"127.0.0.1:{ok.port}"},
                },
                "circuit_breaker": {"failure_threshold": 1000},
            }
        }
        with Daemon(tmp_path / "d", overrides) as d:
            msg_id = submit(d.smtp_port, SENDER, ["a@exp.test"], "Subject: e\n\nx\n")
            d.wait_log("Delivery gave up", message_id=msg_id)
            listed = ctl(d, "queue", "list", "--status", "expired", "--json").stdout
            (unit,) = [json.loads(line) for line in listed.splitlines()]
            assert msg_id == unit["id"]
            attempts = unit["attempts"]

            # Fix the peer, then retry: the unit must be attempted (its old window is over).
            d.config["delivery"]["domains"]["exp.test"] = {"mx_override": f"127.0.0.1:{ok.port}"}
            d.write_config()
            assert 0 == ctl(d, "config", "reload").returncode
            r = ctl(d, "queue", "retry", msg_id)
            expected = "1 unit(s) made due: 1 will be attempted now\n"
            assert (0, expected) == (r.returncode, r.stdout)
            delivered = d.wait_log("Delivered", message_id=msg_id)
            assert attempts + 1 == delivered[0]["fields"]["attempt"]  # attempts were kept
            assert 1 == len(d.logs("Delivery gave up", message_id=msg_id))
