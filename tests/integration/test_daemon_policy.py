"""Delivery policy in the running daemon: circuit breaker, rate limit, max_connections,
require_tls — observed at real SMTP peers (scripted, in a thread) and in the JSON log.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests import logql
from tests.daemon import Daemon, Submitter, ThreadedPeer, log_time
from tests.dnsmasq import DnsmasqServer, DnsRecords, dnsmasq
from tests.postfix import PostfixPeer
from tests.sink import SmtpSink

SENDER = "sender@origin.test"
BODY = "From: sender@origin.test\nSubject: policy test\n\nhello\n"


def start_daemon(
    tmp_path: Path,
    domains: dict[str, dict[str, Any]],
    env: dict[str, str] | None = None,
    **delivery: Any,
) -> Daemon:
    daemon = Daemon(tmp_path / "empath", overrides={"delivery": {"domains": domains, **delivery}})
    daemon.start(env=env)
    return daemon


def send_many(port: int, recipients: list[str]) -> list[str]:
    """One message per recipient over one SMTP session; the queue ids."""
    with Submitter(port) as s:
        return [s.send(SENDER, [r], BODY) for r in recipients]


# --- circuit breaker --------------------------------------------------------------------


def test_circuit_breaker_opens_then_lets_one_probe_through_then_closes(tmp_path: Path) -> None:
    timeout_s = 2.0
    script = {
        # Three sessions refused with 421 (temporary), then a healthy server whose
        # DATA reply is slow enough to make the Half-Open probe observable.
        "greeting": ["421 4.3.2 overloaded"] * 3 + ["220 {host} ESMTP"],
        "delay_secs": {"data_end": 0.3},
    }
    with ThreadedPeer(script) as dest:
        daemon = start_daemon(
            tmp_path,
            {"dest.test": {"mx_override": dest.address}},
            base_retry_delay_secs=0.3,
            circuit_breaker={
                "failure_threshold": 3,
                "failure_window_secs": 60.0,
                "timeout_secs": timeout_s,
                "success_threshold": 1,
            },
        )
        try:
            first = send_many(daemon.smtp_port, [f"a{i}@dest.test" for i in range(3)])
            (opened,) = daemon.wait_log("Circuit breaker OPENED for dest.test")
            assert "dest.test" == opened["fields"]["domain"]
            assert 3 == len(dest.sessions())
            # Accepted while Open: these wait for the breaker, not for a connection.
            later = send_many(daemon.smtp_port, [f"b{i}@dest.test" for i in range(2)])

            (half,) = daemon.wait_log("Circuit breaker HALF-OPEN for dest.test", timeout=10)
            (closed,) = daemon.wait_log("Circuit breaker CLOSED for dest.test", timeout=10)
            daemon.wait_log("Delivered", count=5, domain="dest.test")
            assert ["ERROR", "WARN", "INFO"] == [e["level"] for e in (opened, half, closed)]
            t_open, t_half, t_closed = map(log_time, (opened, half, closed))
            assert timeout_s - 0.1 <= t_half - t_open <= timeout_s + 1.5

            starts = [t for t, _ in dest.events("session")]
            assert 0 == sum(1 for t in starts if t_open < t < t_half), "connected while Open"
            assert 1 == sum(1 for t in starts if t_half <= t < t_closed), "not exactly one probe"
            assert 5 == len(dest.delivered())

            # Waiting while Open spent no attempts: each unit failed once at most.
            attempts = {
                d["fields"]["message_id"]: d["fields"]["attempt"]
                for d in daemon.logs("Delivered", domain="dest.test")
            }
            assert dict.fromkeys(first, 2) | dict.fromkeys(later, 1) == attempts
            assert 3 == len(daemon.logs("Delivery deferred", domain="dest.test"))
        finally:
            daemon.stop()


def test_451_to_three_mailboxes_at_rcpt_does_not_open_the_breaker(tmp_path: Path) -> None:
    """Three mailboxes answering 451 at RCPT on a healthy MX are those mailboxes' trouble:
    they are retried, the breaker stays Closed and mail for the other mailboxes flows."""
    busy = [f"busy{i}@dest.test" for i in range(3)]
    script = {"rcpt": dict.fromkeys(busy, "451 4.2.1 mailbox busy, try later")}
    with ThreadedPeer(script) as dest:
        daemon = start_daemon(
            tmp_path,
            {"dest.test": {"mx_override": dest.address}},
            base_retry_delay_secs=0.2,
            max_retry_delay_secs=0.4,
            circuit_breaker={
                "failure_threshold": 3,
                "failure_window_secs": 60.0,
                "timeout_secs": 300.0,
                "success_threshold": 1,
            },
        )
        try:
            send_many(daemon.smtp_port, busy)
            # Each busy mailbox is refused again and again: far more than the threshold.
            daemon.wait_log("Delivery deferred", count=12, domain="dest.test", timeout=20)
            good = send_many(daemon.smtp_port, [f"ok{i}@dest.test" for i in range(5)])
            delivered = daemon.wait_log("Delivered", count=5, domain="dest.test", timeout=10)
            assert set(good) == {d["fields"]["message_id"] for d in delivered}
            assert [] == daemon.logs("Circuit breaker OPENED")
            metrics = daemon.http_get("/metrics")
            trips = 'empath_delivery_circuit_breaker_trips_total{domain="dest.test"}'
            assert all(line == f"{trips} 0.0" for line in metrics.splitlines() if trips in line)
            asked = [c for sess in dest.sessions() for c in sess.commands if "RCPT" in c]
            for mailbox in busy:
                assert sum(1 for c in asked if mailbox in c) >= 4, mailbox
        finally:
            daemon.stop()


def test_a_real_postfix_answering_451_for_three_mailboxes_keeps_the_breaker_closed(
    tmp_path: Path,
) -> None:
    """The same with a real Postfix as the MX (check_recipient_access answers 451 for
    three mailboxes, relays the rest to smtp-sink): the busy mailboxes are retried, the
    breaker stays Closed and the other mail reaches the sink through Postfix."""
    busy = [f"busy{i}@dest.test" for i in range(3)]
    table = ", ".join(f"{{{a}=451 4.2.1 mailbox busy, try later}}" for a in busy)
    restrictions = (
        f"smtpd_recipient_restrictions = check_recipient_access inline:{{{table}}}, "
        "permit_mynetworks, reject_unauth_destination\n"
    )
    with (
        SmtpSink() as sink,
        PostfixPeer(relay_port=sink.port, domain="dest.test", extra_main_cf=restrictions) as pf,
    ):
        daemon = start_daemon(
            tmp_path,
            {"dest.test": {"mx_override": f"127.0.0.1:{pf.port}"}},
            base_retry_delay_secs=0.2,
            max_retry_delay_secs=0.4,
            circuit_breaker={"failure_threshold": 3, "failure_window_secs": 60.0,
                             "timeout_secs": 300.0, "success_threshold": 1},
        )  # fmt: skip
        try:
            send_many(daemon.smtp_port, busy)
            deferred = daemon.wait_log("Delivery deferred", count=12, domain="dest.test",
                                       timeout=30)  # fmt: skip
            assert {"451"} == {d["fields"]["smtp_code"] for d in deferred}
            good = send_many(daemon.smtp_port, [f"ok{i}@dest.test" for i in range(5)])
            delivered = daemon.wait_log("Delivered", count=5, domain="dest.test", timeout=20)
            assert set(good) == {d["fields"]["message_id"] for d in delivered}
            sink.wait_messages(5, timeout=30)  # relayed on by Postfix
            assert [] == daemon.logs("Circuit breaker OPENED")
        finally:
            daemon.stop()


# --- rate limit ---------------------------------------------------------------------------


def test_domain_rate_limit_holds_while_another_domain_runs_unthrottled(tmp_path: Path) -> None:
    rate = 2.0
    slow_n = 41  # burst 1, then one every 0.5 s: 20 s from first to last
    fast_n = 100
    with ThreadedPeer() as slow, ThreadedPeer() as fast:
        daemon = start_daemon(
            tmp_path,
            {
                "slow.test": {"mx_override": slow.address},
                "fast.test": {"mx_override": fast.address},
            },
            rate_limit={
                "messages_per_second": 100000.0,
                "burst_size": 100000,
                "domain_limits": {"slow.test": {"messages_per_second": rate, "burst_size": 1}},
            },
        )
        try:
            recipients = []  # the two domains interleaved
            for i in range(max(slow_n, fast_n)):
                recipients += [f"s{i}@slow.test"] if i < slow_n else []
                recipients += [f"f{i}@fast.test"] if i < fast_n else []
            send_many(daemon.smtp_port, recipients)
            fast.wait_delivered(fast_n, timeout=10)
            slow_done_early = len(slow.delivered())
            slow.wait_delivered(slow_n, timeout=35)

            times = sorted(t for t, _ in slow.events("transaction"))
            measured = (slow_n - 1) / (times[-1] - times[0])
            assert rate * 0.9 <= measured <= rate * 1.1, f"{measured:.3f} msg/s"
            # Never more than burst + rate * t in any window.
            for i, t0 in enumerate(times):
                in_1s = sum(1 for t in times[i:] if t - t0 < 1.0)
                assert in_1s <= 1 + rate * 1.0
            # The other domain was not held back: all of it arrived while slow.test had
            # received only a few messages.
            assert slow_done_early < 15
            fast_times = sorted(t for t, _ in fast.events("transaction"))
            assert fast_times[-1] - fast_times[0] < 5.0

            limited = daemon.logs("Rate limit exceeded")
            assert limited, "no 'Rate limit exceeded' log line"
            assert {"slow.test"} == {line["fields"]["domain"] for line in limited}
        finally:
            daemon.stop()


# --- max_connections and reuse ---------------------------------------------------------


def test_a_backlog_waiting_for_a_connection_then_for_tokens_is_counted_and_logged(
    tmp_path: Path,
) -> None:
    """Issue 14 #17: units that queued for the domain's one connection and then wait for
    rate-limit tokens are counted in empath_delivery_rate_limited_total and logged, in
    one ``Rate limit exceeded`` line per domain and interval (not one per unit)."""
    n = 10
    with ThreadedPeer({"delay_secs": {"data_end": 0.3}}) as slow:
        daemon = start_daemon(
            tmp_path,
            {"slow.test": {"mx_override": slow.address, "max_connections": 1}},
            rate_limit={
                "messages_per_second": 100000.0,
                "burst_size": 100000,
                "domain_limits": {"slow.test": {"messages_per_second": 2.0, "burst_size": 1}},
            },
        )
        try:
            send_many(daemon.smtp_port, [f"u{i}@slow.test" for i in range(n)])
            slow.wait_delivered(n, timeout=20)
            metrics = daemon.http_get("/metrics").splitlines()
            counted = 'empath_delivery_rate_limited_total{domain="slow.test"}'
            assert [f"{counted} {n - 1:.1f}"] == [m for m in metrics if m.startswith(counted)]
            lines = daemon.logs("Rate limit exceeded", domain="slow.test")
            assert 1 == len(lines)  # the drain took < 10 s: one line
            assert n - 1 == lines[0]["fields"]["deferred"]
            # The runbook's RateLimitingExcessive LogQL finds it.
            raw = daemon.log_path.read_text(errors="replace").splitlines()
            query = '{service="empath"} |= "Rate limit exceeded" | json | fields_domain="slow.test"'
            assert 1 == len(logql.run(query, raw, {"service": "empath"}))
        finally:
            daemon.stop()


def test_max_connections_is_never_exceeded_and_connections_are_reused(tmp_path: Path) -> None:
    n = 40
    with ThreadedPeer({"delay_secs": {"data_end": 0.02}}) as dest:
        daemon = start_daemon(
            tmp_path, {"dest.test": {"mx_override": dest.address, "max_connections": 2}}
        )
        try:
            send_many(daemon.smtp_port, [f"u{i}@dest.test" for i in range(n)])
            dest.wait_delivered(n, timeout=20)
            assert dest.max_concurrent_sessions() <= 2
            sessions = dest.sessions()
            assert len(sessions) <= 4, f"{len(sessions)} sessions for {n} messages"
            assert max(len(s.transactions) for s in sessions) >= n // 4
            daemon.wait_log("Delivered", count=n, domain="dest.test")
        finally:
            daemon.stop()


# --- require_tls -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsmasqServer]:
    records = DnsRecords(hosts={"mx.tls.test": ["127.0.0.1"], "mx.badtls.test": ["127.0.0.1"]})
    with dnsmasq(records, tmp_path_factory.mktemp("dnsmasq")) as server:
        yield server


def tls_peer(ca: trustme.CA, cert_name: str) -> ThreadedPeer:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(cert_name).configure_cert(ctx)
    return ThreadedPeer({"hostname": cert_name}, ssl_context=ctx)


def tls_daemon(
    tmp_path: Path, ca: trustme.CA, dns: DnsmasqServer, domain: str, mx: str, port: int
) -> Daemon:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return start_daemon(
        tmp_path,
        {domain: {"mx_override": f"{mx}:{port}", "require_tls": True}},
        env={"SSL_CERT_FILE": str(ca_file)},
        dns={"nameservers": [dns.nameserver]},
    )


def test_require_tls_delivers_to_a_peer_with_a_valid_certificate(
    tmp_path: Path, ca: trustme.CA, tls_dns: DnsmasqServer
) -> None:
    with tls_peer(ca, "mx.tls.test") as dest:
        daemon = tls_daemon(tmp_path, ca, tls_dns, "tls.test", "mx.tls.test", dest.port)
        try:
            send_many(daemon.smtp_port, ["t@tls.test"])
            (txn,) = dest.wait_delivered(1)
            assert txn.tls
            assert ["t@tls.test"] == txn.recipients
            daemon.wait_log("Delivered", domain="tls.test")
        finally:
            daemon.stop()


def test_require_tls_defers_on_a_certificate_for_the_wrong_name(
    tmp_path: Path, ca: trustme.CA, tls_dns: DnsmasqServer
) -> None:
    with tls_peer(ca, "wrong.test") as dest:
        daemon = tls_daemon(tmp_path, ca, tls_dns, "badtls.test", "mx.badtls.test", dest.port)
        try:
            send_many(daemon.smtp_port, ["t@badtls.test"])
            (deferred,) = daemon.wait_log("Delivery deferred", domain="badtls.test")
            assert "certificate" in deferred["fields"]["error"].lower()
            assert 1 <= len(dest.sessions())  # it connected, and refused to go on
            assert [] == dest.transactions()
            assert [] == daemon.logs("Delivery failed permanently")
        finally:
            daemon.stop()
