"""Ingest through the real daemon (``python -m empath``) from real clients, checked in its spool.

Each test starts the daemon on a fresh spool, sends mail with one kind of client
(Python smtplib, a raw pipelining/CHUNKING socket client, swaks, Postfix
smtp-source), collects the queue ids from the ``250 2.0.0 Ok: queued as <ID>``
replies, stops the daemon and reopens the spool directory with ``FileSpool``:
every acknowledged id must be there, its body byte-exact (what the client meant
to send, i.e. after dot-unstuffing) behind our ``Received:`` header, its
envelope and initial delivery units right.  All recipients are in "parked"
domains (closed MX port, tiny rate limit) so nothing leaves the spool meanwhile.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from empath.spool.model import MessageState, UnitStatus
from tests.daemon import (
    Daemon,
    RawSmtp,
    SpoolContents,
    assert_stored,
    parked_overrides,
    queued_id,
    read_spool,
    split_received,
)
from tests.helpers import require_tool

PARKED = ("parked.test", "parked2.test")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "empath", overrides=parked_overrides(*PARKED))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def stop_and_read(d: Daemon) -> SpoolContents:
    assert 0 == d.stop(), d.log_tail()
    contents = read_spool(d.spool_path)
    assert 0 == contents.report.quarantined
    return contents


def assert_envelope(msg: MessageState, sender: str, recipients: tuple[str, ...]) -> None:
    assert (sender, recipients) == (msg.envelope.sender, msg.envelope.recipients)
    domains = sorted({r.rsplit("@", 1)[1].lower() for r in recipients})
    assert domains == sorted(u.domain for u in msg.units)
    assert sorted(recipients) == sorted(r.address for u in msg.units for r in u.recipients)
    # Nothing was delivered or bounced: parked units stay pending or wait for a retry.
    assert all(u.status in (UnitStatus.PENDING, UnitStatus.RETRY) for u in msg.units)


def smtplib_send(
    c: smtplib.SMTP, sender: str, rcpts: list[str], body: bytes, options: tuple[str, ...] = ()
) -> str:
    """One transaction via smtplib (which dot-stuffs `body`); the queue id from the DATA reply."""
    code, text = c.mail(sender, list(options))
    assert 250 == code, text
    for rcpt in rcpts:
        code, text = c.rcpt(rcpt)
        assert 250 == code, text
    code, text = c.data(body)
    assert 250 == code, text
    return queued_id(text)


def test_smtplib_recipients_smtputf8_8bitmime_and_dot_lines_are_stored_byte_exact(
    daemon: Daemon,
) -> None:
    """smtplib: several recipients over two domains, a dot-stuffed body, an SMTPUTF8
    sender/recipient with a UTF-8 body, and a BODY=8BITMIME latin-1 body: each acknowledged
    id is in the spool with the unstuffed body after a Received: header and its envelope."""
    dotted = (
        b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n. space\r\n"
        b"middle . dot\r\nlast line\r\n"
    )
    utf8 = "Subject: héllo wörld\r\nFrom: José <josé@parked.test>\r\n\r\nÜnïcödé ✓ 本文\r\n.ünï\r\n"
    latin1 = b"Subject: latin\r\n\r\ncaf\xe9 cr\xe8me br\xfbl\xe9e\r\n\xff\xfe\x80 high bytes\r\n"
    sent: dict[str, tuple[str, tuple[str, ...], bytes]] = {}
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=20) as c:
        c.ehlo("client.example")
        assert c.has_extn("smtputf8") and c.has_extn("8bitmime") and c.has_extn("pipelining")
        rcpts = ["a@parked.test", "B@Parked.Test", "c@parked2.test", "d@parked.test"]
        sent[smtplib_send(c, "s@parked.test", rcpts, dotted)] = (
            "s@parked.test", tuple(rcpts), dotted,
        )  # fmt: skip
        rcpts = ["pélé@parked.test", "ascii@parked2.test"]
        body = utf8.encode()
        sent[smtplib_send(c, "josé@parked.test", rcpts, body, ("SMTPUTF8", "BODY=8BITMIME"))] = (
            "josé@parked.test", tuple(rcpts), body,
        )  # fmt: skip
        sent[smtplib_send(c, "", ["r@parked2.test"], latin1, ("BODY=8BITMIME",))] = (
            "", ("r@parked2.test",), latin1,
        )  # fmt: skip
    assert 3 == len(sent)
    contents = stop_and_read(daemon)
    assert set(sent) == set(contents.messages)
    for msg_id, (sender, rcpts_sent, body) in sent.items():
        msg = assert_stored(contents, msg_id, body)
        assert_envelope(msg, sender, rcpts_sent)
        assert "client.example" == msg.envelope.helo
    flags = {
        sent[i][2]: (m.envelope.smtputf8, m.envelope.body_8bit)
        for i, m in contents.messages.items()
    }
    assert {dotted: (False, False), utf8.encode(): (True, True), latin1: (False, True)} == flags
    utf8_id = next(i for i, v in sent.items() if v[2] == utf8.encode())
    header, _ = split_received(contents.bodies[utf8_id])
    assert b"with UTF8SMTP id" in header


def test_pipelined_transactions_in_one_write_are_all_stored(daemon: Daemon) -> None:
    """A PIPELINING client writes EHLO, MAIL, many RCPTs and DATA in one segment, then two
    more whole transactions (MAIL..body..QUIT) in one segment: every reply comes in order
    and both messages are stored."""
    rcpts = [f"user{i}@parked.test" for i in range(12)] + ["x@parked2.test"]
    body1 = b"Subject: pipe 1\r\n\r\nfirst\r\n"
    body2 = b"Subject: pipe 2\r\n\r\nsecond\r\n.dot\r\n"
    with RawSmtp("127.0.0.1", daemon.smtp_port) as r:
        r.send(
            b"EHLO pipe.example\r\nMAIL FROM:<p@parked.test>\r\n"
            + b"".join(b"RCPT TO:<%s>\r\n" % a.encode() for a in rcpts)
            + b"DATA\r\n"
        )
        assert [220, 250, 250, *[250] * len(rcpts), 354] == r.codes(4 + len(rcpts))
        r.send(
            body1 + b".\r\n"
            b"MAIL FROM:<p@parked.test>\r\nRCPT TO:<y@parked2.test>\r\nDATA\r\n"
            + body2.replace(b"\r\n.", b"\r\n..")
            + b".\r\nQUIT\r\n"
        )
        (c1, t1), (c2, _), (c3, _), (c4, _), (c5, t5), (c6, _) = r.replies(6)
        assert [250, 250, 250, 354, 250, 221] == [c1, c2, c3, c4, c5, c6]
    id1, id2 = queued_id(t1), queued_id(t5)
    contents = stop_and_read(daemon)
    assert {id1, id2} == set(contents.messages)
    assert_envelope(assert_stored(contents, id1, body1), "p@parked.test", tuple(rcpts))
    assert_envelope(assert_stored(contents, id2, body2), "p@parked.test", ("y@parked2.test",))


def test_bdat_chunks_are_stored_verbatim(daemon: Daemon) -> None:
    """A raw CHUNKING session: three BDAT chunks (a CRLF split across two of them, lines
    starting with '.', which BDAT never stuffs), the last with LAST; then a second,
    pipelined BDAT transaction with a single chunk."""
    chunks = [
        b"Subject: bdat\r\nX-Raw: 1\r\n\r\n.not stuffed\r",
        b"\n..two dots stay two\r\n",
        b"\xc3\xa9 8-bit \xff\r\n.\r\nend\r\n",
    ]
    single = b"Subject: one chunk\r\n\r\nbody\r\n"
    with RawSmtp("127.0.0.1", daemon.smtp_port) as r:
        r.send(b"EHLO b\r\n")
        assert [220, 250] == r.codes(2)
        r.send(b"MAIL FROM:<b@parked.test> BODY=8BITMIME\r\nRCPT TO:<r@parked.test>\r\n")
        assert [250, 250] == r.codes(2)
        for chunk in chunks[:-1]:
            r.send(b"BDAT %d\r\n" % len(chunk) + chunk)
            assert 250 == r.reply()[0]
        r.send(b"BDAT %d LAST\r\n" % len(chunks[-1]) + chunks[-1])
        code, text = r.reply()
        assert 250 == code, text
        id1 = queued_id(text)
        r.send(
            b"MAIL FROM:<b@parked.test>\r\nRCPT TO:<q@parked2.test>\r\n"
            + b"BDAT %d LAST\r\n" % len(single)
            + single
            + b"QUIT\r\n"
        )
        (c1, _), (c2, _), (c3, t3), (c4, _) = r.replies(4)
        assert [250, 250, 250, 221] == [c1, c2, c3, c4]
        id2 = queued_id(t3)
    contents = stop_and_read(daemon)
    assert {id1, id2} == set(contents.messages)
    msg = assert_stored(contents, id1, b"".join(chunks))
    assert_envelope(msg, "b@parked.test", ("r@parked.test",))
    assert msg.envelope.body_8bit
    assert_envelope(assert_stored(contents, id2, single), "b@parked.test", ("q@parked2.test",))


def run_swaks(args: list[str]) -> subprocess.CompletedProcess[str]:
    swaks = require_tool("swaks")
    out = subprocess.run(
        [swaks, *args], capture_output=True, text=True, timeout=30, check=False
    )  # fmt: skip
    assert 0 == out.returncode, out.stdout + out.stderr
    return out


def test_swaks_pipeline_with_dot_lines(daemon: Daemon, tmp_path: Path) -> None:
    """swaks --pipeline sends MAIL and both RCPTs and DATA in one go, dot-stuffing our
    '.'-lines on the wire; the stored body is the unstuffed data."""
    data = b"Subject: swaks pipeline\r\nX-Test: 1\r\n\r\n.dot line\r\n..two\r\nend"
    data_file = tmp_path / "data.eml"
    data_file.write_bytes(data)
    out = run_swaks(
        ["--server", f"127.0.0.1:{daemon.smtp_port}", "--from", "sw@parked.test",
         "--to", "a@parked.test,b@parked2.test", "--pipeline", "--data", f"@{data_file}"]
    )  # fmt: skip
    assert " -> ..dot line" in out.stdout and " -> ...two" in out.stdout  # stuffed on the wire
    # Pipelined: swaks sends MAIL, RCPT, RCPT and DATA before reading any of their replies.
    assert re.search(r" -> MAIL FROM:.*\n -> RCPT TO:.*\n -> RCPT TO:.*\n -> DATA\n", out.stdout)
    msg_id = queued_id(out.stdout)
    contents = stop_and_read(daemon)
    assert [msg_id] == list(contents.messages)
    # swaks ends the data with a line break before the final dot.
    msg = assert_stored(contents, msg_id, data + b"\r\n")
    assert_envelope(msg, "sw@parked.test", ("a@parked.test", "b@parked2.test"))


@pytest.fixture
def tls_daemon(tmp_path: Path) -> Iterator[Daemon]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "empath.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    listener = {
        "extensions": [
            {"size": 10_000_000},
            {"starttls": {"certificate": str(cert_path), "key": str(key_path)}},
        ]
    }
    d = Daemon(tmp_path / "empath", overrides=parked_overrides(*PARKED), listener=listener)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def test_swaks_tls_with_trustme_certificate(tls_daemon: Daemon, tmp_path: Path) -> None:
    """STARTTLS is advertised with a configured trustme certificate; swaks --tls upgrades
    and sends two messages (one pipelined); both are stored with an ESMTPS Received: line."""
    data = b"Subject: over tls\r\n\r\n.secret\r\nline"
    data_file = tmp_path / "tls.eml"
    data_file.write_bytes(data)
    ids = []
    for extra in ([], ["--pipeline"]):
        out = run_swaks(
            ["--server", f"127.0.0.1:{tls_daemon.smtp_port}", "--from", "t@parked.test",
             "--to", "t@parked.test", "--tls", "--data", f"@{data_file}", *extra]
        )  # fmt: skip
        assert re.search(r"<-  250[- ]STARTTLS\n", out.stdout), out.stdout
        assert "=== TLS started" in out.stdout
        assert not re.search(r"<~  250[- ]STARTTLS", out.stdout)  # not offered again
        assert re.search(r"<~  250 2\.0\.0 Ok: queued as", out.stdout)  # inside TLS
        ids.append(queued_id(out.stdout))
    contents = stop_and_read(tls_daemon)
    assert set(ids) == set(contents.messages)
    for msg_id in ids:
        assert_envelope(
            assert_stored(contents, msg_id, data + b"\r\n"), "t@parked.test", ("t@parked.test",)
        )
        header, _ = split_received(contents.bodies[msg_id])
        assert b"with ESMTPS id" in header


def smtp_source_body(length: int) -> bytes:
    """The text `smtp-source -l length` sends: lines of 78 characters, each a digit (its
    number mod 10) then 'X's, and a shorter last line of 'X's only; `length` counts the
    line breaks between lines."""
    lines: list[bytes] = []
    left = length
    while left > 0:
        n = min(78, left)
        left -= n + 2
        number = str((len(lines) + 1) % 10).encode()
        lines.append(number + b"X" * (n - 1) if n == 78 else b"X" * n)
    return b"\r\n".join(lines) + b"\r\n"


def test_postfix_smtp_source_20_sessions_2000_messages(daemon: Daemon) -> None:
    """Postfix smtp-source with 20 parallel sessions and 2,000 messages of 1,000 bytes:
    it exits 0 (it aborts on any non-2xx reply) and the spool holds exactly 2,000 messages
    with the right envelope and the body it sends."""
    smtp_source = require_tool("smtp-source")
    out = subprocess.run(
        [smtp_source, "-s", "20", "-m", "2000", "-l", "1000", "-f", "s@parked.test",
         "-t", "r@parked.test", f"127.0.0.1:{daemon.smtp_port}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert 0 == out.returncode, out.stdout + out.stderr
    contents = stop_and_read(daemon)
    assert 2000 == len(contents.messages)
    text = smtp_source_body(1000)
    headers = re.compile(
        rb"From: <s@parked\.test>\r\nTo: <r@parked\.test>\r\nDate: [^\r\n]+\r\n"
        rb"Message-Id: <[^\r\n>]+>\r\n\r\n"
    )
    message_ids = set()
    for msg_id, msg in contents.messages.items():
        assert_envelope(msg, "s@parked.test", ("r@parked.test",))
        header, rest = split_received(contents.bodies[msg_id])
        assert f" id {msg_id}".encode() in header
        match = headers.match(rest)
        assert match is not None, rest[:200]
        assert text == rest[match.end() :]
        message_ids.add(rest[: match.end()])
    assert 2000 == len(message_ids)  # no message stored twice
