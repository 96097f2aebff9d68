"""The sans-I/O SMTP client: what it writes for each reply, and per-recipient verdicts."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.smtp.client import (
    ClientEvent,
    ClientState,
    Cmd,
    Extensions,
    LocalVerdict,
    OutboundTransaction,
    SendBody,
    SessionClosed,
    SessionFailed,
    SessionReady,
    SmtpClient,
    StartTls,
    TlsPolicy,
    TransactionDone,
    TransactionResult,
)
from empath.smtp.replies import Reply

ALL_EXT = ("PIPELINING", "SIZE 10000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")


def ehlo_reply(extensions: tuple[str, ...]) -> bytes:
    lines = ["mx.test greets me.test", *extensions]
    out = [f"250-{line}\r\n" for line in lines[:-1]] + [f"250 {lines[-1]}\r\n"]
    return "".join(out).encode()


def client_ready(
    extensions: tuple[str, ...] = ALL_EXT, policy: TlsPolicy = TlsPolicy.OPPORTUNISTIC
) -> SmtpClient:
    c = SmtpClient("me.test", mx="mx.test", tls_policy=policy)
    assert [] == c.receive_data(b"220 mx.test ESMTP\r\n")
    assert b"EHLO me.test\r\n" == c.data_to_send()
    events = c.receive_data(ehlo_reply(extensions))
    assert [SessionReady(Extensions.parse(Reply(250, ("x", *extensions))), False)] == events
    return c


def done(events: list[ClientEvent]) -> TransactionResult:
    finals = [e for e in events if isinstance(e, TransactionDone)]
    assert 1 == len(finals), events
    return finals[0].result


def codes(result: TransactionResult) -> dict[str, object]:
    return {
        a: (v.code if isinstance(v, Reply) else ("local", v.permanent, v.enhanced))
        for a, v in result.verdicts
    }


# --- session setup ----------------------------------------------------------------------


def test_greeting_220_sends_ehlo_with_our_hostname() -> None:
    c = SmtpClient("me.test", mx="mx.test")
    assert Cmd.GREETING == c.phase
    c.receive_data(b"220 mx.test ESMTP\r\n")
    assert b"EHLO me.test\r\n" == c.data_to_send()
    assert Cmd.EHLO == c.phase


@pytest.mark.parametrize(
    ("greeting", "permanent", "quit_sent"),
    [
        (b"421 4.3.2 busy, try later\r\n", False, False),  # 421: server closes, no QUIT
        (b"450 4.7.1 not now\r\n", False, True),
        (b"554 5.7.1 go away\r\n", True, True),
    ],
)
def test_refused_greeting_fails_the_session(
    greeting: bytes, permanent: bool, quit_sent: bool
) -> None:
    """4xx greeting → temporary (try next MX); 5xx → permanent for this host."""
    c = SmtpClient("me.test", mx="mx.test")
    events = c.receive_data(greeting)
    failed = [e for e in events if isinstance(e, SessionFailed)]
    assert 1 == len(failed)
    assert permanent == failed[0].permanent
    assert (b"QUIT\r\n" if quit_sent else b"") == c.data_to_send()
    assert not c.usable


@pytest.mark.parametrize("code", [500, 502])
def test_ehlo_not_understood_falls_back_to_helo(code: int) -> None:
    c = SmtpClient("me.test", mx="mx.test")
    c.receive_data(b"220 mx.test SMTP\r\n")
    c.data_to_send()
    assert [] == c.receive_data(f"{code} 5.5.1 what?\r\n".encode())
    assert b"HELO me.test\r\n" == c.data_to_send()
    events = c.receive_data(b"250 mx.test\r\n")
    assert [SessionReady(Extensions(), False)] == events
    assert c.used_helo
    # Without SIZE offered, no SIZE= parameter; without PIPELINING, one command at a time.
    c.start_transaction(OutboundTransaction("s@a.test", ("r@b.test",), size=123))
    assert b"MAIL FROM:<s@a.test>\r\n" == c.data_to_send()


def test_ehlo_refusal_other_than_500_502_fails_without_helo() -> None:
    c = SmtpClient("me.test", mx="mx.test")
    c.receive_data(b"220 mx.test ESMTP\r\n")
    c.data_to_send()
    events = c.receive_data(b"550 5.7.1 you are not welcome\r\n")
    assert [True] == [e.permanent for e in events if isinstance(e, SessionFailed)]
    assert b"QUIT\r\n" == c.data_to_send()


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (("PIPELINING",), Extensions(pipelining=True, keywords=("PIPELINING",))),
        (("SIZE 35882577",), Extensions(size_limit=35882577, keywords=("SIZE 35882577",))),
        (("SIZE",), Extensions(size_limit=0, keywords=("SIZE",))),
        (("8bitmime",), Extensions(eightbitmime=True, keywords=("8BITMIME",))),
        (("SMTPUTF8",), Extensions(smtputf8=True, keywords=("SMTPUTF8",))),
        (("STARTTLS",), Extensions(starttls=True, keywords=("STARTTLS",))),
        (
            ("ENHANCEDSTATUSCODES",),
            Extensions(enhancedstatuscodes=True, keywords=("ENHANCEDSTATUSCODES",)),
        ),
        (("CHUNKING",), Extensions(chunking=True, keywords=("CHUNKING",))),
        (("AUTH PLAIN LOGIN",), Extensions(keywords=("AUTH PLAIN LOGIN",))),
    ],
)
def test_ehlo_keywords_are_parsed(lines: tuple[str, ...], expected: Extensions) -> None:
    assert expected == Extensions.parse(Reply(250, ("mx.test hello", *lines)))


def test_starttls_when_offered_then_ehlo_again_after_handshake() -> None:
    """RFC 3207 §4.2: forget the old extensions and EHLO again over TLS."""
    c = SmtpClient("me.test", mx="mx.test")
    c.receive_data(b"220 mx.test ESMTP\r\n")
    c.data_to_send()
    assert [] == c.receive_data(ehlo_reply(("PIPELINING", "STARTTLS")))
    assert b"STARTTLS\r\n" == c.data_to_send()
    assert [StartTls()] == c.receive_data(b"220 2.0.0 go ahead\r\n")
    assert ClientState.TLS_HANDSHAKE == c.state
    c.tls_started()
    assert b"EHLO me.test\r\n" == c.data_to_send()
    assert Extensions() == c.extensions
    events = c.receive_data(ehlo_reply(("PIPELINING", "SIZE 100")))
    assert 1 == len(events)
    assert isinstance(events[0], SessionReady)
    assert events[0].tls_active
    assert 100 == events[0].extensions.size_limit
    assert b"" == c.data_to_send()


def test_required_tls_without_starttls_offer_fails_temporarily() -> None:
    c = SmtpClient("me.test", mx="mx1.test", tls_policy=TlsPolicy.REQUIRED)
    c.receive_data(b"220 mx1.test ESMTP\r\n")
    c.data_to_send()
    events = c.receive_data(ehlo_reply(("PIPELINING",)))
    failed = [e for e in events if isinstance(e, SessionFailed)]
    assert 1 == len(failed)
    assert not failed[0].permanent
    assert "TLS required but not offered by mx1.test" == failed[0].text
    assert "4.7.4" == failed[0].enhanced


@pytest.mark.parametrize(
    ("policy", "ready"), [(TlsPolicy.OPPORTUNISTIC, True), (TlsPolicy.REQUIRED, False)]
)
def test_starttls_refusal_is_fatal_only_when_tls_is_required(
    policy: TlsPolicy, ready: bool
) -> None:
    c = SmtpClient("me.test", mx="mx.test", tls_policy=policy)
    c.receive_data(b"220 mx.test ESMTP\r\n")
    c.receive_data(ehlo_reply(("STARTTLS",)))
    c.data_to_send()
    events = c.receive_data(b"454 4.7.0 TLS not available\r\n")
    assert ready == any(isinstance(e, SessionReady) for e in events)
    assert (not ready) == any(isinstance(e, SessionFailed) and not e.permanent for e in events)


def test_disabled_tls_policy_ignores_starttls_offer() -> None:
    c = SmtpClient("me.test", mx="mx.test", tls_policy=TlsPolicy.DISABLED)
    c.receive_data(b"220 mx.test ESMTP\r\n")
    c.data_to_send()
    events = c.receive_data(ehlo_reply(("STARTTLS",)))
    assert [SessionReady] == [type(e) for e in events]
    assert b"" == c.data_to_send()


# --- transactions -------------------------------------------------------------------------


def test_pipelining_sends_mail_rcpts_and_data_in_one_write_and_matches_replies_in_order() -> None:
    c = client_ready()
    txn = OutboundTransaction("s@a.test", ("ok@b.test", "bad@b.test", "later@b.test"), size=42)
    assert [] == c.start_transaction(txn)
    assert (
        b"MAIL FROM:<s@a.test> SIZE=42\r\n"
        b"RCPT TO:<ok@b.test>\r\n"
        b"RCPT TO:<bad@b.test>\r\n"
        b"RCPT TO:<later@b.test>\r\n"
        b"DATA\r\n"
    ) == c.data_to_send()
    assert Cmd.MAIL == c.phase
    events = c.receive_data(
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no such user\r\n451 4.3.0 later\r\n"
        b"354 go ahead\r\n"
    )
    assert [SendBody()] == events
    assert b"Subject: x\r\n\r\nhi\r\n" == c.send_body(b"Subject: x\r\n\r\nhi\r\n")
    assert b".\r\n" == c.end_body()
    assert Cmd.DOT == c.phase
    result = done(c.receive_data(b"250 2.0.0 queued as X\r\n"))
    assert {"ok@b.test": 250, "bad@b.test": 550, "later@b.test": 451} == codes(result)
    assert frozenset({1, 2}) == result.refused_at_rcpt  # each mailbox's own answer
    assert ("ok@b.test",) == result.delivered()
    assert result.replied
    assert c.usable
    assert not c.needs_rset  # the transaction completed: next one starts with MAIL


def test_without_pipelining_commands_go_one_at_a_time() -> None:
    c = client_ready(("SIZE 10000",))
    c.start_transaction(OutboundTransaction("s@a.test", ("a@b.test", "c@b.test")))
    assert b"MAIL FROM:<s@a.test>\r\n" == c.data_to_send()
    c.receive_data(b"250 ok\r\n")
    assert b"RCPT TO:<a@b.test>\r\n" == c.data_to_send()
    c.receive_data(b"550 no\r\n")
    assert b"RCPT TO:<c@b.test>\r\n" == c.data_to_send()
    c.receive_data(b"250 ok\r\n")
    assert b"DATA\r\n" == c.data_to_send()
    assert [SendBody()] == c.receive_data(b"354 go\r\n")
    c.send_body(b"x\r\n")
    c.end_body()
    result = done(c.receive_data(b"250 ok\r\n"))
    assert {"a@b.test": 550, "c@b.test": 250} == codes(result)
    assert frozenset({0}) == result.refused_at_rcpt


def test_no_accepted_recipient_means_no_data_and_rset_before_next_message_pipelined() -> None:
    c = client_ready()
    c.start_transaction(OutboundTransaction("s@a.test", ("x@b.test",)))
    c.data_to_send()
    events = c.receive_data(b"250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n")
    assert not any(isinstance(e, SendBody) for e in events)
    assert {"x@b.test": 550} == codes(done(events))
    assert c.needs_rset
    c.start_transaction(OutboundTransaction("s@a.test", ("y@b.test",)))
    assert (b"RSET\r\nMAIL FROM:<s@a.test>\r\nRCPT TO:<y@b.test>\r\nDATA\r\n") == c.data_to_send()
    events = c.receive_data(b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert [SendBody()] == events


def test_no_accepted_recipient_without_pipelining_sends_rset_not_data() -> None:
    c = client_ready(())
    c.start_transaction(OutboundTransaction("s@a.test", ("x@b.test",)))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n")
    c.data_to_send()
    result = done(c.receive_data(b"450 4.2.0 mailbox busy\r\n"))
    assert {"x@b.test": 450} == codes(result)
    assert b"" == c.data_to_send()
    c.start_transaction(OutboundTransaction("s@a.test", ("y@b.test",)))
    assert b"RSET\r\n" == c.data_to_send()
    c.receive_data(b"250 ok\r\n")
    assert b"MAIL FROM:<s@a.test>\r\n" == c.data_to_send()


def test_354_without_accepted_recipient_ends_empty_content_and_delivers_nothing() -> None:
    """A broken server saying 354 after rejecting every RCPT gets a lone "."."""
    c = client_ready()
    c.start_transaction(OutboundTransaction("s@a.test", ("x@b.test",)))
    c.data_to_send()
    assert [] == c.receive_data(b"250 ok\r\n550 no\r\n354 go\r\n")
    assert b".\r\n" == c.data_to_send()
    result = done(c.receive_data(b"250 ok\r\n"))
    assert {"x@b.test": 550} == codes(result)
    assert c.needs_rset


def test_rejected_mail_from_decides_every_recipient() -> None:
    c = client_ready()
    c.start_transaction(OutboundTransaction("s@a.test", ("a@b.test", "c@b.test")))
    c.data_to_send()
    result = done(
        c.receive_data(b"452 4.3.1 insufficient storage\r\n503 no\r\n503 no\r\n503 no\r\n")
    )
    assert {"a@b.test": 452, "c@b.test": 452} == codes(result)
    assert frozenset() == result.refused_at_rcpt  # MAIL's refusal: the destination's
    assert c.needs_rset


def test_final_data_reply_applies_to_every_accepted_recipient() -> None:
    c = client_ready()
    c.start_transaction(OutboundTransaction("s@a.test", ("a@b.test", "c@b.test", "d@b.test")))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n")
    c.send_body(b"x\r\n")
    c.end_body()
    result = done(c.receive_data(b"554 5.6.0 content rejected\r\n"))
    assert {"a@b.test": 554, "c@b.test": 550, "d@b.test": 554} == codes(result)
    assert c.needs_rset  # RSET before the next message after a failed transaction


def test_smtputf8_message_to_server_without_smtputf8_fails_permanently_without_sending() -> None:
    c = client_ready(("PIPELINING", "8BITMIME"))
    events = c.start_transaction(OutboundTransaction("s@a.test", ("ü@b.test",), smtputf8=True))
    result = done(events)
    assert {"ü@b.test": ("local", True, "5.6.7")} == codes(result)
    verdict = result.verdicts[0][1]
    assert isinstance(verdict, LocalVerdict)
    assert "SMTPUTF8 is required, but was not offered by host mx.test" == verdict.text
    assert b"" == c.data_to_send()
    assert c.usable


def test_message_larger_than_declared_size_limit_fails_permanently_without_sending() -> None:
    c = client_ready(("PIPELINING", "SIZE 1000"))
    result = done(c.start_transaction(OutboundTransaction("s@a.test", ("r@b.test",), size=1001)))
    assert {"r@b.test": ("local", True, "5.3.4")} == codes(result)
    assert b"" == c.data_to_send()


@pytest.mark.parametrize(
    ("extensions", "txn", "mail_line"),
    [
        (
            ALL_EXT,
            OutboundTransaction("s@a.test", ("r@b",), size=99),
            b"MAIL FROM:<s@a.test> SIZE=99",
        ),
        (
            ALL_EXT,
            OutboundTransaction("s@a.test", ("r@b",), size=5, body_8bit=True),
            b"MAIL FROM:<s@a.test> SIZE=5 BODY=8BITMIME",
        ),
        (
            ALL_EXT,
            OutboundTransaction("ü@a.test", ("r@b",), smtputf8=True, body_8bit=True),
            "MAIL FROM:<ü@a.test> BODY=8BITMIME SMTPUTF8".encode(),
        ),
        (
            ("PIPELINING",),
            OutboundTransaction("", ("r@b",), size=5, body_8bit=True),
            b"MAIL FROM:<>",
        ),
        (("SIZE",), OutboundTransaction("s@a", ("r@b",), size=7), b"MAIL FROM:<s@a> SIZE=7"),
    ],
)
def test_mail_parameters_follow_what_the_server_offers(
    extensions: tuple[str, ...], txn: OutboundTransaction, mail_line: bytes
) -> None:
    c = client_ready(extensions)
    c.start_transaction(txn)
    assert mail_line + b"\r\n" == c.data_to_send().split(b"\r\n")[0] + b"\r\n"


def test_body_lines_starting_with_a_dot_are_stuffed_and_missing_final_crlf_added() -> None:
    c = client_ready()
    c.start_transaction(OutboundTransaction("s@a.test", ("r@b.test",)))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    wire = c.send_body(b".hidden\r\nmid\r\n.\r\n..two\r\nlast")
    wire += c.end_body()
    assert b"..hidden\r\nmid\r\n..\r\n...two\r\nlast\r\n.\r\n" == wire


def test_dot_stuffing_works_across_chunk_boundaries() -> None:
    c = client_ready()
    c.start_transaction(OutboundTransaction("s@a.test", ("r@b.test",)))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    wire = c.send_body(b"line\r") + c.send_body(b"\n.dot\r\n") + c.end_body()
    assert b"line\r\n..dot\r\n.\r\n" == wire


def test_421_mid_transaction_settles_undecided_recipients_and_closes() -> None:
    c = client_ready()
    c.start_transaction(OutboundTransaction("s@a.test", ("a@b.test", "c@b.test")))
    c.data_to_send()
    events = c.receive_data(b"250 ok\r\n550 no\r\n421 4.3.2 shutting down\r\n")
    result = done(events)
    assert {"a@b.test": 550, "c@b.test": 421} == codes(result)
    assert frozenset({0}) == result.refused_at_rcpt  # the 421 is the destination's
    assert any(isinstance(e, SessionClosed) for e in events)
    assert not c.usable


def test_connection_lost_during_body_makes_accepted_recipients_temporary() -> None:
    c = client_ready()
    c.start_transaction(OutboundTransaction("s@a.test", ("a@b.test", "c@b.test")))
    c.data_to_send()
    c.receive_data(b"250 ok\r\n550 5.1.1 no\r\n250 ok\r\n354 go\r\n")
    c.send_body(b"partial")
    events = c.connection_lost("lost connection with mx.test")
    result = done(events)
    assert {"a@b.test": 550, "c@b.test": ("local", False, "4.4.2")} == codes(result)
    assert result.replied
    assert ClientState.CLOSED == c.state


def test_connection_lost_before_any_reply_is_marked_unanswered() -> None:
    """A stale pooled connection: the attempt layer resends on a fresh one."""
    c = client_ready()
    c.start_transaction(OutboundTransaction("s@a.test", ("a@b.test",)))
    c.data_to_send()
    result = done(c.connection_lost("reset"))
    assert not result.replied


def test_unsolicited_421_on_idle_connection_closes_it() -> None:
    c = client_ready()
    events = c.receive_data(b"421 4.4.2 idle timeout\r\n")
    assert [SessionClosed] == [type(e) for e in events]
    assert not c.usable


def test_quit_is_sent_when_idle_and_221_closes() -> None:
    c = client_ready()
    assert c.quit()
    assert b"QUIT\r\n" == c.data_to_send()
    assert Cmd.QUIT == c.phase
    events = c.receive_data(b"221 2.0.0 bye\r\n")
    assert [SessionClosed] == [type(e) for e in events]
    assert ClientState.CLOSED == c.state
    assert not c.quit()  # nothing more to say


def test_quit_is_refused_mid_transaction() -> None:
    c = client_ready()
    c.start_transaction(OutboundTransaction("s@a.test", ("a@b.test",)))
    assert not c.quit()


def test_malformed_reply_aborts_with_temporary_outcome() -> None:
    c = client_ready()
    c.start_transaction(OutboundTransaction("s@a.test", ("a@b.test",)))
    c.data_to_send()
    result = done(c.receive_data(b"hello there\r\n"))
    assert {"a@b.test": ("local", False, "4.4.2")} == codes(result)


def test_starting_a_transaction_outside_ready_is_a_programming_error() -> None:
    c = SmtpClient("me.test")
    with pytest.raises(RuntimeError):
        c.start_transaction(OutboundTransaction("s@a", ("r@b",)))


SETUP = b"220 mx.test ESMTP\r\n" + ehlo_reply(("PIPELINING", "SIZE 0", "ENHANCEDSTATUSCODES"))
TXN = b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550-5.1.1 no such\r\n550 5.1.1 user\r\n354 go\r\n"


def feed_in_pieces(c: SmtpClient, data: bytes, cuts: list[int]) -> list[ClientEvent]:
    bounds = [0, *sorted(x for x in cuts if 0 < x < len(data)), len(data)]
    events: list[ClientEvent] = []
    for a, b in itertools.pairwise(bounds):
        events += c.receive_data(data[a:b])
    return events


@given(
    st.lists(st.integers(min_value=1, max_value=len(SETUP) - 1), unique=True, max_size=12),
    st.lists(st.integers(min_value=1, max_value=len(TXN) - 1), unique=True, max_size=12),
)
def test_replies_split_anywhere_give_the_same_conversation(
    setup_cuts: list[int], txn_cuts: list[int]
) -> None:
    """Replies are matched from a byte stream, however the network splits it."""
    c = SmtpClient("me.test", mx="mx.test")
    assert [SessionReady] == [type(e) for e in feed_in_pieces(c, SETUP, setup_cuts)]
    c.start_transaction(OutboundTransaction("s@a", ("a@b", "c@b")))
    assert [SendBody] == [type(e) for e in feed_in_pieces(c, TXN, txn_cuts)]
    c.send_body(b"x\r\n")
    c.end_body()
    result = done(c.receive_data(b"250 2.0.0 ok\r\n"))
    assert {"a@b": 250, "c@b": 550} == codes(result)
