"""SMTP AUTH (RFC 4954) in the sans-I/O server: PLAIN and LOGIN exchanges, where AUTH is
offered, what a grant allows and what the refusals look like."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.errors import SmtpProtocolError
from empath.smtp.replies import Reply, ReplyParser
from empath.smtp.sasl import (
    Challenge,
    Credentials,
    Mechanism,
    SaslExchange,
    UserGrant,
    sender_matches,
)
from empath.smtp.server import (
    AuthCheck,
    AuthOffer,
    Event,
    MessageComplete,
    ServerConfig,
    SmtpServer,
)
from empath.testing.settings import server_config

CFG = replace(
    server_config("mx.test", max_message_bytes=1000, max_recipients=5, tls_available=True),
    auth=AuthOffer(required=True, mechanisms=("PLAIN", "LOGIN")),
)
PASSWORDS = {"alice": "s3cret"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class AuthHarness:
    """One server; AuthCheck answered from PASSWORDS (as the transport would)."""

    def __init__(self, cfg: ServerConfig = CFG, *, tls: bool = True) -> None:
        self.server = SmtpServer(cfg, lambda d: d == "local.example", tls_active=tls)
        self.parser = ReplyParser()
        self.checked: list[Credentials] = []
        self.txns: list[MessageComplete] = []
        self.parser.feed(self.server.data_to_send())

    def send(self, data: bytes) -> list[Reply]:
        return self._drain(self.server.receive_data(data))

    def _drain(self, events: list[Event]) -> list[Reply]:
        got = self.parser.feed(self.server.data_to_send())
        for ev in events:
            if isinstance(ev, AuthCheck):
                creds = ev.credentials
                self.checked.append(creds)
                if PASSWORDS.get(creds.username) == creds.password:
                    grant = UserGrant(creds.username, ("alice@example.org", "*@alice.test"))
                    got += self._drain(self.server.auth_succeeded(grant))
                else:
                    bad = Reply.of(535, "5.7.8", "Authentication credentials invalid")
                    got += self._drain(self.server.auth_failed(bad))
            elif isinstance(ev, MessageComplete):
                self.txns.append(ev)
                got += self._drain(self.server.message_committed("ID1"))
        return got

    def codes(self, data: bytes) -> list[int]:
        return [r.code for r in self.send(data)]


def ehlo(h: AuthHarness) -> Reply:
    (reply,) = h.send(b"EHLO client\r\n")
    return reply


# --- the SASL exchange, alone ------------------------------------------------------


def test_plain_initial_response_gives_credentials_at_once() -> None:
    """PLAIN with an initial response needs no challenge (RFC 4616 message)."""
    step = SaslExchange(Mechanism.PLAIN).start(b64("\0alice\0s3cret"))
    assert Credentials(Mechanism.PLAIN, "alice", "s3cret") == step


def test_plain_without_initial_response_sends_an_empty_challenge() -> None:
    """PLAIN without an initial response: 334 with an empty challenge, then the message."""
    ex = SaslExchange(Mechanism.PLAIN)
    assert Challenge("") == ex.start(None)
    assert Credentials(Mechanism.PLAIN, "alice", "pw") == ex.respond(b64("alice\0alice\0pw"))


def test_login_asks_for_username_then_password() -> None:
    """LOGIN: "Username:" and "Password:" challenges, base64 answers."""
    ex = SaslExchange(Mechanism.LOGIN)
    assert Challenge(b64("Username:")) == ex.start(None)
    assert Challenge(b64("Password:")) == ex.respond(b64("alice"))
    assert Credentials(Mechanism.LOGIN, "alice", "pw") == ex.respond(b64("pw"))


def test_login_initial_response_is_the_user_name() -> None:
    """LOGIN with an initial response skips the Username: challenge."""
    ex = SaslExchange(Mechanism.LOGIN)
    assert Challenge(b64("Password:")) == ex.start(b64("alice"))


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("bob\0alice\0pw", 535),  # acting for another identity
        ("\0alice\0", 535),  # empty password
        ("\0\0pw", 535),  # empty user
        ("alice\0pw", 535),  # two fields only
    ],
)
def test_bad_plain_messages_are_refused_like_bad_credentials(message: str, code: int) -> None:
    """A malformed PLAIN message earns the same 535 5.7.8 as a wrong password."""
    with pytest.raises(SmtpProtocolError) as info:
        SaslExchange(Mechanism.PLAIN).start(b64(message))
    assert (code, "5.7.8") == (info.value.code, info.value.enhanced)


def test_cancel_and_bad_base64_are_501() -> None:
    """RFC 4954 §4: "*" cancels (501); a response that is not base64 is 501 too."""
    for line in ("*", "not base64!"):
        with pytest.raises(SmtpProtocolError) as info:
            SaslExchange(Mechanism.LOGIN).respond(line)
        assert 501 == info.value.code


@given(st.text(max_size=60))
def test_exchange_only_raises_protocol_errors(line: str) -> None:
    """Any response line gives a challenge, credentials or an SMTP error, nothing else."""
    try:
        SaslExchange(Mechanism.PLAIN).respond(line)
    except SmtpProtocolError:
        pass


def test_credentials_never_show_the_password() -> None:
    """The password is not part of the repr (log lines, tracebacks)."""
    assert "hunter2" not in repr(Credentials(Mechanism.PLAIN, "alice", "hunter2"))


@pytest.mark.parametrize(
    ("pattern", "address", "matches"),
    [
        ("alice@example.org", "alice@example.org", True),
        ("alice@example.org", "Alice@Example.ORG", True),
        ("alice@example.org", "bob@example.org", False),
        ("*@example.org", "anyone@example.org", True),
        ("*@example.org", "anyone@sub.example.org", False),
        ("*@example.org", "example.org", False),
    ],
)
def test_sender_patterns(pattern: str, address: str, matches: bool) -> None:
    """An exact address, or *@domain for any local part at exactly that domain."""
    assert matches == sender_matches(pattern, address)


# --- AUTH in the server ----------------------------------------------------------------


def test_auth_is_advertised_only_under_tls() -> None:
    """DESIGN §13: EHLO lists AUTH PLAIN LOGIN once TLS is active, never before."""
    assert not any(line.startswith("AUTH") for line in ehlo(AuthHarness(tls=False)).lines)
    assert "AUTH PLAIN LOGIN" in ehlo(AuthHarness(tls=True)).lines


def test_auth_is_not_advertised_or_accepted_without_auth_config() -> None:
    """A listener without ``auth`` (port 25) neither lists AUTH nor takes it: 503."""
    h = AuthHarness(replace(CFG, auth=None))
    assert not any(line.startswith("AUTH") for line in ehlo(h).lines)
    assert [503] == h.codes(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    assert [] == h.checked


def test_auth_before_tls_is_538() -> None:
    """RFC 4954: 538 5.7.11 encryption required, and no credentials reach the verifier."""
    h = AuthHarness(tls=False)
    ehlo(h)
    (reply,) = h.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    assert (538, "5.7.11") == (reply.code, reply.enhanced)
    assert [] == h.checked


def test_mail_before_auth_is_530() -> None:
    """auth.required: MAIL before AUTH gets 530 5.7.0."""
    h = AuthHarness()
    ehlo(h)
    (reply,) = h.send(b"MAIL FROM:<alice@example.org>\r\n")
    assert (530, "5.7.0") == (reply.code, reply.enhanced)


def test_plain_login_then_relay_and_esmtpsa() -> None:
    """235 after good credentials; then relay to any domain is allowed and the
    transaction carries auth_user (Received: ... with ESMTPSA)."""
    h = AuthHarness()
    ehlo(h)
    assert [235] == h.codes(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    assert [250, 250, 354, 250] == h.codes(
        b"MAIL FROM:<alice@example.org> AUTH=<>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\n"
        b"Subject: hi\r\n\r\nbody\r\n.\r\n"
    )
    (done,) = h.txns
    assert "alice" == done.transaction.auth_user
    assert "ESMTPSA" == done.transaction.protocol


def test_login_exchange_over_several_lines() -> None:
    """LOGIN: 334 Username:, 334 Password:, 235."""
    h = AuthHarness()
    ehlo(h)
    assert [334] == h.codes(b"AUTH LOGIN\r\n")
    assert [334] == h.codes(f"{b64('alice')}\r\n".encode())
    assert [235] == h.codes(f"{b64('s3cret')}\r\n".encode())
    assert [Credentials(Mechanism.LOGIN, "alice", "s3cret")] == h.checked


def test_wrong_password_is_535_and_a_second_auth_may_follow() -> None:
    """535 5.7.8, then the client may try again in the same session."""
    h = AuthHarness()
    ehlo(h)
    (reply,) = h.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'nope')}\r\n".encode())
    assert (535, "5.7.8") == (reply.code, reply.enhanced)
    assert [235] == h.codes(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())


def test_second_auth_after_success_is_503() -> None:
    """RFC 4954 §4: no AUTH after a successful one."""
    h = AuthHarness()
    ehlo(h)
    h.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    assert [503] == h.codes(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())


def test_auth_inside_a_transaction_is_503() -> None:
    """RFC 4954 §4: AUTH is not permitted during a mail transaction."""
    h = AuthHarness(replace(CFG, auth=AuthOffer(required=False)))
    ehlo(h)
    h.send(b"MAIL FROM:<x@local.example>\r\n")
    assert [503] == h.codes(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())


def test_unknown_mechanism_is_504() -> None:
    h = AuthHarness()
    ehlo(h)
    assert [504] == h.codes(b"AUTH CRAM-MD5\r\n")


def test_cancelled_exchange_is_501_and_the_session_goes_on() -> None:
    """A "*" response cancels: 501, and commands are read again."""
    h = AuthHarness()
    ehlo(h)
    assert [334] == h.codes(b"AUTH LOGIN\r\n")
    assert [501] == h.codes(b"*\r\n")
    assert [250] == h.codes(b"NOOP\r\n")


def test_envelope_sender_must_be_owned() -> None:
    """DESIGN §13: MAIL FROM not matching the user's patterns → 553 5.7.1 naming the user;
    a matching pattern (*@domain) is accepted."""
    h = AuthHarness()
    ehlo(h)
    h.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    (reply,) = h.send(b"MAIL FROM:<bob@example.org>\r\n")
    assert Reply.of(553, "5.7.1", "Sender address not owned by alice") == reply
    assert [250] == h.codes(b"MAIL FROM:<any@alice.test>\r\n")


def test_null_sender_needs_the_user_flag() -> None:
    """MAIL FROM:<> only for a user with null_sender."""
    assert not UserGrant("a", ("*@x.test",)).owns("")
    assert UserGrant("a", ("*@x.test",), null_sender=True).owns("")


def test_user_recipient_quota_lowers_the_limit() -> None:
    """A grant's max_recipients below the listener's gives 452 4.5.3 after that many."""
    h = AuthHarness()
    ehlo(h)
    events = h.server.receive_data(
        f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode()
    )
    assert isinstance(events[0], AuthCheck)
    h.server.auth_succeeded(UserGrant("alice", ("*@alice.test",), max_recipients=2))
    h.server.data_to_send()
    assert [250, 250, 250, 452] == h.codes(
        b"MAIL FROM:<a@alice.test>\r\nRCPT TO:<1@x.test>\r\nRCPT TO:<2@x.test>\r\n"
        b"RCPT TO:<3@x.test>\r\n"
    )


def test_message_quota_refusal_is_returned_at_mail() -> None:
    """The grant's admit_message refusal (hourly quota) answers MAIL."""
    h = AuthHarness()
    ehlo(h)
    h.server.receive_data(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    refusal = SmtpProtocolError(451, "4.7.1", "Message quota exceeded for alice")
    h.server.auth_succeeded(UserGrant("alice", ("*@alice.test",), admit_message=lambda: refusal))
    h.server.data_to_send()
    (reply,) = h.send(b"MAIL FROM:<a@alice.test>\r\n")
    assert (451, "4.7.1") == (reply.code, reply.enhanced)


def test_commands_pipelined_behind_auth_wait_for_the_verdict() -> None:
    """Input after the AUTH line is read only after the verdict (no MAIL before 235)."""
    h = AuthHarness()
    ehlo(h)
    events = h.server.receive_data(
        f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n"
        "MAIL FROM:<alice@example.org>\r\n".encode()
    )
    assert [AuthCheck] == [type(e) for e in events]
    assert b"" == h.server.data_to_send()
    h.server.auth_succeeded(UserGrant("alice", ("alice@example.org",)))
    assert [235, 250] == [r.code for r in h.parser.feed(h.server.data_to_send())]


def test_overlong_sasl_response_is_refused() -> None:
    """A response line past 12288 octets: 500 5.5.6, and the session reads commands again."""
    h = AuthHarness()
    ehlo(h)
    h.send(b"AUTH LOGIN\r\n")
    (reply,) = h.send(b"A" * 13000)
    assert (500, "5.5.6") == (reply.code, reply.enhanced)
    assert [250] == h.codes(b"rest of the line\r\nNOOP\r\n")


def test_tls_restart_forgets_authentication() -> None:
    """After STARTTLS the session starts afresh (RFC 3207 §4.2), AUTH included."""
    h = AuthHarness()
    ehlo(h)
    h.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    assert "alice" == h.server.auth_user
    h.server.tls_started()
    assert h.server.auth_user is None
