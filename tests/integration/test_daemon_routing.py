"""The running daemon routes by DNS (a real dnsmasq) and reacts to each error class.

MX hosts are contacted on port 25, so the stand-in MXes are scripted peers bound to
127.0.0.2:25 / 127.0.0.3:25 / 127.0.0.6:25 (the tests run as root).  Bounces go to
the sender's domain, ``origin.test``, whose ``mx_override`` is another scripted peer.
"""

from __future__ import annotations

import email
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, ThreadedPeer, submit
from tests.dnsmasq import STANDARD, DnsmasqServer, blackhole_nameserver, dnsmasq

SENDER = "sender@origin.test"
BODY = "From: sender@origin.test\nSubject: routing test\n\nhello\n"


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsmasqServer]:
    with dnsmasq(STANDARD, tmp_path_factory.mktemp("dnsmasq")) as server:
        yield server


@pytest.fixture
def origin() -> Iterator[ThreadedPeer]:
    """The sender's domain MX: receives the DSNs."""
    with ThreadedPeer({"hostname": "origin.test"}) as peer:
        yield peer


def start_daemon(tmp_path: Path, nameserver: str, origin: ThreadedPeer, **delivery: Any) -> Daemon:
    daemon = Daemon(
        tmp_path / "empath",
        overrides={
            "delivery": {
                "dns": {"nameservers": [nameserver], "timeout_secs": 1.0},
                "domains": {"origin.test": {"mx_override": origin.address}},
                **delivery,
            }
        },
    )
    daemon.start()
    return daemon


def mx_peer(address: str, **script: Any) -> ThreadedPeer:
    return ThreadedPeer({"hostname": f"mx-{address}", **script}, host=address, port=25)


def dsn_report(txn: Any) -> str:
    """The delivery-status part of a DSN transaction, as text."""
    msg = email.message_from_bytes(txn.body)
    assert "multipart/report" == msg.get_content_type()
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            return "\n".join(str(p) for p in part.get_payload())
    raise AssertionError("no message/delivery-status part")


def test_two_mx_domain_is_delivered_to_the_preferred_mx(
    tmp_path: Path, dns: DnsmasqServer, origin: ThreadedPeer
) -> None:
    with mx_peer("127.0.0.2") as mx1, mx_peer("127.0.0.3") as mx2:
        daemon = start_daemon(tmp_path, dns.nameserver, origin)
        try:
            submit(daemon.smtp_port, SENDER, ["alice@two.test"], BODY)
            (txn,) = mx1.wait_delivered(1)
            assert ["alice@two.test"] == txn.recipients
            daemon.wait_log("Delivered", domain="two.test", mx="mx1.two.test")
            assert [] == mx2.sessions()
        finally:
            daemon.stop()


def test_failover_to_second_mx_when_first_refuses_connections(
    tmp_path: Path, dns: DnsmasqServer, origin: ThreadedPeer
) -> None:
    # Nothing listens on 127.0.0.2:25: the connection is refused.
    with mx_peer("127.0.0.3") as mx2:
        daemon = start_daemon(tmp_path, dns.nameserver, origin)
        try:
            submit(daemon.smtp_port, SENDER, ["bob@two.test"], BODY)
            (txn,) = mx2.wait_delivered(1)
            assert ["bob@two.test"] == txn.recipients
            (line,) = daemon.wait_log("Delivered", domain="two.test")
            assert "mx2.two.test" == line["fields"]["mx"]
            assert 1 == line["fields"]["attempt"]
        finally:
            daemon.stop()


def test_failover_to_second_mx_when_first_greets_421(
    tmp_path: Path, dns: DnsmasqServer, origin: ThreadedPeer
) -> None:
    busy = {"greeting": "421 4.3.2 mx1 busy, try another"}
    with mx_peer("127.0.0.2", **busy) as mx1, mx_peer("127.0.0.3") as mx2:
        daemon = start_daemon(tmp_path, dns.nameserver, origin)
        try:
            submit(daemon.smtp_port, SENDER, ["carol@two.test"], BODY)
            (txn,) = mx2.wait_delivered(1)
            assert ["carol@two.test"] == txn.recipients
            assert 1 <= len(mx1.sessions())  # mx1 was tried first and said 421
            assert [] == mx1.transactions()
            (line,) = daemon.wait_log("Delivered", domain="two.test")
            assert ("mx2.two.test", 1) == (line["fields"]["mx"], line["fields"]["attempt"])
        finally:
            daemon.stop()


def test_a_only_domain_is_delivered_to_its_implicit_mx(
    tmp_path: Path, dns: DnsmasqServer, origin: ThreadedPeer
) -> None:
    with mx_peer("127.0.0.6") as host:
        daemon = start_daemon(tmp_path, dns.nameserver, origin)
        try:
            submit(daemon.smtp_port, SENDER, ["dave@aonly.test"], BODY)
            (txn,) = host.wait_delivered(1)
            assert ["dave@aonly.test"] == txn.recipients
            daemon.wait_log("Delivered", domain="aonly.test", mx="aonly.test")
        finally:
            daemon.stop()


def test_null_mx_fails_permanently_with_5_1_10_and_a_dsn(
    tmp_path: Path, dns: DnsmasqServer, origin: ThreadedPeer
) -> None:
    daemon = start_daemon(tmp_path, dns.nameserver, origin)
    try:
        msg_id = submit(daemon.smtp_port, SENDER, ["erin@nullmx.test"], BODY)
        (failed,) = daemon.wait_log("Delivery failed permanently", domain="nullmx.test")
        assert "null MX" in failed["fields"]["error"]
        (dsn,) = origin.wait_delivered(1)
        assert "" == dsn.sender
        assert [SENDER] == dsn.recipients
        report = dsn_report(dsn)
        assert "Status: 5.1.10" in report
        assert "rfc822;erin@nullmx.test" in report.replace(" ", "")
        (queued,) = daemon.logs("DSN queued")
        assert msg_id == queued["fields"]["original_message_id"]
        assert [] == daemon.logs("Delivery deferred", domain="nullmx.test")
    finally:
        daemon.stop()


def test_nxdomain_fails_permanently_with_a_dsn(
    tmp_path: Path, dns: DnsmasqServer, origin: ThreadedPeer
) -> None:
    daemon = start_daemon(tmp_path, dns.nameserver, origin)
    try:
        submit(daemon.smtp_port, SENDER, ["frank@missing.test"], BODY)
        daemon.wait_log("Delivery failed permanently", domain="missing.test")
        (dsn,) = origin.wait_delivered(1)
        assert "" == dsn.sender
        report = dsn_report(dsn)
        assert "Action: failed" in report
        assert "Status: 5." in report
        assert "frank@missing.test" in report
        assert [] == daemon.logs("Delivery deferred", domain="missing.test")
    finally:
        daemon.stop()


def test_resolver_that_never_answers_leaves_the_unit_in_retry(
    tmp_path: Path, origin: ThreadedPeer
) -> None:
    with blackhole_nameserver() as nameserver:
        daemon = start_daemon(tmp_path, nameserver, origin)
        try:
            submit(daemon.smtp_port, SENDER, ["gina@two.test"], BODY)
            (deferred,) = daemon.wait_log("Delivery deferred", domain="two.test")
            assert 1 == deferred["fields"]["attempt"]
            assert "DNS" in deferred["fields"]["error"]
            assert "timed out" in deferred["fields"]["error"]
            assert deferred["fields"]["retry_in_s"] > 0
            assert [] == daemon.logs("Delivery failed permanently")
            assert [] == daemon.logs("Delivery gave up")
            assert [] == daemon.logs("DSN queued")
        finally:
            daemon.stop()
