"""TLS session resumption on the submission listeners (issue 18's handshake cost): a
mail program that reconnects offers the session (TLS 1.3 ticket) it got last time and
the daemon resumes it, skipping the certificate signature. Resumption only works when
every connection of a listener shares one server SSLContext (the ticket keys live in
it), so this also proves the context is built once per listener, not per session."""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Iterator

import pytest

from tests.sink import SmtpSink
from tests.submission import PASSWORD, Submission, make_submission


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


@pytest.fixture(scope="module")
def sub(tmp_path_factory: pytest.TempPathFactory, sink: SmtpSink) -> Iterator[Submission]:
    s = make_submission(tmp_path_factory.mktemp("submission-tls"), sink_port=sink.port)
    s.daemon.start()
    try:
        yield s
    finally:
        s.daemon.stop()


def _reply(conn: socket.socket | ssl.SSLSocket) -> bytes:
    """The last line of one (possibly multi-line) reply."""
    while True:
        line = _readline(conn)
        if line[3:4] != b"-":
            return line


def _readline(conn: socket.socket | ssl.SSLSocket) -> bytes:
    out = bytearray()
    while not out.endswith(b"\r\n"):
        chunk = conn.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {bytes(out)!r}")
        out += chunk
    return bytes(out)


def _expect(conn: socket.socket | ssl.SSLSocket, code: bytes) -> None:
    line = _reply(conn)
    assert line.startswith(code), line


def submit_once(
    sub: Submission, ctx: ssl.SSLContext, listener: str, session: ssl.SSLSession | None
) -> tuple[bool, ssl.SSLSession | None]:
    """One authenticated message over a fresh connection; (session reused?, session)."""
    port = sub.starttls_port if listener == "starttls" else sub.implicit_port
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn: socket.socket | ssl.SSLSocket = raw
    try:
        if listener == "implicit":
            conn = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        _expect(conn, b"220")
        conn.sendall(b"EHLO client.test\r\n")
        _expect(conn, b"250")
        if listener == "starttls":
            conn.sendall(b"STARTTLS\r\n")
            _expect(conn, b"220")
            conn = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
            conn.sendall(b"EHLO client.test\r\n")
            _expect(conn, b"250")
        assert isinstance(conn, ssl.SSLSocket)
        token = base64.b64encode(f"\0alice\0{PASSWORD}".encode())
        conn.sendall(b"AUTH PLAIN " + token + b"\r\n")
        _expect(conn, b"235")
        conn.sendall(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@sink.test>\r\nDATA\r\n")
        _expect(conn, b"250")
        _expect(conn, b"250")
        _expect(conn, b"354")
        conn.sendall(b"From: alice@example.org\r\nSubject: resumed\r\n\r\nhi\r\n.\r\n")
        _expect(conn, b"250")
        conn.sendall(b"QUIT\r\n")
        _expect(conn, b"221")
        # the TLS 1.3 tickets came after the handshake; they have been read by now
        return conn.session_reused is True, conn.session
    finally:
        conn.close()


@pytest.mark.parametrize("listener", ["starttls", "implicit"])
def test_a_reconnecting_client_resumes_its_tls_session_and_still_authenticates(
    sub: Submission, listener: str
) -> None:
    ctx = sub.client_context()
    reused, session = submit_once(sub, ctx, listener, None)
    assert not reused
    assert session is not None
    for _ in range(3):
        reused, session = submit_once(sub, ctx, listener, session)
        assert reused, "the daemon did not resume the TLS session it issued"


def test_the_daemon_issues_one_session_ticket_per_handshake(sub: Submission) -> None:
    # OpenSSL issues two by default; one is all a reconnecting mail program uses, and
    # each costs both ends CPU (transport/listener.py, _tls_context)
    ctx = sub.client_context()
    tickets: list[bytes] = []

    def seen(_conn: object, direction: str, _version: object, content_type: object,
             msg_type: object, data: bytes) -> None:  # fmt: skip
        if (
            direction == "read"
            and content_type == ssl._TLSContentType.HANDSHAKE  # type: ignore[attr-defined]
            and msg_type == ssl._TLSMessageType.NEWSESSION_TICKET  # type: ignore[attr-defined]
        ):
            tickets.append(data)

    ctx._msg_callback = seen  # type: ignore[attr-defined]
    with (
        socket.create_connection(("127.0.0.1", sub.implicit_port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        _expect(conn, b"220")  # the tickets come before the greeting
        conn.sendall(b"QUIT\r\n")
        _expect(conn, b"221")
    assert len(tickets) == 1


def test_the_test_certificate_is_ecdsa_p256_as_the_docs_recommend(sub: Submission) -> None:
    ctx = sub.client_context()
    with (
        socket.create_connection(("127.0.0.1", sub.implicit_port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    key = x509.load_der_x509_certificate(der).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
