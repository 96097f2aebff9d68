"""End-of-data acceptance steps over real loopback sessions (smtplib and raw BDAT).

Each test installs a pipeline of small steps on a live listener (SmtpServerGroup +
MemorySpool on its own loop, as in test_inbound_smtp) and checks what the client
was answered and what the spool holds.  Each runs three ways: steps awaited in a task;
every step in place (``run_now``); and the last step answering a loop turn later
through ``run_soon`` (as DKIM signing does) after the others ran in place.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from empath.smtp.replies import Reply
from empath.transport.acceptance import (
    AcceptancePipeline,
    AcceptedMessage,
    Later,
    SessionFacts,
    Stage,
)
from empath.transport.listener import ListenerSpec
from tests.integration.test_inbound_smtp import Raw, ServerThread, serving, spec

IN_PLACE = {"on": False, "soon": False}  # set per test by the `mode` fixture


@dataclass
class Step:
    """A configurable test step: records what it saw, then does ``action``.  In the
    "in place" runs of each test it also offers ``run_now`` (unless it sleeps), so
    the session runs the pipeline without a task (acceptance.py)."""

    name: str
    stage: Stage = Stage.MODULES
    action: Callable[[AcceptedMessage], Reply | None] = lambda m: None
    seen: list[tuple[str, SessionFacts, bytes]] = field(default_factory=list)
    delay_s: float = 0.0
    immediate: bool = field(init=False)

    def __post_init__(self) -> None:
        self.immediate = IN_PLACE["on"] and not self.delay_s

    async def run(self, message: AcceptedMessage) -> Reply | None:
        assert not self.immediate, "an immediate pipeline is run in place"
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self.run_now(message)

    def run_now(self, message: AcceptedMessage) -> Reply | None:
        self.seen.append((self.name, message.facts, message.to_bytes()))
        return self.action(message)


@dataclass
class Soon:
    """A step's ``run_soon`` face: its answer comes from a future finished a loop turn
    later, handed back in a :class:`Later` (the way DKIM's key process answers)."""

    step: Step
    calls: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.step.name

    @property
    def stage(self) -> Stage:
        return self.step.stage

    async def run(self, message: AcceptedMessage) -> Reply | None:
        raise AssertionError("a pipeline ending in a run_soon step is run without a task")

    def run_soon(self, message: AcceptedMessage) -> Later:
        self.calls.append("task" if asyncio.current_task() is not None else "in place")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        loop.call_soon(fut.set_result, None)
        return Later(fut, lambda _f: self.step.run_now(message))


@pytest.fixture(autouse=True, params=["task", "in place", "soon"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    IN_PLACE["on"] = request.param in ("in place", "soon")
    IN_PLACE["soon"] = request.param == "soon"
    yield request.param
    IN_PLACE["on"] = IN_PLACE["soon"] = False


def install(srv: ServerThread, *steps: Step, timeout_s: float = 30.0) -> None:
    chosen: tuple[Step | Soon, ...] = steps
    if IN_PLACE["soon"]:  # the last step to run answers through run_soon (no sleepers)
        last = max(range(len(steps)), key=lambda i: (int(steps[i].stage), i))
        if not steps[last].delay_s:
            soon = Soon(steps[last])
            chosen = (*steps[:last], soon, *steps[last + 1 :])
            SOON.append(soon)
    pipeline = AcceptancePipeline(chosen, timeout_s=timeout_s)

    def pipeline_for(_spec: ListenerSpec) -> AcceptancePipeline:
        return pipeline

    srv.group.set_acceptance(pipeline_for)


SOON: list[Soon] = []


@pytest.fixture
def srv() -> Iterator[ServerThread]:
    with serving([spec()]) as s:
        yield s
    # in "soon" mode, the wrapped step was offered each message in place, never in a task
    assert all(set(soon.calls) <= {"in place"} for soon in SOON)
    SOON.clear()


MSG = b"From: a@x.example\r\nSubject: hi\r\n\r\nbody line\r\n.dot line\r\n"


def test_steps_see_the_whole_message_and_their_header_and_recipient_changes_are_spooled(
    srv: ServerThread,
) -> None:
    """A step sees the complete message (our Received: on top) and the session
    facts; the header it adds, the header it deletes and the recipient it adds are
    what gets spooled and delivered."""

    def edit(m: AcceptedMessage) -> None:
        m.add_header("X-Scanned", "yes")
        m.delete_header("Subject")
        m.recipients.append("extra@z.example")

    step = Step("edit", action=edit)
    install(srv, step)
    with srv.smtp() as c:
        assert {} == c.sendmail("a@x.example", ["b@y.example"], MSG)
    ((msg, stored),) = srv.stored()
    ((_, facts, seen),) = step.seen
    assert seen.startswith(b"Received: from ")
    assert seen.endswith(MSG)
    assert ("127.0.0.1", True, None, False) == (
        facts.peer_ip,
        facts.trusted,
        facts.auth_user,
        facts.tls,
    )
    assert ("b@y.example", "extra@z.example") == msg.envelope.recipients
    assert ["y.example", "z.example"] == [u.domain for u in msg.units]
    head, _, body = stored.partition(b"\r\n\r\n")
    assert b"body line\r\n.dot line\r\n" == body
    assert head.endswith(b"From: a@x.example\r\nX-Scanned: yes")
    assert b"Subject:" not in stored
    assert msg.envelope.size == len(stored)


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (Reply.of(550, "5.7.1", "rejected by policy"), 550),
        (Reply.of(451, "4.7.1", "try later"), 451),
    ],
)
def test_a_step_refusal_is_the_clients_answer_and_nothing_is_spooled(
    srv: ServerThread, reply: Reply, code: int
) -> None:
    """A 5xx or 4xx from a step reaches the client, nothing is spooled, later steps
    do not run, and the session goes on to accept its next message."""
    later = Step("later", stage=Stage.DKIM)
    refusing = Step("refuse", action=lambda m: reply if b"refuse" in m.body else None)
    install(srv, later, refusing)
    with srv.smtp() as c:
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail("a@x.example", ["b@y.example"], b"Subject: x\r\n\r\nrefuse me\r\n")
        assert (code, reply.text.encode()) == (err.value.smtp_code, err.value.smtp_error)
        assert [] == srv.stored()
        assert [] == later.seen
        c.sendmail("a@x.example", ["b@y.example"], b"Subject: x\r\n\r\nfine\r\n")
    assert 1 == len(srv.stored())
    assert 1 == len(later.seen)


def test_a_step_that_raises_gives_451_and_spools_nothing(srv: ServerThread) -> None:
    """A bug in a step is contained: 451 4.3.0, nothing spooled, the session lives on."""

    def boom(m: AcceptedMessage) -> None:
        raise RuntimeError("step bug")

    install(srv, Step("boom", action=boom))
    with srv.smtp() as c:
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail("a@x.example", ["b@y.example"], MSG)
        assert 451 == err.value.smtp_code
        assert b"4.3.0" in err.value.smtp_error
        assert 250 == c.noop()[0]
    assert [] == srv.stored()


def test_a_step_that_answers_2xx_is_a_bug_answered_451(srv: ServerThread) -> None:
    """Only None or a 4xx/5xx are valid step answers: a 250 from a step must not
    skip the rest of the pipeline, so it is refused as a local error."""
    install(srv, Step("ok", action=lambda m: Reply.of(250, "2.0.0", "fine")))
    with srv.smtp() as c, pytest.raises(smtplib.SMTPDataError) as err:
        c.sendmail("a@x.example", ["b@y.example"], MSG)
    assert 451 == err.value.smtp_code
    assert [] == srv.stored()


def test_discard_and_removing_every_recipient_answer_250_and_spool_nothing(
    srv: ServerThread,
) -> None:
    """The milter "discard" action and a step removing every recipient accept the
    message (250) without spooling it."""

    def act(m: AcceptedMessage) -> None:
        if b"discard" in m.body:
            m.discard("spam")
        else:
            m.recipients.clear()

    install(srv, Step("d", action=act))
    with srv.smtp() as c:
        assert {} == c.sendmail("a@x.example", ["b@y.example"], b"S: x\r\n\r\ndiscard\r\n")
        assert {} == c.sendmail("a@x.example", ["b@y.example"], b"S: x\r\n\r\nnone\r\n")
    assert [] == srv.stored()
    assert [] == srv.accepted


def test_steps_run_in_stage_order_and_see_earlier_changes(srv: ServerThread) -> None:
    """DKIM-stage steps run after module-stage ones whatever the order given, and
    see the body a module replaced."""
    order: list[str] = []

    def module(m: AcceptedMessage) -> None:
        order.append("module")
        m.replace_body(b"replaced\r\n")

    def dkim(m: AcceptedMessage) -> None:
        order.append("dkim")
        assert b"replaced\r\n" == m.body
        m.add_header("DKIM-Signature", "v=1; test", index=0)
        m.log_fields["dkim_domain"] = "x.example"

    install(srv, Step("dkim", Stage.DKIM, dkim), Step("module", Stage.MODULES, module))
    with srv.smtp() as c:
        c.sendmail("a@x.example", ["b@y.example"], MSG)
    ((_, stored),) = srv.stored()
    assert ["module", "dkim"] == order
    assert stored.startswith(b"DKIM-Signature: v=1; test\r\nReceived: ")
    assert stored.endswith(b"\r\n\r\nreplaced\r\n")


def test_bdat_messages_go_through_the_steps(srv: ServerThread) -> None:
    """A message sent in BDAT chunks is assembled whole before the steps run."""
    step = Step("s", action=lambda m: m.add_header("X-Seen", str(len(m.body))))
    install(srv, step)
    one, two = b"Subject: chunked\r\n\r\nfirst ", b"second\r\n"
    with Raw(srv.port) as r:
        assert [220] == r.codes(1)
        r.send(b"EHLO c.example\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n")
        assert [250, 250, 250] == r.codes(3)
        r.send(b"BDAT %d\r\n%s" % (len(one), one))
        assert [250] == r.codes(1)
        r.send(b"BDAT %d LAST\r\n%s" % (len(two), two))
        assert [250] == r.codes(1)
    ((_, stored),) = srv.stored()
    assert stored.endswith(b"Subject: chunked\r\nX-Seen: 14\r\n\r\nfirst second\r\n")


def test_a_slow_pipeline_is_cut_off_with_451(srv: ServerThread) -> None:
    """Steps that outlast the pipeline's timeout get 451 and nothing is spooled."""
    install(srv, Step("slow", delay_s=5.0), timeout_s=0.2)
    with srv.smtp() as c, pytest.raises(smtplib.SMTPDataError) as err:
        c.sendmail("a@x.example", ["b@y.example"], MSG)
    assert 451 == err.value.smtp_code
    assert [] == srv.stored()


def test_removing_the_pipeline_returns_to_streaming(srv: ServerThread) -> None:
    """After a reload removes every step, the next message is streamed and spooled
    untouched (no step runs)."""
    step = Step("s", action=lambda m: m.add_header("X-Step", "1"))
    install(srv, step)
    with srv.smtp() as c:
        c.sendmail("a@x.example", ["b@y.example"], MSG)
    srv.group.set_acceptance(None)
    with srv.smtp() as c:
        c.sendmail("a@x.example", ["b@y.example"], MSG)
    first, second = (body for _, body in srv.stored())
    assert (b"X-Step: 1" in first, b"X-Step" in second) == (True, False)
    assert 1 == len(step.seen)


def test_pipelined_bdat_messages_each_refused_by_a_step_each_get_their_answer(
    srv: ServerThread, mode: str
) -> None:
    """300 messages pipelined with BDAT LAST in one write, each refused by a step:
    every reply in order, the session alive after (the in-place run answers a
    refusal from a task, so a long batch is not a recursion)."""
    install(srv, Step("no", action=lambda m: Reply.of(550, "5.7.1", "not wanted")))
    body = b"Subject: x\r\n\r\nbody\r\n"
    one = b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nBDAT %d LAST\r\n%s" % (
        len(body), body)  # fmt: skip
    with Raw(srv.port) as r:
        assert [220] == r.codes(1)
        r.send(b"EHLO c.example\r\n")
        assert [250] == r.codes(1)
        r.send(one * 300 + b"NOOP\r\n")
        assert [250, 250, 550] * 300 + [250] == r.codes(901)
    assert [] == srv.stored()


def test_a_last_step_answering_later_runs_in_place_and_its_answer_counts(
    srv: ServerThread,
) -> None:
    """Immediate steps, then one whose ``run_soon`` hands back a future: the session
    calls it in place (no task), spools what its finish left, answers its refusal and
    contains its failure (451)."""

    def finish(m: AcceptedMessage) -> Reply | None:
        if b"refuse" in m.body:
            return Reply.of(550, "5.7.1", "refused later")
        if b"boom" in m.body:
            raise RuntimeError("finish bug")
        m.add_header("X-Later", "1", index=0)
        return None

    first = Step("first", action=lambda m: m.add_header("X-First", "1"))
    first.immediate = True  # whatever the mode
    soon = Soon(Step("later", Stage.DKIM, finish))
    pipeline = AcceptancePipeline((first, soon))
    assert (True, False) == (pipeline.soon, pipeline.immediate)
    srv.group.set_acceptance(lambda _spec: pipeline)
    with srv.smtp() as c:
        c.sendmail("a@x.example", ["b@y.example"], MSG)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            c.sendmail("a@x.example", ["b@y.example"], b"S: x\r\n\r\nrefuse\r\n")
        with pytest.raises(smtplib.SMTPDataError) as failed:
            c.sendmail("a@x.example", ["b@y.example"], b"S: x\r\n\r\nboom\r\n")
        assert 250 == c.noop()[0]
    ((_, stored),) = srv.stored()
    assert stored.startswith(b"X-Later: 1\r\nReceived: ")
    assert b"X-First: 1\r\n" in stored
    assert (550, 451) == (refused.value.smtp_code, failed.value.smtp_code)
    assert ["in place"] * 3 == soon.calls
