"""Module checks in the sans-I/O server (DESIGN §14): the state machine stops at the
stages the modules hook, and only there; their answer decides the reply."""

from __future__ import annotations

from empath.smtp.replies import Reply, ReplyParser
from empath.smtp.server import Check, CheckStage, Close, Event, Phase, SmtpServer, State
from empath.testing.settings import server_config

CFG = server_config("mx.test", max_message_bytes=1000, max_recipients=3, tls_available=False)
ALL = frozenset(CheckStage)
NO = Reply.of(550, "5.7.1", "not this one")


class Checked:
    """A server whose checks are answered from ``answers`` (stage → reply or None)."""

    def __init__(self, checks: frozenset[CheckStage], answers: dict[CheckStage, Reply]) -> None:
        self.server = SmtpServer(CFG, lambda d: True, checks=checks)
        self.answers = answers
        self.asked: list[Check] = []
        self.events: list[Event] = []
        self.parser = ReplyParser()
        self.replies: list[Reply] = []
        pending = self.server.pending_check
        if pending is not None:
            self._answer(pending)
        self.replies += self.parser.feed(self.server.data_to_send())

    def _answer(self, check: Check) -> None:
        self.asked.append(check)
        for ev in self.server.check_done(self.answers.get(check.stage)):
            self._event(ev)

    def _event(self, ev: Event) -> None:
        self.events.append(ev)
        if isinstance(ev, Check):
            self._answer(ev)

    def send(self, data: bytes) -> list[Reply]:
        for ev in self.server.receive_data(data):
            self._event(ev)
        got = self.parser.feed(self.server.data_to_send())
        self.replies += got
        return got


def test_without_checks_the_server_never_stops_for_a_module() -> None:
    """Not configured, no cost: no Check event, no waiting, the greeting at once."""
    h = Checked(frozenset(), {})
    assert [220] == [r.code for r in h.replies]
    h.send(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<r@x>\r\n")
    assert [] == h.asked
    assert not any(isinstance(e, Check) for e in h.events)


def test_each_hooked_stage_is_asked_with_its_value_in_order() -> None:
    h = Checked(ALL, {})
    h.send(b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@x.test>\r\n")
    expected = [
        Check(CheckStage.CONNECT, ""),
        Check(CheckStage.HELO, "client.test"),
        Check(CheckStage.MAIL, "a@b.test"),
        Check(CheckStage.RCPT, "r@x.test"),
    ]
    assert expected == h.asked
    assert [220, 250, 250, 250] == [r.code for r in h.replies]


def test_a_refused_rcpt_is_not_added_and_the_next_one_is() -> None:
    h = Checked(frozenset({CheckStage.RCPT}), {})
    h.send(b"EHLO c\r\nMAIL FROM:<a@b>\r\n")
    h.answers[CheckStage.RCPT] = NO
    assert [550] == [r.code for r in h.send(b"RCPT TO:<x@y>\r\n")]
    assert State.MAIL is h.server.state
    del h.answers[CheckStage.RCPT]
    assert [250] == [r.code for r in h.send(b"RCPT TO:<ok@y>\r\n")]
    assert ("ok@y",) == h.server.recipients


def test_a_refused_mail_starts_no_transaction() -> None:
    h = Checked(frozenset({CheckStage.MAIL}), {CheckStage.MAIL: NO})
    assert [250, 550, 503] == [
        r.code for r in h.send(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<r@x>\r\n")
    ]
    assert h.server.sender is None


def test_pipelined_commands_wait_for_the_check_and_are_answered_in_order() -> None:
    """While a check is pending the server interprets nothing more (Phase.WAITING)."""
    server = SmtpServer(CFG, lambda d: True, checks=frozenset({CheckStage.MAIL}))
    server.data_to_send()
    events = server.receive_data(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<r@x>\r\nNOOP\r\n")
    assert [Check(CheckStage.MAIL, "a@b")] == [e for e in events if isinstance(e, Check)]
    assert Phase.WAITING is server.phase
    assert b"250" in server.data_to_send()  # EHLO only
    server.check_done(None)
    parser = ReplyParser()
    assert [250, 250, 250] == [r.code for r in parser.feed(server.data_to_send())]


def test_a_5xx_at_connect_is_a_554_greeting_and_then_only_quit() -> None:
    """RFC 5321 §3.1: a server may answer 554 instead of 220 and then 503 to every
    command until QUIT."""
    h = Checked(frozenset({CheckStage.CONNECT}), {CheckStage.CONNECT: NO})
    assert [(554, ("5.7.1 not this one",))] == [(r.code, r.lines) for r in h.replies]
    assert [503, 503] == [r.code for r in h.send(b"EHLO c\r\nMAIL FROM:<a@b>\r\n")]
    assert [221] == [r.code for r in h.send(b"QUIT\r\n")]


def test_a_4xx_at_connect_is_a_421_and_the_connection_closes() -> None:
    h = Checked(frozenset({CheckStage.CONNECT}),
                {CheckStage.CONNECT: Reply.of(451, "4.7.1", "later")})  # fmt: skip
    assert [(421, ("4.7.1 later",))] == [(r.code, r.lines) for r in h.replies]
    assert any(isinstance(e, Close) for e in h.events)
    assert Phase.CLOSED is h.server.phase


def test_a_421_from_a_module_closes_the_session() -> None:
    h = Checked(frozenset({CheckStage.HELO}),
                {CheckStage.HELO: Reply.of(421, "4.7.0", "go away")})  # fmt: skip
    assert [421] == [r.code for r in h.send(b"EHLO c\r\nNOOP\r\n")]
    assert Phase.CLOSED is h.server.phase
