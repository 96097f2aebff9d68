"""Inbound SMTP against real clients over loopback (smtplib, raw sockets, swaks, smtp-source).

The server (SmtpServerGroup + MemorySpool) runs on its own event loop in a
background thread (uvloop, as the daemon uses when installed; one test also runs
the default loop), so blocking clients can talk to it from the test thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
import uvloop

from empath.errors import ListenerBindError, SpoolError, SpoolFullError
from empath.smtp.replies import Reply, ReplyParser
from empath.smtp.server import RelayPolicy
from empath.spool.memory import MemorySpool
from empath.spool.model import MessageState
from empath.testing.clock import FakeClock
from empath.testing.settings import listener_spec
from empath.transport.listener import ListenerSpec, SmtpServerGroup
from tests.helpers import free_port, require_tool, wait_for

T = TypeVar("T")

RELAY = RelayPolicy(trusted_networks=("127.0.0.1/32",), accepted_domains=("accepted.example",))


def spec(**kw: Any) -> ListenerSpec:
    base = listener_spec(
        host="127.0.0.1",
        port=free_port(),
        hostname="mx.test",
        max_message_bytes=200_000,
        max_recipients=5,
        max_connections_per_ip=20,
        command_timeout_s=10,
        data_block_timeout_s=10,
    )
    return replace(base, **kw)


class ServerThread:
    """An SmtpServerGroup on a private event loop in a daemon thread."""

    def __init__(
        self,
        specs: list[ListenerSpec],
        relay: RelayPolicy = RELAY,
        *,
        use_uvloop: bool = True,
        spool: MemorySpool | None = None,
        clock: FakeClock | None = None,
    ) -> None:
        """With ``clock`` the listeners' timeouts run in virtual time (:meth:`advance`)."""
        self.loop = uvloop.new_event_loop() if use_uvloop else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.spool = spool if spool is not None else MemorySpool()
        self.accepted: list[MessageState] = []
        self.clock = clock
        self.group = SmtpServerGroup(specs, relay, self.spool, self.accepted.append, clock=clock)
        self.port = specs[0].port

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def advance(self, seconds: float) -> None:
        """Move the virtual clock on the server's loop and let it run what fell due."""
        clock = self.clock
        assert clock is not None, "advance() needs a ServerThread built with a FakeClock"
        self.call(clock.run_for(seconds))

    def advance_until_readable(self, sock: socket.socket, step_s: float) -> None:
        """Advance ``step_s`` at a time until the server has written to ``sock`` (bytes
        still in flight when a step runs count from after it: hence the repeats)."""
        for _ in range(50):
            self.advance(step_s)
            if select.select([sock], [], [], 0.1)[0]:
                return
        raise AssertionError("the server never answered")

    def start(self) -> None:
        self.thread.start()
        self.call(self.spool.open())
        self.call(self.group.start())

    def stop(self, grace_s: float = 2.0) -> None:
        with contextlib.suppress(Exception):
            self.call(self.group.shutdown(grace_s))
        self.call(self.spool.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def stored(self) -> list[tuple[MessageState, bytes]]:
        async def snapshot() -> list[tuple[MessageState, bytes]]:
            return [(m, await self.spool.read_body(m.id)) for m in self.spool.messages()]

        return self.call(snapshot())

    def smtp(self, **kw: Any) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=10, **kw)

    def assert_serving(self) -> None:
        """A fresh client can still send a message."""
        before = len(self.stored())
        with self.smtp() as c:
            c.sendmail("check@x.example", ["ok@accepted.example"], b"Subject: ok\r\n\r\nok\r\n")
        assert before + 1 == len(self.stored())


@contextlib.contextmanager
def serving(
    specs: list[ListenerSpec], relay: RelayPolicy = RELAY, **kw: Any
) -> Iterator[ServerThread]:
    srv = ServerThread(specs, relay, **kw)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def srv() -> Iterator[ServerThread]:
    with serving([spec()]) as s:
        yield s


class Raw:
    """A raw SMTP client socket: send bytes, read whole replies."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0)
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = ReplyParser()
        self.pending: list[Reply] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies(self, n: int) -> list[Reply]:
        while len(self.pending) < n:
            data = self.sock.recv(65536)
            if not data:
                break
            self.pending += self.parser.feed(data)
        got, self.pending = self.pending[:n], self.pending[n:]
        return got

    def codes(self, n: int) -> list[int]:
        return [r.code for r in self.replies(n)]

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


# --- happy paths ------------------------------------------------------------------


def test_smtplib_several_recipients_stored_byte_exact_with_received_header(
    srv: ServerThread,
) -> None:
    """Every recipient lands in the envelope (units per domain) and the body is stored
    dot-unstuffed, byte-exact, after our Received: header."""
    body = b"Subject: hello\r\n\r\n.leading dot\r\nline two\r\n..\r\n"
    with srv.smtp() as c:
        refused = c.sendmail(
            "alice@x.example", ["b1@y.example", "b2@y.example", "c@z.example"], body
        )
    assert {} == refused
    ((msg, stored),) = srv.stored()
    assert ("alice@x.example", ("b1@y.example", "b2@y.example", "c@z.example")) == (
        msg.envelope.sender,
        msg.envelope.recipients,
    )
    assert ["y.example", "z.example"] == [u.domain for u in msg.units]
    assert stored.startswith(b"Received: from ")
    assert f"(Empath) with ESMTP id {msg.id};".encode() in stored
    assert stored.endswith(b"\r\n\r\n" + body.split(b"\r\n\r\n", 1)[1])
    trace, _, rest = stored.partition(b"\r\nSubject:")
    assert b"Subject:" + rest == body
    assert 3 == trace.count(b"\r\n") + 1  # the Received: header is folded over 3 lines
    assert [msg.id] == [m.id for m in srv.accepted]
    assert 1 == srv.group.stats[spec_label(srv)].messages_received


def spec_label(srv: ServerThread) -> str:
    return f"127.0.0.1:{srv.port}"


def test_smtputf8_and_8bitmime(srv: ServerThread) -> None:
    """UTF-8 addresses with SMTPUTF8 and an 8-bit body with BODY=8BITMIME are accepted
    and recorded in the envelope."""
    body = "Subject: héllo\r\n\r\nÜnïcödé bödy\r\n".encode()
    with srv.smtp() as c:
        c.sendmail("José@exämple.example", ["pélé@accepted.example"], body,
                   mail_options=["SMTPUTF8", "BODY=8BITMIME"])  # fmt: skip
    ((msg, stored),) = srv.stored()
    assert ("José@exämple.example", ("pélé@accepted.example",)) == (
        msg.envelope.sender,
        msg.envelope.recipients,
    )
    assert (True, True) == (msg.envelope.smtputf8, msg.envelope.body_8bit)
    assert stored.endswith(body)
    assert b"with UTF8SMTP id" in stored


def test_utf8_address_without_smtputf8_is_refused(srv: ServerThread) -> None:
    """Without the SMTPUTF8 parameter a non-ASCII address is refused (553 5.6.7)."""
    with Raw(srv.port) as r:
        r.send("EHLO c\r\nMAIL FROM:<josé@x.example>\r\n".encode())
        assert [220, 250, 553] == r.codes(3)


def test_pipelined_rcpts_in_one_write(srv: ServerThread) -> None:
    """A whole pipelined transaction in one segment gets every reply, in order."""
    with Raw(srv.port) as r:
        r.send(
            b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<r1@y.example>\r\n"
            b"RCPT TO:<r2@y.example>\r\nRCPT TO:<r3@w.example>\r\nDATA\r\n"
        )
        assert [220, 250, 250, 250, 250, 250, 354] == r.codes(7)
        r.send(b"Subject: p\r\n\r\npipelined\r\n.\r\nQUIT\r\n")
        assert [250, 221] == r.codes(2)
    ((msg, _),) = srv.stored()
    assert ("r1@y.example", "r2@y.example", "r3@w.example") == msg.envelope.recipients


def test_commands_and_body_split_one_byte_per_write(srv: ServerThread) -> None:
    """Every byte in its own TCP write still makes one correct transaction."""
    wire = (
        b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<r@y.example>\r\nDATA\r\n"
        b"Subject: s\r\n\r\n..dot\r\nend\r\n.\r\nQUIT\r\n"
    )
    with Raw(srv.port) as r:
        for i in range(len(wire)):
            r.send(wire[i : i + 1])
        assert [220, 250, 250, 250, 354, 250, 221] == r.codes(7)
    ((_, stored),) = srv.stored()
    assert stored.endswith(b"Subject: s\r\n\r\n.dot\r\nend\r\n")


def test_swaks_pipeline(srv: ServerThread) -> None:
    """swaks --pipeline delivers a message."""
    swaks = require_tool("swaks")
    out = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{srv.port}", "--from", "a@x.example",
         "--to", "b@y.example,c@y.example", "--pipeline", "--body", "hello from swaks"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert 0 == out.returncode, out.stdout + out.stderr
    ((msg, stored),) = srv.stored()
    assert ("b@y.example", "c@y.example") == msg.envelope.recipients
    assert b"hello from swaks" in stored


def test_bdat_session(srv: ServerThread) -> None:
    """A raw CHUNKING session: exact byte counts, CRLF split across chunks, LAST commits."""
    with Raw(srv.port) as r:
        r.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n")
        assert [220, 250, 250, 250] == r.codes(4)
        one, two = b"Subject: b\r\n\r\nA\r", b"\n.dot\r\n\r\n"
        r.send(b"BDAT %d\r\n%s" % (len(one), one))
        assert [250] == r.codes(1)
        r.send(b"BDAT %d LAST\r\n%sNOOP\r\n" % (len(two), two))
        replies = r.replies(2)
        assert [250, 250] == [x.code for x in replies]
        assert "queued as" in replies[0].text
    ((_, stored),) = srv.stored()
    assert stored.endswith(b"Subject: b\r\n\r\nA\r\n.dot\r\n\r\n")


def test_default_asyncio_loop_works_too() -> None:
    """The transport runs on the default asyncio loop as well as on uvloop."""
    with serving([spec()], use_uvloop=False) as s:
        s.assert_serving()
        with Raw(s.port) as r:
            r.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
            assert [220, 250, 250, 250, 354] == r.codes(5)
            r.send(b"x\r\n.\r\n")
            assert [250] == r.codes(1)


# --- relay control ----------------------------------------------------------------


def test_relay_denied_from_untrusted_address_but_accepted_domain_allowed(
    srv: ServerThread,
) -> None:
    """From 127.0.0.2 (not in trusted 127.0.0.1/32): other domains get 554 5.7.1, the
    accepted domain (any case) is taken."""
    with Raw(srv.port, source="127.0.0.2") as r:
        r.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<victim@elsewhere.example>\r\n")
        got = r.replies(4)
        assert (554, "5.7.1") == (got[3].code, got[3].enhanced)
        assert "Relay access denied" in got[3].text
        r.send(b"RCPT TO:<local@Accepted.EXAMPLE>\r\nDATA\r\nhi\r\n.\r\n")
        assert [250, 354, 250] == r.codes(3)
    ((msg, _),) = srv.stored()
    assert ("local@Accepted.EXAMPLE",) == msg.envelope.recipients
    srv.assert_serving()


# --- limits -------------------------------------------------------------------------


def test_command_line_too_long(srv: ServerThread) -> None:
    """A command over 512 octets: 500 5.5.2, and the session continues."""
    with Raw(srv.port) as r:
        r.send(b"EHLO c\r\nNOOP " + b"x" * 2000 + b"\r\nNOOP\r\n")
        got = r.replies(4)
        assert [(500, "5.5.2"), (250, "2.0.0")] == [(x.code, x.enhanced) for x in got[2:]]
    srv.assert_serving()


def test_data_line_too_long(srv: ServerThread) -> None:
    """A content line over 1000 octets: 500 5.5.2 after the data, nothing stored."""
    with Raw(srv.port) as r:
        r.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
        r.send(b"x" * 1500 + b"\r\n.\r\nNOOP\r\n")
        got = r.replies(7)
        assert [(500, "5.5.2"), (250, "2.0.0")] == [(x.code, x.enhanced) for x in got[5:]]
    assert [] == srv.stored()
    srv.assert_serving()


def test_too_many_recipients(srv: ServerThread) -> None:
    """Recipients beyond max_recipients get 452 4.5.3; the message goes to the first ones."""
    with Raw(srv.port) as r:
        rcpts = b"".join(b"RCPT TO:<r%d@y.example>\r\n" % i for i in range(7))
        r.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\n" + rcpts)
        got = r.replies(10)
        assert [250] * 5 + [452] * 2 == [x.code for x in got[3:]]
        assert "4.5.3" == got[-1].enhanced
        r.send(b"DATA\r\nx\r\n.\r\n")
        assert [354, 250] == r.codes(2)
    ((msg, _),) = srv.stored()
    assert 5 == len(msg.envelope.recipients)
    srv.assert_serving()


def test_declared_size_exceeded(srv: ServerThread) -> None:
    """MAIL FROM ... SIZE= over the limit: 552 5.3.4 at once."""
    with Raw(srv.port) as r:
        r.send(b"EHLO c\r\nMAIL FROM:<a@x.example> SIZE=200001\r\n")
        got = r.replies(3)
        assert (552, "5.3.4") == (got[2].code, got[2].enhanced)
    srv.assert_serving()


def test_actual_size_exceeded(srv: ServerThread) -> None:
    """A body bigger than the limit is drained to its end, then 552 5.3.4; nothing stored."""
    with Raw(srv.port) as r:
        r.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
        assert [220, 250, 250, 250, 354] == r.codes(5)
        line = b"y" * 998 + b"\r\n"
        for _ in range(300):
            r.send(line)
        r.send(b".\r\nNOOP\r\n")
        got = r.replies(2)
        assert [(552, "5.3.4"), (250, "2.0.0")] == [(x.code, x.enhanced) for x in got]
    assert [] == srv.stored()
    srv.assert_serving()


def test_ten_bad_commands_get_421_and_close(srv: ServerThread) -> None:
    """After 10 bad commands the server says 421 4.7.0 and hangs up."""
    with Raw(srv.port) as r:
        r.send(b"EHLO c\r\n" + b"FOO\r\n" * 10)
        got = r.replies(12)
        assert [500] * 9 + [421] == [x.code for x in got[2:]]
        assert "4.7.0" == got[-1].enhanced
        assert r.closed_by_server()
    srv.assert_serving()


def test_idle_timeout_gets_421() -> None:
    """A silent client is told 421 4.4.2 and disconnected; others are still served.
    (Virtual time: the listener's sweeper runs on a FakeClock.)"""
    with serving([spec(command_timeout_s=30)], clock=FakeClock()) as s:
        with Raw(s.port) as r:
            assert [220] == r.codes(1)
            s.advance(29)
            assert 0 == s.group.stats[spec_label(s)].sessions_errored  # not yet
            s.advance(2)
            got = r.replies(1)
            assert [(421, "4.4.2")] == [(x.code, x.enhanced) for x in got]
            assert r.closed_by_server()
        s.assert_serving()
        assert 1 == s.group.stats[spec_label(s)].sessions_errored


def test_per_ip_connection_cap() -> None:
    """Past max_connections_per_ip the next connection gets 421 4.7.0; the others work."""
    with serving([spec(max_connections_per_ip=2)]) as s:
        with Raw(s.port) as a, Raw(s.port) as b:
            assert [220] == a.codes(1)
            assert [220] == b.codes(1)
            with Raw(s.port) as c:
                got = c.replies(1)
                assert [(421, "4.7.0")] == [(x.code, x.enhanced) for x in got]
                assert c.closed_by_server()
            a.send(b"NOOP\r\n")
            assert [250] == a.codes(1)
        wait_for(lambda: s.group.stats[spec_label(s)].connections_active == 0, 5)
        s.assert_serving()


def test_total_connection_cap() -> None:
    """Past max_connections the next connection gets 421 4.7.0."""
    with serving([spec(max_connections=1)]) as s, Raw(s.port) as a:
        assert [220] == a.codes(1)
        with Raw(s.port) as b:
            assert [421] == b.codes(1)


# --- smuggling -------------------------------------------------------------------------

SMUGGLING = {
    "bare LF": b"hello\nworld\r\n",
    "bare CR": b"hello\rworld\r\n",
    "LF.LF": b"hello\n.\nMAIL FROM:<evil@x.example>\r\n",
    "CR.CR": b"hello\r.\rMAIL FROM:<evil@x.example>\r\n",
    "LF.CRLF": b"hello\n.\r\nMAIL FROM:<evil@x.example>\r\n",
    "CRLF.LF": b"hello\r\n.\nMAIL FROM:<evil@x.example>\r\n",
    "NUL": b"hel\0lo\r\n",
}


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_smuggling_inputs_are_rejected_and_never_stored(srv: ServerThread, name: str) -> None:
    """Fake end-of-data sequences do not end DATA: after the real <CRLF>.<CRLF> the
    message gets 550 5.6.0, nothing is stored, and the session goes on normally."""
    with Raw(srv.port) as r:
        r.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
        assert [220, 250, 250, 250, 354] == r.codes(5)
        r.send(b"Subject: s\r\n\r\n" + SMUGGLING[name] + b"tail\r\n.\r\nNOOP\r\n")
        got = r.replies(2)
        assert [(550, "5.6.0"), (250, "2.0.0")] == [(x.code, x.enhanced) for x in got]
    assert [] == srv.stored()


# --- spool errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code", "enhanced"),
    [(SpoolFullError("disk full"), 452, "4.3.1"), (SpoolError("EIO"), 451, "4.3.0")],
)
def test_spool_failure_gives_temporary_error(
    srv: ServerThread, exc: Exception, code: int, enhanced: str
) -> None:
    """A spool that cannot commit yields 452 4.3.1 (full) or 451 4.3.0, stores nothing,
    and the next message is accepted again."""
    srv.spool.fail_next_commit(exc)
    with Raw(srv.port) as r:
        r.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\nx\r\n.\r\n")
        got = r.replies(6)
        assert (code, enhanced) == (got[5].code, got[5].enhanced)
        r.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\nx\r\n.\r\n")
        assert [250, 250, 354, 250] == r.codes(4)
    assert 1 == len(srv.stored())


# --- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    path = tmp_path_factory.mktemp("tls") / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(path))
    return ca, path


def test_starttls_with_trustme_certificate(tls_files: tuple[trustme.CA, Path]) -> None:
    """STARTTLS is advertised with a certificate, the handshake verifies against the CA,
    EHLO after TLS no longer offers STARTTLS, and the Received: line says ESMTPS."""
    ca, pem = tls_files
    with serving([spec(tls_cert=str(pem), tls_key=str(pem))]) as s:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with s.smtp() as c:
            c.ehlo()
            assert c.has_extn("starttls")
            c.starttls(context=ctx)
            c.ehlo()
            assert not c.has_extn("starttls")
            c.sendmail("a@x.example", ["b@y.example"], b"Subject: tls\r\n\r\nsecret\r\n")
        ((_, stored),) = s.stored()
        assert b"with ESMTPS id" in stored
        s.assert_serving()


def test_swaks_tls(tls_files: tuple[trustme.CA, Path]) -> None:
    """swaks --tls completes a session."""
    swaks = require_tool("swaks")
    _, pem = tls_files
    with serving([spec(tls_cert=str(pem), tls_key=str(pem))]) as s:
        out = subprocess.run(
            [swaks, "--server", f"127.0.0.1:{s.port}", "--from", "a@x.example",
             "--to", "b@y.example", "--tls", "--body", "tls body"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert 0 == out.returncode, out.stdout + out.stderr
        assert 1 == len(s.stored())


def test_failed_tls_handshake_does_not_hurt_others(tls_files: tuple[trustme.CA, Path]) -> None:
    """Garbage instead of a ClientHello ends that session only."""
    _, pem = tls_files
    with serving([spec(tls_cert=str(pem), tls_key=str(pem))]) as s:
        with Raw(s.port) as r:
            r.send(b"EHLO c\r\nSTARTTLS\r\n")
            assert [220, 250, 220] == r.codes(3)
            r.send(b"this is not TLS\r\n" * 20)
            assert r.closed_by_server()
        s.assert_serving()


# --- lifecycle ----------------------------------------------------------------------------


def test_shutdown_sends_421_to_idle_sessions_and_lets_data_finish() -> None:
    """Shutdown: idle sessions get 421 4.3.2; a session in DATA finishes its message
    (250) and then gets 421."""
    s = ServerThread([spec()])
    s.start()
    try:
        with Raw(s.port) as idle, Raw(s.port) as busy:
            idle.send(b"EHLO c\r\n")
            assert [220, 250] == idle.codes(2)
            busy.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
            assert [220, 250, 250, 250, 354] == busy.codes(5)
            busy.send(b"Subject: in flight\r\n\r\npart one\r\n")
            stopping = asyncio.run_coroutine_threadsafe(s.group.shutdown(10), s.loop)
            got = idle.replies(1)
            assert [(421, "4.3.2")] == [(x.code, x.enhanced) for x in got]
            assert idle.closed_by_server()
            busy.send(b"part two\r\n.\r\n")
            assert [250, 421] == busy.codes(2)
            stopping.result(10)
        ((_, stored),) = s.stored()
        assert stored.endswith(b"part one\r\npart two\r\n")
        assert not s.group.bound
    finally:
        s.stop()


def test_port_already_taken_is_a_clear_error() -> None:
    """Starting a listener on a port in use raises ListenerBindError naming the address."""
    with serving([spec()]) as s:
        other = ServerThread([spec(port=s.port)])
        other.thread.start()
        try:
            with pytest.raises(ListenerBindError, match=str(s.port)):
                other.call(other.group.start())
            assert not other.group.bound
        finally:
            other.stop()


def test_smtp_source_load_every_250_is_stored(srv: ServerThread) -> None:
    """Postfix smtp-source, 20 sessions: every message is stored with its Received: header."""
    tool = require_tool("smtp-source")
    started = time.monotonic()
    out = subprocess.run(
        [tool, "-s", "20", "-m", "2000", "-l", "1000", "-f", "a@x.example", "-t", "b@y.example",
         f"127.0.0.1:{srv.port}"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert 0 == out.returncode, out.stderr
    stored = srv.stored()
    assert 2000 == len(stored), f"{len(stored)} stored in {elapsed:.1f}s"
    assert all(body.startswith(b"Received: from ") for _, body in stored)
    stats = srv.group.stats[spec_label(srv)]
    assert (2000, 0) == (stats.messages_received, stats.sessions_errored)


def test_audit_line_per_accepted_message(
    srv: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """Each accepted message logs one audit INFO line "Message received" with its id,
    sender, recipient count, size and peer (component smtp)."""
    caplog.set_level("INFO", logger="empath")
    with srv.smtp() as c:
        c.sendmail("a@x.example", ["b@y.example", "c@y.example"], b"Subject: a\r\n\r\nx\r\n")
    ((msg, _),) = srv.stored()
    (rec,) = [r for r in caplog.records if r.getMessage() == "Message received"]
    fields = rec.empath_fields  # type: ignore[attr-defined]
    assert (True, "smtp", msg.id, "a@x.example", 2, msg.envelope.size) == (
        fields["audit"], fields["component"], fields["message_id"], fields["sender"],
        fields["recipients"], fields["size"],
    )  # fmt: skip
    assert fields["peer"].startswith("127.0.0.1:")


class RecordingSpool(MemorySpool):
    """MemorySpool that remembers its body writers (to watch streaming)."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: list[Any] = []

    def begin(self) -> Any:
        writer = super().begin()
        self.writers.append(writer)
        return writer


def test_data_is_streamed_to_the_spool_before_end_of_data() -> None:
    """Body bytes reach the spool's BodyWriter while the client is still sending
    (DATA is streamed, not buffered whole)."""
    spool = RecordingSpool()
    s = ServerThread([spec(max_message_bytes=10_000_000)], spool=spool)
    s.start()
    try:
        with Raw(s.port) as r:
            r.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
            assert [220, 250, 250, 250, 354] == r.codes(5)
            chunk = (b"z" * 98 + b"\r\n") * 1000
            for _ in range(30):
                r.send(chunk)
            wait_for(lambda: spool.writers and spool.writers[0].size >= 2_900_000, 10)
            r.send(b".\r\n")
            assert [250] == r.codes(1)
        ((_, stored),) = s.stored()
        assert stored.endswith(chunk * 30)
    finally:
        s.stop()


def test_dual_stack_listener_serves_ipv4_and_ipv6() -> None:
    """A listener on [::] accepts both IPv4 and IPv6 clients (trusted ::1 and 127.0.0.1)."""
    port = free_port()
    relay = RelayPolicy(trusted_networks=("127.0.0.1/32", "::1/128"))
    with serving([spec(host="[::]", port=port)], relay) as s:
        for host in ("127.0.0.1", "::1"):
            with smtplib.SMTP(host, port, timeout=10) as c:
                c.sendmail("a@x.example", ["b@y.example"], b"Subject: v\r\n\r\nx\r\n")
        peers = sorted(m.envelope.peer.rsplit(":", 1)[0] for m, _ in s.stored())
        assert ["127.0.0.1", "[::1]"] == peers


def test_data_block_timeout() -> None:
    """A client that stalls inside DATA is cut off with 421 4.4.2 and nothing is stored."""
    timeouts = {"data_block_timeout_s": 60, "data_init_timeout_s": 60}
    with serving([spec(**timeouts)], clock=FakeClock()) as s:
        with Raw(s.port) as r:
            r.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
            assert [220, 250, 250, 250, 354] == r.codes(5)
            r.send(b"Subject: stalled\r\n\r\nhalf a mess")
            s.advance_until_readable(r.sock, 61)
            got = r.replies(1)
            assert [(421, "4.4.2")] == [(x.code, x.enhanced) for x in got]
            assert r.closed_by_server()
        assert [] == s.stored()
        s.assert_serving()
