"""The running daemon delivers, retries and bounces, seen from real SMTP peers.

Destinations are ``mx_override``s: Postfix ``smtp-sink`` where plain acceptance is
enough, the scripted peer where per-recipient or per-attempt replies matter.  The
sender's domain ``origin.test`` is a scripted peer too, so every DSN is received
and inspected there.  Retry tests use ``base_retry_delay_secs`` of about a second.
"""

from __future__ import annotations

import email
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, ThreadedPeer, submit
from tests.sink import SmtpSink

SENDER = "sender@origin.test"
BODY = "From: sender@origin.test\nSubject: delivery test\n\nhello\n"
JITTER = 0.2  # retry_jitter_factor default
SLACK_S = 0.4  # scheduling and attempt time on top of a retry delay


@pytest.fixture
def origin() -> Iterator[ThreadedPeer]:
    """The sender's domain MX: receives the DSNs."""
    with ThreadedPeer({"hostname": "origin.test"}) as peer:
        yield peer


def start_daemon(
    tmp_path: Path, origin: ThreadedPeer, routes: dict[str, str], **delivery: Any
) -> Daemon:
    domains = {d: {"mx_override": a} for d, a in {"origin.test": origin.address, **routes}.items()}
    daemon = Daemon(tmp_path / "empath", overrides={"delivery": {"domains": domains, **delivery}})
    daemon.start()
    return daemon


def dsn_report(txn: Any) -> str:
    """The message/delivery-status part of a DSN transaction, as text."""
    msg = email.message_from_bytes(txn.body)
    assert "multipart/report" == msg.get_content_type()
    assert "auto-replied" == msg["Auto-Submitted"]
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            return "\n".join(str(p) for p in part.get_payload())
    raise AssertionError("no message/delivery-status part")


def event_times(peer: ThreadedPeer) -> list[float]:
    return [t for t, _ in peer.events("transaction")]


def assert_nothing_more(what: Any, expected: int, window_s: float) -> None:
    """``what()`` stays at ``expected`` items for ``window_s`` (a negative claim needs a
    window: it is a few retry delays long, not a synchronisation sleep)."""
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline:
        assert expected == len(what())
        time.sleep(0.05)


def test_three_recipients_in_two_domains_are_delivered_once_per_domain(
    tmp_path: Path, origin: ThreadedPeer
) -> None:
    with SmtpSink(dump=True) as sink_a, SmtpSink(dump=True) as sink_b:
        daemon = start_daemon(
            tmp_path,
            origin,
            {"a.test": f"127.0.0.1:{sink_a.port}", "b.test": f"127.0.0.1:{sink_b.port}"},
        )
        try:
            submit(daemon.smtp_port, SENDER, ["x@a.test", "y@b.test", "z@a.test"], BODY)
            sink_a.wait_messages(1)
            sink_b.wait_messages(1)
            daemon.wait_log("Delivered", count=2)
            (msg_a,) = sink_a.messages()
            (msg_b,) = sink_b.messages()
            assert ("x@a.test", "z@a.test") == msg_a.recipients
            assert ("y@b.test",) == msg_b.recipients
            assert (SENDER, SENDER) == (msg_a.sender, msg_b.sender)
            assert msg_a.body.endswith(b"\r\n\r\nhello\r\n")
            assert (1, 1) == (sink_a.message_count(), sink_b.message_count())
        finally:
            daemon.stop()
        assert [] == daemon.logs("Delivery deferred")


def test_mixed_recipient_results_bounce_only_the_550_and_retry_the_451(
    tmp_path: Path, origin: ThreadedPeer
) -> None:
    script = {
        "rcpt": {
            "bad@dest.test": "550 5.1.1 <bad@dest.test>: no such user",
            "later@dest.test": ["451 4.2.0 mailbox busy", "250 2.1.5 Ok"],
        }
    }
    with ThreadedPeer(script) as dest:
        daemon = start_daemon(
            tmp_path, origin, {"dest.test": dest.address}, base_retry_delay_secs=1.0
        )
        try:
            submit(
                daemon.smtp_port,
                SENDER,
                ["ok@dest.test", "bad@dest.test", "later@dest.test"],
                BODY,
            )
            first, second = dest.wait_delivered(2)
            assert ["ok@dest.test"] == first.recipients
            assert ["bad@dest.test", "later@dest.test"] == first.rejected
            assert ["later@dest.test"] == second.recipients

            (dsn,) = origin.wait_delivered(1)
            assert "" == dsn.sender  # MAIL FROM:<>
            assert [SENDER] == dsn.recipients
            report = dsn_report(dsn)
            assert "bad@dest.test" in report
            assert "Status: 5.1.1" in report
            assert "ok@dest.test" not in report
            assert "later@dest.test" not in report

            (delivered,) = daemon.wait_log("Delivered", attempt=2)
            assert 1 == delivered["fields"]["recipients"]
            assert_nothing_more(origin.transactions, 1, 0.5)
        finally:
            daemon.stop()


def test_4xx_is_retried_with_backoff_until_success(tmp_path: Path, origin: ThreadedPeer) -> None:
    script = {"data_end": ["451 4.3.0 try again", "451 4.3.0 try again", "250 2.0.0 Ok"]}
    base_s = 1.0
    with ThreadedPeer(script) as dest:
        daemon = start_daemon(
            tmp_path, origin, {"dest.test": dest.address}, base_retry_delay_secs=base_s
        )
        try:
            submit(daemon.smtp_port, SENDER, ["r@dest.test"], BODY)
            daemon.wait_log("Delivered", timeout=15, domain="dest.test", attempt=3)
            deferred = daemon.logs("Delivery deferred", domain="dest.test")
            assert [1, 2] == [d["fields"]["attempt"] for d in deferred]
            assert ["451", "451"] == [d["fields"]["smtp_code"] for d in deferred]
            t1, t2, t3 = event_times(dest)
            # delay after n attempts: base * 2^(n-1) ± 20 %
            assert base_s * (1 - JITTER) <= t2 - t1 <= base_s * (1 + JITTER) + SLACK_S
            assert 2 * base_s * (1 - JITTER) <= t3 - t2 <= 2 * base_s * (1 + JITTER) + SLACK_S
            assert ["2", "4", "4"] == [t.reply[0] for t in reversed(dest.transactions())]
        finally:
            daemon.stop()
        assert [] == origin.transactions()  # no DSN for a delivered message


def test_5xx_sends_exactly_one_dsn_and_is_not_retried(tmp_path: Path, origin: ThreadedPeer) -> None:
    base_s = 0.5
    with ThreadedPeer({"data_end": "554 5.7.1 rejected by policy"}) as dest:
        daemon = start_daemon(
            tmp_path, origin, {"dest.test": dest.address}, base_retry_delay_secs=base_s
        )
        try:
            submit(daemon.smtp_port, SENDER, ["p@dest.test"], BODY)
            (dsn,) = origin.wait_delivered(1)
            report = dsn_report(dsn)
            assert "Status: 5.7.1" in report
            assert "p@dest.test" in report
            # A retry would come within base * (1 + jitter); watch for three times that.
            assert_nothing_more(dest.transactions, 1, 3 * base_s * (1 + JITTER))
            assert 1 == len(origin.transactions())
            (failed,) = daemon.logs("Delivery failed permanently")
            assert "554" == failed["fields"]["smtp_code"]
            assert ["failed"] == [q["fields"]["kind"] for q in daemon.logs("DSN queued")]
            assert [] == daemon.logs("Delivery deferred")
        finally:
            daemon.stop()


def test_exhausted_attempts_send_a_dsn(tmp_path: Path, origin: ThreadedPeer) -> None:
    with ThreadedPeer({"data_end": "451 4.3.0 try again"}) as dest:
        daemon = start_daemon(
            tmp_path,
            origin,
            {"dest.test": dest.address},
            base_retry_delay_secs=0.5,
            max_attempts=2,
        )
        try:
            submit(daemon.smtp_port, SENDER, ["q@dest.test"], BODY)
            (dsn,) = origin.wait_delivered(1)
            assert "" == dsn.sender
            report = dsn_report(dsn)
            assert "q@dest.test" in report
            assert "Action: failed" in report
            (gave_up,) = daemon.wait_log("Delivery gave up")
            assert 2 == gave_up["fields"]["attempt"]
            assert "gave up after 2 attempts" in gave_up["fields"]["error"]
            assert 2 == len(dest.transactions())
            assert ["exhausted"] == [q["fields"]["kind"] for q in daemon.logs("DSN queued")]
        finally:
            daemon.stop()


def test_expired_message_sends_a_dsn(tmp_path: Path, origin: ThreadedPeer) -> None:
    with ThreadedPeer({"data_end": "451 4.3.0 try again"}) as dest:
        daemon = start_daemon(
            tmp_path,
            origin,
            {"dest.test": dest.address},
            base_retry_delay_secs=0.5,
            message_expiration_secs=2.0,
        )
        try:
            submit(daemon.smtp_port, SENDER, ["e@dest.test"], BODY)
            (dsn,) = origin.wait_delivered(1, timeout=15)
            report = dsn_report(dsn)
            assert "e@dest.test" in report
            assert "Action: failed" in report
            (gave_up,) = daemon.wait_log("Delivery gave up")
            assert "expired" in gave_up["fields"]["error"]
            attempts = len(dest.transactions())
            assert 2 <= attempts < 25  # stopped by the deadline, not by max_attempts
            assert ["expired"] == [q["fields"]["kind"] for q in daemon.logs("DSN queued")]
        finally:
            daemon.stop()


def test_no_dsn_for_a_null_sender(tmp_path: Path, origin: ThreadedPeer) -> None:
    with ThreadedPeer({"rcpt_default": "550 5.1.1 no such user"}) as dest:
        daemon = start_daemon(tmp_path, origin, {"dest.test": dest.address})
        try:
            null_id = submit(daemon.smtp_port, "", ["n@dest.test"], BODY)
            daemon.wait_log("Delivery failed permanently", message_id=null_id)
            # A message with a real sender, failing the same way, is the barrier: its DSN
            # is the only one that arrives.
            real_id = submit(daemon.smtp_port, SENDER, ["m@dest.test"], BODY)
            (dsn,) = origin.wait_delivered(1)
            assert "m@dest.test" in dsn_report(dsn)
            assert [real_id] == [
                q["fields"]["original_message_id"] for q in daemon.logs("DSN queued")
            ]
            assert_nothing_more(origin.transactions, 1, 0.3)
        finally:
            daemon.stop()


def test_a_failing_dsn_is_not_bounced(tmp_path: Path) -> None:
    """The sender's domain rejects the DSN itself: no DSN is made about a DSN."""
    with (
        ThreadedPeer({"rcpt_default": "550 5.1.1 no such user"}) as origin,
        ThreadedPeer({"rcpt_default": "550 5.1.1 no such user"}) as dest,
    ):
        daemon = start_daemon(tmp_path, origin, {"dest.test": dest.address})
        try:
            submit(daemon.smtp_port, SENDER, ["k@dest.test"], BODY)
            daemon.wait_log("Delivery failed permanently", count=2)
            failed_domains = sorted(
                f["fields"]["domain"] for f in daemon.logs("Delivery failed permanently")
            )
            assert ["dest.test", "origin.test"] == failed_domains
            assert 1 == len(daemon.logs("DSN queued"))
            assert_nothing_more(lambda: daemon.logs("DSN queued"), 1, 0.3)
        finally:
            daemon.stop()


def test_delay_warning_dsn_is_sent_once_then_the_message_is_delivered(
    tmp_path: Path, origin: ThreadedPeer
) -> None:
    script = {"data_end": ["451 4.3.0 try again"] * 3 + ["250 2.0.0 Ok"]}
    with ThreadedPeer(script) as dest:
        daemon = Daemon(
            tmp_path / "empath",
            overrides={
                "delivery": {
                    "domains": {
                        "origin.test": {"mx_override": origin.address},
                        "dest.test": {"mx_override": dest.address},
                    },
                    "base_retry_delay_secs": 0.3,
                },
                "dsn": {"delay_warning_secs": 0.5},
            },
        )
        daemon.start()
        try:
            submit(daemon.smtp_port, SENDER, ["w@dest.test"], BODY)
            daemon.wait_log("Delivered", timeout=15, domain="dest.test", attempt=4)
            (dsn,) = origin.wait_delivered(1)
            report = dsn_report(dsn)
            assert "Action: delayed" in report
            assert "w@dest.test" in report
            assert ["delayed"] == [q["fields"]["kind"] for q in daemon.logs("DSN queued")]
        finally:
            daemon.stop()
