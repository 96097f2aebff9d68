"""The sans-I/O ESMTP server state machine."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.smtp.replies import Reply, ReplyParser
from empath.smtp.server import (
    BodyAbort,
    BodyChunk,
    BodyStart,
    Close,
    Event,
    MessageComplete,
    Phase,
    RelayPolicy,
    ServerConfig,
    SmtpServer,
    StartTls,
    Transaction,
    received_header,
)
from empath.testing.settings import server_config

CFG = server_config("mx.test", max_message_bytes=1000, max_recipients=3, tls_available=True)


class Harness:
    """Drives one SmtpServer; collects replies (parsed) and events, simulates the spool."""

    def __init__(self, cfg: ServerConfig = CFG, allowed: tuple[str, ...] = ("ok.example",)) -> None:
        self.server = SmtpServer(cfg, lambda d: d in allowed)
        self.parser = ReplyParser()
        self.events: list[Event] = []
        self.body = b""
        self.replies = self.parser.feed(self.server.data_to_send())

    def send(self, data: bytes, *, commit: bool = True) -> list[Reply]:
        got = self._drain(self.server.receive_data(data), commit)
        while self.server.has_backlog:  # the transport's call_soon loop, inline
            got += self._drain(self.server.proceed(), commit)
        return got

    def _drain(self, evs: list[Event], commit: bool) -> list[Reply]:
        got = self.parser.feed(self.server.data_to_send())
        for ev in evs:
            self.events.append(ev)
            if isinstance(ev, BodyStart):
                self.body = b""
            elif isinstance(ev, BodyChunk):
                self.body += ev.data
            elif isinstance(ev, MessageComplete) and commit:
                got += self._drain(self.server.message_committed("ID1"), commit)
        return got

    def codes(self, data: bytes) -> list[int]:
        return [r.code for r in self.send(data)]


def greeted() -> Harness:
    h = Harness()
    assert [250] == h.codes(b"EHLO client\r\n")
    return h


def test_greeting_and_ehlo_keywords() -> None:
    """220 <hostname> ESMTP Empath; EHLO lists the extensions (STARTTLS when available)."""
    h = Harness()
    assert [Reply(220, ("mx.test ESMTP Empath",))] == h.replies
    (ehlo,) = h.send(b"EHLO client.example\r\n")
    assert (
        "mx.test", "PIPELINING", "SIZE 1000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
        "CHUNKING", "STARTTLS",
    ) == ehlo.lines  # fmt: skip


def test_no_starttls_keyword_without_certificate() -> None:
    """STARTTLS is only advertised when TLS is configured."""
    h = Harness(server_config("mx.test", max_message_bytes=1000, max_recipients=3))
    (ehlo,) = h.send(b"EHLO c\r\n")
    assert "STARTTLS" not in ehlo.lines
    assert [454] == h.codes(b"STARTTLS\r\n")


def test_full_transaction_pipelined_in_one_read() -> None:
    """All commands of a transaction in one packet: replies in order, 250 after commit."""
    h = Harness()
    replies = h.send(
        b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@ok.example>\r\n"
        b"RCPT TO:<c@ok.example>\r\nDATA\r\nSubject: t\r\n\r\n..hi\r\n.\r\nQUIT\r\n"
    )
    assert [250, 250, 250, 250, 354, 250, 221] == [r.code for r in replies]
    assert "2.0.0 Ok: queued as ID1" == replies[5].text
    assert b"Subject: t\r\n\r\n.hi\r\n" == h.body
    (done,) = [e for e in h.events if isinstance(e, MessageComplete)]
    assert ("a@x.example", ("b@ok.example", "c@ok.example")) == (
        done.transaction.sender, done.transaction.recipients,
    )  # fmt: skip
    assert isinstance(h.events[-1], Close)


def test_commands_split_byte_by_byte() -> None:
    """Every command and the body may arrive one byte per read."""
    h = Harness()
    wire = (
        b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@ok.example>\r\nDATA\r\n"
        b"hello\r\n.\r\nQUIT\r\n"
    )
    codes: list[int] = []
    for i in range(len(wire)):
        codes += [r.code for r in h.send(wire[i : i + 1])]
    assert [250, 250, 250, 354, 250, 221] == codes
    assert b"hello\r\n" == h.body


def test_pipelined_input_waits_for_commit() -> None:
    """Nothing after the end of data is answered before the message's 250."""
    h = greeted()
    got = h.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@ok.example>\r\nDATA\r\nx\r\n.\r\nNOOP\r\n",
                 commit=False)  # fmt: skip
    assert [250, 250, 354] == [r.code for r in got]
    assert Phase.WAITING is h.server.phase
    assert [] == h.codes(b"RSET\r\n")
    after = h._drain(h.server.message_committed("ID9"), True)
    assert [250, 250, 250] == [r.code for r in after]
    assert "2.0.0 Ok: queued as ID9" == after[0].text


def test_spool_failure_reply_is_passed_through() -> None:
    """A failed commit answers with the reply the transport chose."""
    h = greeted()
    h.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@ok.example>\r\nDATA\r\nx\r\n.\r\n", commit=False)
    (reply,) = h._drain(h.server.message_failed(Reply.of(452, "4.3.1", "full")), True)
    assert (452, "4.3.1") == (reply.code, reply.enhanced)
    assert [250] == h.codes(b"MAIL FROM:<a@x.example>\r\n")


@pytest.mark.parametrize(
    ("script", "codes"),
    [
        (b"MAIL FROM:<a@x.example>\r\n", [503]),  # before EHLO
        (b"EHLO c\r\nRCPT TO:<b@ok.example>\r\n", [250, 503]),
        (b"EHLO c\r\nDATA\r\n", [250, 503]),
        (b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nDATA\r\n", [250, 250, 554]),
        (b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nMAIL FROM:<a@x.example>\r\n", [250, 250, 503]),
        (b"HELO c\r\nNOOP\r\nVRFY x\r\nHELP\r\nEXPN x\r\nRSET\r\n", [250, 250, 252, 214, 502, 250]),
        (
            b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@elsewhere.example>\r\n",
            [250, 250, 554],
        ),
        (b"EHLO c\r\nMAIL FROM:<a@x.example> SIZE=1001\r\n", [250, 552]),
        (b"EHLO c\r\nMAIL FROM:<a@x.example> SIZE=1000\r\n", [250, 250]),
        (
            b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRSET\r\nRCPT TO:<b@ok.example>\r\n",
            [250, 250, 250, 503],
        ),
        (b"EHLO c\r\nDATA x\r\n", [250, 503]),
        (b"EHLO c\r\nSTARTTLS x\r\n", [250, 501]),
    ],
)
def test_command_sequences(script: bytes, codes: list[int]) -> None:
    """RFC 5321 ordering, relay denial (554 5.7.1), declared size (552 5.3.4)."""
    assert codes == Harness().codes(script)


def test_relay_denied_reply_text() -> None:
    """Recipients in other domains from untrusted clients: 554 5.7.1 Relay access denied."""
    h = greeted()
    h.send(b"MAIL FROM:<a@x.example>\r\n")
    (reply,) = h.send(b"RCPT TO:<b@elsewhere.example>\r\n")
    assert Reply(554, ("5.7.1 Relay access denied",)) == reply


def test_too_many_recipients() -> None:
    """More than max_recipients: 452 4.5.3, the accepted ones still get the message."""
    h = greeted()
    h.send(b"MAIL FROM:<a@x.example>\r\n")
    rcpts = b"".join(b"RCPT TO:<r%d@ok.example>\r\n" % i for i in range(5))
    replies = h.send(rcpts)
    assert [250, 250, 250, 452, 452] == [r.code for r in replies]
    assert "4.5.3" == replies[3].enhanced
    assert [354, 250] == h.codes(b"DATA\r\nx\r\n.\r\n")


def test_command_line_too_long() -> None:
    """Command lines over 512 octets get 500 5.5.2 and the session goes on."""
    h = greeted()
    replies = h.send(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    assert [(500, "5.5.2"), (250, "2.0.0")] == [(r.code, r.enhanced) for r in replies]


def test_command_line_too_long_without_newline_is_bounded() -> None:
    """An endless line without LF is answered once and never buffered whole."""
    h = greeted()
    replies = []
    for _ in range(100):
        replies += h.send(b"x" * 1000)
    assert [500] == [r.code for r in replies]
    assert [250] == h.codes(b"\r\nNOOP\r\n")


def test_ten_bad_commands_close_the_session() -> None:
    """After 10 bad commands: 421 4.7.0 and close."""
    h = greeted()
    replies = h.send(b"BOGUS\r\n" * 12)
    assert [500] * 9 + [421] == [r.code for r in replies]
    assert "4.7.0" == replies[-1].enhanced
    assert isinstance(h.events[-1], Close)
    assert h.events[-1].error


def test_smuggled_message_is_refused_after_real_end() -> None:
    """<LF>.<LF> is not a terminator: the message ends at <CRLF>.<CRLF> with 550 5.6.0,
    nothing is committed, and the would-be smuggled command is never executed."""
    h = greeted()
    replies = h.send(
        b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@ok.example>\r\nDATA\r\n"
        b"hi\n.\nMAIL FROM:<evil@x.example>\r\n.\r\nNOOP\r\n"
    )
    assert [(250, ""), (250, ""), (354, ""), (550, "5.6.0"), (250, "")] == [
        (r.code, r.enhanced if r.code != 250 and r.code != 354 else "") for r in replies
    ]
    assert not any(isinstance(e, MessageComplete) for e in h.events)
    assert any(isinstance(e, BodyAbort) for e in h.events)


def test_oversize_data_is_drained_then_refused() -> None:
    """Actual size over the limit: read to the end, then 552 5.3.4."""
    h = greeted()
    body = b"x" * 80 + b"\r\n"
    replies = h.send(
        b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@ok.example>\r\nDATA\r\n"
        + body * 20
        + b".\r\nNOOP\r\n"
    )
    assert [250, 250, 354, 552, 250] == [r.code for r in replies]
    assert "5.3.4" == replies[3].enhanced


def test_data_line_too_long_is_refused() -> None:
    """A content line over 1000 octets: 500 5.5.2 after the end of data."""
    h = Harness(server_config("mx.test", max_message_bytes=1000, max_recipients=3))
    h.send(b"EHLO c\r\n")
    replies = h.send(
        b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@ok.example>\r\nDATA\r\n"
        + b"y" * 1200
        + b"\r\n.\r\n"
    )
    assert (500, "5.5.2") == (replies[-1].code, replies[-1].enhanced)


def test_bdat_transaction() -> None:
    """BDAT chunks of exact sizes; 250 per chunk, queued after LAST."""
    h = greeted()
    replies = h.send(
        b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@ok.example>\r\n"
        b"BDAT 5\r\nhel\r\nBDAT 4 LAST\r\nlo\r\nQUIT\r\n"
    )
    assert [250, 250, 250, 250, 221] == [r.code for r in replies]
    assert "2.0.0 Ok: queued as ID1" == replies[3].text
    assert b"hel\r\nlo\r\n" == h.body


def test_bdat_without_recipients_is_drained() -> None:
    """A refused BDAT chunk is still read (its bytes are not taken as commands)."""
    h = greeted()
    replies = h.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
    assert [503, 250] == [r.code for r in replies]


def test_bdat_then_data_is_out_of_sequence() -> None:
    """DATA inside a BDAT transaction is refused; RSET aborts the body."""
    h = greeted()
    codes = h.codes(
        b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@ok.example>\r\nBDAT 4\r\nab\r\nDATA\r\nRSET\r\n"
    )
    assert [250, 250, 250, 503, 250] == codes
    assert isinstance(h.events[-1], BodyAbort)


def test_starttls_discards_pipelined_plaintext_and_resets() -> None:
    """After 220 the transport starts TLS; input pipelined in clear is dropped and the
    client must EHLO again."""
    h = greeted()
    replies = h.send(b"STARTTLS\r\nMAIL FROM:<a@x.example>\r\n")
    assert [220] == [r.code for r in replies]
    assert isinstance(h.events[-1], StartTls)
    h.server.tls_started()
    assert [503] == h.codes(b"MAIL FROM:<a@x.example>\r\n")
    (ehlo,) = h.send(b"EHLO c\r\n")
    assert "STARTTLS" not in ehlo.lines
    assert [503] == h.codes(b"STARTTLS\r\n")


def test_shutdown_closes_idle_sessions_with_421() -> None:
    """Idle sessions get 421 4.3.2 at once."""
    h = greeted()
    evs = h.server.shutdown()
    (reply,) = h.parser.feed(h.server.data_to_send())
    assert (421, "4.3.2") == (reply.code, reply.enhanced)
    assert isinstance(evs[-1], Close)


def test_shutdown_lets_a_message_in_data_finish() -> None:
    """A session in DATA finishes its message, gets its 250, then 421 4.3.2."""
    h = greeted()
    h.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@ok.example>\r\nDATA\r\nabc")
    assert [] == h.server.shutdown()
    replies = h.send(b"\r\n.\r\nNOOP\r\n")
    assert [250, 421] == [r.code for r in replies]


def test_timeout_reply() -> None:
    """A timed-out session gets 421 4.4.2 and the open body is discarded."""
    h = greeted()
    h.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@ok.example>\r\nDATA\r\nabc")
    evs = h.server.timed_out()
    (reply,) = h.parser.feed(h.server.data_to_send())
    assert (421, "4.4.2") == (reply.code, reply.enhanced)
    assert [BodyAbort, Close] == [type(e) for e in evs]


@pytest.mark.parametrize(
    ("ip", "domain", "allowed"),
    [
        ("127.0.0.1", "anything.example", True),
        ("::1", "anything.example", True),
        ("::ffff:127.0.0.5", "anything.example", True),
        ("192.0.2.9", "anything.example", False),
        ("192.0.2.9", "Accepted.Example", True),
        ("192.0.2.9", "accepted.example.", True),
        ("192.0.2.9", "sub.accepted.example", False),
        ("not-an-ip", "anything.example", False),
    ],
)
def test_relay_policy(ip: str, domain: str, allowed: bool) -> None:
    """Trusted networks or accepted domains (case-insensitive), nothing else."""
    policy = RelayPolicy(("127.0.0.0/8", "::1/128"), ("accepted.example",))
    assert allowed == policy.allows(ip, domain)
    assert allowed == policy.for_client(ip)(domain)


def test_received_header_is_folded_crlf() -> None:
    """The Received: trace line names helo, IP, host, protocol, id and the single recipient."""
    txn = Transaction("a@x", ("b@y",), "client", smtputf8=False, body_8bit=False, esmtp=True,
                      tls=True)  # fmt: skip
    hdr = received_header(txn, client_ip="192.0.2.1", hostname="mx.test", msg_id="ID",
                          date="Mon, 1 Jan 2024 00:00:00 +0000")  # fmt: skip
    assert (
        b"Received: from client ([192.0.2.1])\r\n"
        b"\tby mx.test (Empath) with ESMTPS id ID\r\n\tfor <b@y>;\r\n"
        b"\tMon, 1 Jan 2024 00:00:00 +0000\r\n"
    ) == hdr


_tokens = st.sampled_from(
    [
        b"EHLO c\r\n", b"HELO c\r\n", b"MAIL FROM:<a@x.example>\r\n", b"RCPT TO:<b@ok.example>\r\n",
        b"RCPT TO:<b@no.example>\r\n", b"DATA\r\n", b"BDAT 3\r\n", b"BDAT 2 LAST\r\n", b"RSET\r\n",
        b"STARTTLS\r\n", b"NOOP\r\n", b".\r\n", b"\r\n", b"\n", b"\r", b".", b"\0", b"x" * 600,
    ]
)  # fmt: skip


@given(st.lists(_tokens | st.binary(max_size=20), max_size=40), st.integers(1, 50))
def test_server_never_raises_and_always_answers_valid_replies(
    parts: list[bytes], step: int
) -> None:
    """Random input in random splits: the state machine never raises, and everything it
    writes parses as well-formed SMTP replies."""
    server = SmtpServer(CFG, lambda d: d == "ok.example")
    parser = ReplyParser()
    wire = b"".join(parts)
    parser.feed(server.data_to_send())

    def handle(events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, MessageComplete):
                handle(server.message_committed("ID"))
            elif isinstance(ev, StartTls):
                handle(server.tls_started())

    for i in range(0, len(wire), step):
        handle(server.receive_data(wire[i : i + step]))
        parser.feed(server.data_to_send())
    assert not parser.pending
