"""Milters (DESIGN §14) against real software: rspamd's proxy worker in milter mode and
OpenDKIM signing, both started by the test on loopback; and a scripted milter that is
down, slow or hangs up mid-body, to hold ``on_error``."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.daemon import Daemon, RawSmtp, parked_overrides, read_spool
from tests.dnsmasq import DnsRecords, dnsmasq
from tests.helpers import free_port
from tests.integration.test_modules_python import metric
from tests.milters import Rspamd, ScriptedMilter, opendkim, packet, rspamd
from tests.sink import SmtpSink

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
HEADERS = (
    b"From: Alice <alice@origin.test>\r\nTo: bob@sink.test\r\n"
    b"Date: Mon, 07 Dec 2026 03:00:00 +0000\r\n"
)


def message(subject: bytes, body: bytes, msg_id: bytes) -> bytes:
    return (HEADERS + b"Subject: " + subject + b"\r\nMessage-ID: <" + msg_id
            + b"@origin.test>\r\n\r\n" + body + b"\r\n")  # fmt: skip


def milter(address: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "Milter", "name": name, "address": address, **extra}


@pytest.fixture(scope="module")
def rspamd_milter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rspamd]:
    with rspamd(tmp_path_factory.mktemp("rspamd")) as server:
        yield server


def test_rspamd_rejects_gtube_at_end_of_data_with_its_own_reply(
    tmp_path: Path, rspamd_milter: Rspamd
) -> None:
    """The GTUBE string: rspamd answers SMFIR_REPLYCODE at end of message; the client
    gets exactly that reply, nothing is spooled, the session goes on."""
    daemon = Daemon(
        tmp_path / "d",
        {**parked_overrides("sink.test"), "modules": [milter(rspamd_milter.address, "rspamd")]},
    )
    with daemon:
        with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
            client.ehlo()
            client.mail("alice@origin.test")
            client.rcpt("bob@sink.test")
            assert (554, b"5.7.1 Gtube pattern") == client.data(message(b"spam", GTUBE, b"g1"))
            assert 250 == client.noop()[0]
        assert 1 == metric(daemon, "empath_module_calls_total", module="rspamd",
                           hook="on_data", result="reject")  # fmt: skip
    assert {} == read_spool(daemon.spool_path).messages


def test_rspamd_accepts_a_clean_message_which_arrives_with_its_headers(
    tmp_path: Path, rspamd_milter: Rspamd
) -> None:
    """A clean message is relayed with the headers rspamd's milter_headers added."""
    with SmtpSink(dump=True) as sink:
        daemon = Daemon(tmp_path / "d", {
            "delivery": {"domains": {"sink.test": {"mx_override": f"127.0.0.1:{sink.port}"}}},
            "modules": [milter(rspamd_milter.address, "rspamd")],
        })  # fmt: skip
        with daemon:
            with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
                client.sendmail("alice@origin.test", ["bob@sink.test"],
                                message(b"hello", b"a clean body", b"c1"))  # fmt: skip
            sink.wait_messages(1, timeout=20)
            assert 1 == metric(daemon, "empath_module_calls_total", module="rspamd",
                               hook="on_data", result="accept")  # fmt: skip
        [got] = sink.messages()
    head = got.body.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nX-Spam-Status: No, score=" in head
    assert b"\r\nX-Spamd-Result: default: False [" in head
    assert b"\r\nX-Rspamd-Queue-Id: " in head
    assert got.body.endswith(b"\r\n\r\na clean body\r\n")


def _txt_resolver(nameserver: str) -> Any:
    host, port = nameserver.rsplit(":", 1)

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        query = dns.message.make_query(name.decode().rstrip("."), dns.rdatatype.TXT)
        answer = dns.query.udp(query, host, port=int(port), timeout=timeout)
        for rrset in answer.answer:
            for rr in rrset:
                return b"".join(rr.strings)
        return None

    return lookup


def test_opendkim_signs_and_the_signature_verifies_against_the_published_key(
    tmp_path: Path,
) -> None:
    """OpenDKIM as a signing milter: the relayed message carries its DKIM-Signature,
    which dkimpy verifies with the key dnsmasq publishes."""
    with opendkim(tmp_path / "dkim", "origin.test", "s1") as signer, SmtpSink(dump=True) as sink:
        records = DnsRecords(zones=("origin.test",),
                             txt={"s1._domainkey.origin.test": [signer.txt]})  # fmt: skip
        with dnsmasq(records, tmp_path) as dns_server:
            daemon = Daemon(tmp_path / "d", {
                "delivery": {"domains": {"sink.test": {"mx_override": f"127.0.0.1:{sink.port}"}}},
                "modules": [milter(signer.address, "opendkim")],
            })  # fmt: skip
            with daemon:
                with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
                    client.sendmail("alice@origin.test", ["bob@sink.test"],
                                    message(b"signed", b"sign me\r\nplease", b"d1"))  # fmt: skip
                sink.wait_messages(1, timeout=20)
            [got] = sink.messages()
            assert b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=origin.test;" in (
                got.body.replace(b"\r\n\t", b" ")
            ), got.body[:600]
            assert dkim.verify(got.body, dnsfunc=_txt_resolver(dns_server.nameserver))


# --- a milter that fails -----------------------------------------------------------------


def _one_message(daemon: Daemon) -> tuple[int, bytes]:
    with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
        client.ehlo()
        code, text = client.mail("alice@origin.test")
        if code != 250:
            assert 250 == client.rset()[0]  # the session goes on
            return code, text
        client.rcpt("bob@sink.test")
        code, text = client.data(message(b"m", b"a body line of a long message\r\n" * 5000, b"f1"))
        assert 250 == client.noop()[0]  # the session goes on
        return code, text


def test_a_milter_that_is_down_tempfails_mail_and_nothing_is_spooled(tmp_path: Path) -> None:
    closed = free_port()
    daemon = Daemon(
        tmp_path / "d",
        {**parked_overrides("sink.test"), "modules": [milter(f"inet:127.0.0.1:{closed}", "down")]},
    )
    with daemon:
        assert (451, b"4.7.1 Service temporarily unavailable, try again later") == (
            _one_message(daemon))  # fmt: skip
        assert 1 == metric(daemon, "empath_milter_errors_total", milter="down", kind="connect")
        assert 1 == metric(daemon, "empath_module_calls_total", module="down",
                           hook="on_mail_from", result="error")  # fmt: skip
    assert {} == read_spool(daemon.spool_path).messages


def test_a_milter_down_with_on_error_accept_lets_mail_through(tmp_path: Path) -> None:
    closed = free_port()
    daemon = Daemon(tmp_path / "d", {**parked_overrides("sink.test"), "modules": [
        milter(f"inet:127.0.0.1:{closed}", "down", on_error="accept")]})  # fmt: skip
    with daemon:
        code, _ = _one_message(daemon)
        assert 250 == code
    assert 1 == len(read_spool(daemon.spool_path).messages)


def test_a_slow_milter_past_its_end_of_message_timeout_tempfails_the_message(
    tmp_path: Path,
) -> None:
    with ScriptedMilter(eom_delay_s=3.0) as slow:
        daemon = Daemon(tmp_path / "d", {**parked_overrides("sink.test"), "modules": [
            milter(slow.address, "slow", timeouts={"end_of_message_secs": 0.5})]})  # fmt: skip
        with daemon:
            assert (451, b"4.7.1 Service temporarily unavailable, try again later") == (
                _one_message(daemon))  # fmt: skip
            assert 1 == metric(daemon, "empath_milter_errors_total", milter="slow",
                               kind="timeout")  # fmt: skip
    assert {} == read_spool(daemon.spool_path).messages


def test_a_milter_closing_mid_body_rejects_with_on_error_reject(tmp_path: Path) -> None:
    with ScriptedMilter(close_on_body=True) as closing:
        daemon = Daemon(tmp_path / "d", {**parked_overrides("sink.test"), "modules": [
            milter(closing.address, "closer", on_error="reject")]})  # fmt: skip
        with daemon:
            assert (550, b"5.7.1 Message rejected by policy") == _one_message(daemon)
            assert 1 == metric(daemon, "empath_milter_errors_total", milter="closer",
                               kind="closed")  # fmt: skip
        assert b"B" in closing.commands
    assert {} == read_spool(daemon.spool_path).messages


def test_two_milters_run_in_order_and_see_each_others_changes(tmp_path: Path) -> None:
    """The first milter adds a header at end of message, the second sees it among the
    headers it is sent (as Postfix's smtpd_milters list)."""
    add = [packet(b"h", b"X-First\x00one\x00"), packet(b"c")]
    with ScriptedMilter(eom_replies=add) as first, ScriptedMilter() as second:
        daemon = Daemon(tmp_path / "d", {**parked_overrides("sink.test"), "modules": [
            milter(first.address, "first"), milter(second.address, "second")]})  # fmt: skip
        with daemon, RawSmtp(daemon.smtp_host, daemon.smtp_port) as raw:
            raw.reply()
            raw.send(b"EHLO c.test\r\nMAIL FROM:<alice@origin.test>\r\nRCPT TO:<bob@sink.test>\r\n"
                     b"DATA\r\n")  # fmt: skip
            assert [250, 250, 250, 354] == raw.codes(4)
            raw.send(message(b"m", b"x", b"o1") + b".\r\n")
            assert 250 == raw.reply()[0]
        assert first.commands.index(b"E") >= 0
        headers_seen_by_second = second.commands.count(b"L")
        assert headers_seen_by_second == first.commands.count(b"L") + 1


def test_a_milter_on_a_unix_socket_adds_its_header_to_the_spooled_message(
    tmp_path: Path,
) -> None:
    """``unix:/path`` milters work like ``inet:`` ones: the header the milter adds at end
    of message is in the spooled bytes."""
    reply = [packet(b"h", b"X-Unix-Milter\x00seen\x00"), packet(b"c")]
    with ScriptedMilter(eom_replies=reply, unix_path=str(tmp_path / "milter.sock")) as m:
        daemon = Daemon(tmp_path / "d", {**parked_overrides("sink.test"),
                                         "modules": [milter(m.address, "unix")]})  # fmt: skip
        with daemon, smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
            client.sendmail("alice@origin.test", ["bob@sink.test"], message(b"u", b"x", b"u1"))
    [body] = read_spool(daemon.spool_path).bodies.values()
    assert b"\r\nX-Unix-Milter: seen\r\n\r\nx\r\n" in body
