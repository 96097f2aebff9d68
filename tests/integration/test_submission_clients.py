"""Authenticated submission with real clients (DESIGN §13): swaks, smtplib and msmtp
through the STARTTLS (587-style) and implicit-TLS (465-style) listeners, delivered to
an smtp-sink; the refusals; sender ownership of the envelope and the header From."""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import queued_id
from tests.helpers import require_tool, wait_for
from tests.sink import SmtpSink
from tests.submission import PASSWORD, Submission, make_submission, plain_b64


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    with SmtpSink(dump=True) as s:
        yield s


@pytest.fixture(scope="module")
def sub(tmp_path_factory: pytest.TempPathFactory, sink: SmtpSink) -> Iterator[Submission]:
    s = make_submission(tmp_path_factory.mktemp("submission"), sink_port=sink.port)
    s.daemon.start()
    try:
        yield s
    finally:
        s.daemon.stop()


def message(sender: str, subject: str) -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: bob@sink.test\r\nSubject: {subject}\r\n\r\nhello\r\n"
    ).encode()


def delivered(sub: Submission, sink: SmtpSink, msg_id: str, subject: str) -> None:
    """The message reached the sink with an ESMTPSA Received: line, and the daemon's
    `Message received` line names the user."""
    sub.daemon.wait_log("Message received", message_id=msg_id, auth_user="alice")

    def arrived() -> bytes | None:
        for m in sink.messages():
            if f"Subject: {subject}".encode() in m.body:
                return m.body
        return None

    data = wait_for(arrived, timeout=20)
    assert data is not None
    assert f"with ESMTPSA id {msg_id}".encode() in data.replace(b"\r\n\t", b" ")


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("swaks"), *args], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


@pytest.mark.parametrize(
    ("mechanism", "listener"), [("PLAIN", "starttls"), ("LOGIN", "starttls"),
                                ("PLAIN", "implicit"), ("LOGIN", "implicit")],
)  # fmt: skip
def test_swaks_authenticates_and_the_message_is_delivered(
    sub: Submission, sink: SmtpSink, mechanism: str, listener: str
) -> None:
    """swaks --auth PLAIN/LOGIN with -tls on the STARTTLS port and --tlsc on the implicit
    one: 235, 250, delivered with ESMTPSA, logged with auth_user."""
    port = sub.starttls_port if listener == "starttls" else sub.implicit_port
    subject = f"swaks {mechanism} {listener}"
    out = swaks(
        "--server", f"127.0.0.1:{port}", "-tls" if listener == "starttls" else "--tlsc",
        "--auth", mechanism, "--auth-user", "alice", "--auth-password", PASSWORD,
        "--from", "alice@example.org", "--to", "bob@sink.test",
        "--header", f"Subject: {subject}", "--header", "From: alice@example.org",
    )  # fmt: skip
    assert 0 == out.returncode, out.stdout + out.stderr
    assert "235 2.7.0 Authentication successful" in out.stdout
    delivered(sub, sink, queued_id(out.stdout), subject)


@pytest.mark.parametrize("listener", ["starttls", "implicit"])
def test_smtplib_login_over_both_listeners(sub: Submission, sink: SmtpSink, listener: str) -> None:
    """Python's smtplib: starttls() + login() on one, SMTP_SSL + login() on the other."""
    subject = f"smtplib {listener}"
    ctx = sub.client_context()
    client: smtplib.SMTP
    if listener == "starttls":
        client = smtplib.SMTP("127.0.0.1", sub.starttls_port, timeout=30)
        client.starttls(context=ctx)
    else:
        client = smtplib.SMTP_SSL("127.0.0.1", sub.implicit_port, timeout=30, context=ctx)
    with client:
        assert 235 == client.login("alice", PASSWORD)[0]
        assert 250 == client.mail("alice@example.org")[0]
        assert 250 == client.rcpt("bob@sink.test")[0]
        code, text = client.data(message("alice@example.org", subject))
    assert 250 == code, text
    msg_id = queued_id(text)
    delivered(sub, sink, msg_id, subject)


@pytest.mark.parametrize("listener", ["starttls", "implicit"])
def test_msmtp_sends_through_both_listeners(
    sub: Submission, sink: SmtpSink, tmp_path: Path, listener: str
) -> None:
    """msmtp, a real mail client, with its own TLS and AUTH handling (verifying our
    certificate against the test CA)."""
    port = sub.starttls_port if listener == "starttls" else sub.implicit_port
    conf = tmp_path / "msmtprc"
    conf.write_text(
        "defaults\n"
        f"logfile {tmp_path / 'msmtp.log'}\n"
        "account sub\n"
        "host 127.0.0.1\n"
        f"port {port}\n"
        "tls on\n"
        f"tls_starttls {'on' if listener == 'starttls' else 'off'}\n"
        f"tls_trust_file {sub.ca_path}\n"
        "tls_host_override localhost\n"
        "auth on\n"
        "user alice\n"
        f"password {PASSWORD}\n"
        "from alice@example.org\n"
    )
    conf.chmod(0o600)
    subject = f"msmtp {listener}"
    out = subprocess.run(
        [require_tool("msmtp"), "-C", str(conf), "-a", "sub", "bob@sink.test"],
        input=message("alice@example.org", subject), capture_output=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert 0 == out.returncode, out.stdout + out.stderr
    log = (tmp_path / "msmtp.log").read_text()
    assert "smtpstatus=250" in log, log
    msg_id = queued_id(log)
    delivered(sub, sink, msg_id, subject)


# --- refusals --------------------------------------------------------------------------


def test_auth_before_starttls_is_refused(sub: Submission) -> None:
    """587-style listener: no AUTH in EHLO before TLS; AUTH anyway → 538 5.7.11."""
    with smtplib.SMTP("127.0.0.1", sub.starttls_port, timeout=30) as c:
        c.ehlo()
        assert not c.has_extn("auth")
        code, text = c.docmd("AUTH", "PLAIN " + plain_b64("alice", PASSWORD))
        assert (538, b"5.7.11") == (code, text[:6])
        c.starttls(context=sub.client_context())
        c.ehlo()
        assert "PLAIN LOGIN" == c.esmtp_features["auth"].strip()


def test_auth_on_a_listener_without_auth_is_503(sub: Submission) -> None:
    """The plain (port 25 style) listener neither advertises AUTH nor accepts it."""
    with smtplib.SMTP("127.0.0.1", sub.plain_port, timeout=30) as c:
        c.ehlo()
        assert not c.has_extn("auth")
        code, _ = c.docmd("AUTH", "PLAIN " + plain_b64("alice", PASSWORD))
        assert 503 == code


def test_mail_before_auth_is_530_and_relay_without_auth_denied(sub: Submission) -> None:
    """After STARTTLS but before AUTH, MAIL gets 530 5.7.0; on the plain listener, with an
    empty trusted_networks, relaying to sink.test is denied."""
    with smtplib.SMTP("127.0.0.1", sub.starttls_port, timeout=30) as c:
        c.starttls(context=sub.client_context())
        c.ehlo()
        code, text = c.mail("alice@example.org")
        assert (530, b"5.7.0 Authentication required") == (code, text)
    with smtplib.SMTP("127.0.0.1", sub.plain_port, timeout=30) as c:
        c.ehlo()
        assert 250 == c.mail("alice@example.org")[0]
        assert 554 == c.rcpt("bob@sink.test")[0]


def test_wrong_password_and_unknown_user_look_the_same(sub: Submission) -> None:
    """535 5.7.8 with the same words for both."""
    replies = []
    for user, password in (("alice", "wrong"), ("nobody", "wrong")):
        with smtplib.SMTP_SSL("127.0.0.1", sub.implicit_port, timeout=30,
                              context=sub.client_context()) as c:  # fmt: skip
            c.ehlo()
            replies.append(c.docmd("AUTH", "PLAIN " + plain_b64(user, password)))
    assert replies[0] == replies[1]
    assert (535, b"5.7.8 Authentication credentials invalid") == replies[0]


# --- sender ownership ----------------------------------------------------------------


def logged_in(sub: Submission) -> smtplib.SMTP_SSL:
    c = smtplib.SMTP_SSL("127.0.0.1", sub.implicit_port, timeout=30, context=sub.client_context())
    c.login("alice", PASSWORD)
    return c


def test_envelope_sender_not_owned_is_553(sub: Submission) -> None:
    """MAIL FROM another user's address → 553 5.7.1 naming the user."""
    with logged_in(sub) as c:
        code, text = c.mail("mallory@example.org")
    assert (553, b"5.7.1 Sender address not owned by alice") == (code, text)


def test_header_from_not_owned_is_550_at_end_of_data(sub: Submission) -> None:
    """An owned envelope but a header From: of someone else → 550 5.7.1 after the data;
    nothing is queued; a pattern match (*@alice.test) in both is accepted."""
    with logged_in(sub) as c:
        assert 250 == c.mail("alice@example.org")[0]
        assert 250 == c.rcpt("bob@sink.test")[0]
        code, text = c.data(message("ceo@example.org", "spoofed"))
        assert 550 == code and text.startswith(b"5.7.1 Sender address not owned by alice")
        assert 250 == c.mail("anything@alice.test")[0]
        assert 250 == c.rcpt("bob@sink.test")[0]
        code, text = c.data(message("other@alice.test", "pattern ok"))
        assert 250 == code, text
    sub.daemon.wait_log("Message refused by acceptance step", step="submission-from")
