"""The units of one message run concurrently and each result lands in the message's current
state (issue 7, defect 1): nothing is delivered twice, history survives a restart, one DSN.

Four domains of one message are delivered at the same time by real peers with mixed
outcomes (250, 550, 451-then-250); the daemon is then restarted on its spool.
"""

from __future__ import annotations

from pathlib import Path

from empath.spool.model import RcptStatus, UnitStatus
from tests.daemon import Daemon, ThreadedPeer, read_spool, submit
from tests.integration.test_daemon_delivery import assert_nothing_more, dsn_report
from tests.sink import SmtpSink

SENDER = "sender@origin.test"
BODY = "From: sender@origin.test\nSubject: units\n\nhello\n"


def test_concurrent_units_with_mixed_outcomes_keep_their_state_across_a_restart(
    tmp_path: Path,
) -> None:
    # One scripted peer serves three domains (one transaction per domain); every final
    # reply is slowed down so the four attempts overlap.
    script = {
        "rcpt": {
            "bad@bad.test": "550 5.1.1 <bad@bad.test>: no such user",
            "later@later.test": ["451 4.2.0 mailbox busy", "250 2.1.5 Ok"],
        },
        "delay_secs": {"data_end": 0.3, "rcpt": 0.1},
    }
    with (
        ThreadedPeer({"hostname": "origin.test"}) as origin,
        ThreadedPeer(script) as peer,
        SmtpSink(dump=True) as sink,
    ):
        routes = {
            "origin.test": origin.address,
            "sink.test": f"127.0.0.1:{sink.port}",
            "ok.test": peer.address,
            "bad.test": peer.address,
            "later.test": peer.address,
        }
        daemon = Daemon(
            tmp_path / "empath",
            overrides={
                "delivery": {
                    "domains": {d: {"mx_override": a} for d, a in routes.items()},
                    "base_retry_delay_secs": 1.0,
                }
            },
        )
        daemon.start()
        try:
            msg_id = submit(
                daemon.smtp_port,
                SENDER,
                ["s@sink.test", "ok@ok.test", "bad@bad.test", "later@later.test"],
                BODY,
            )
            daemon.wait_log("Delivered", message_id=msg_id, domain="later.test", attempt=2)
            daemon.wait_log("Delivered", count=3, message_id=msg_id)
            (dsn,) = origin.wait_delivered(1)
            assert "bad@bad.test" in dsn_report(dsn)
        finally:
            daemon.stop()

        # Before the restart: every unit final, with its own attempts and history.
        units = {u.domain: u for u in read_spool(daemon.spool_path).messages[msg_id].units}
        assert {
            "sink.test": (UnitStatus.DELIVERED, 1),
            "ok.test": (UnitStatus.DELIVERED, 1),
            "bad.test": (UnitStatus.FAILED, 1),
            "later.test": (UnitStatus.DELIVERED, 2),
        } == {d: (u.status, u.attempts) for d, u in units.items()}
        assert [451, 250] == [a.code for a in units["later.test"].history]
        assert RcptStatus.FAILED is units["bad.test"].recipients[0].status

        daemon.start()
        try:
            # Nothing of this message is scheduled again, sent again or bounced again.
            assert daemon.logs("Delivery runner started", units=0)
            delivered = len(peer.delivered())
            assert 2 == delivered  # ok.test, later.test (bad.test was refused at RCPT)
            assert_nothing_more(peer.delivered, delivered, 1.5)
            assert 1 == sink.message_count()
            assert 1 == len(origin.transactions())
        finally:
            daemon.stop()
        after = {u.domain: u for u in read_spool(daemon.spool_path).messages[msg_id].units}
        assert units == after
