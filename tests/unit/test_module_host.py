"""The module host: order, accept-now, on_error, the once-a-minute traceback, changes
seen by the next module, bounded delivery-event queues (DESIGN §14)."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest

from empath.config.model import ModuleConfig, ModuleOnError
from empath.errors import ConfigError
from empath.modules import AddHeader, Changes, DeleteHeader, DeliveryEvent, Message, Reply, Session
from empath.modules.api import DeliveryKind
from empath.modules.events import delivery_event
from empath.modules.host import (
    CONTINUE,
    CallTimeouts,
    Hook,
    ModuleHost,
    ModuleStats,
    Verdict,
    never_suspends,
)
from empath.modules.loader import ModuleContext, PythonFilter, build_host
from empath.smtp.events import CheckStage
from empath.spool.model import Attempt, Envelope, MessageState, UnitStatus, initial_units
from empath.supervisor import Supervisor
from empath.testing.clock import FakeClock
from empath.transport.acceptance import AcceptedMessage, SessionFacts

FACTS = SessionFacts(peer_ip="192.0.2.1", peer="192.0.2.1:1", helo="c", trusted=False,
                     auth_user=None, tls=False, listener="l")  # fmt: skip


CLOCK = FakeClock(autojump=True)  # module calls are timed on it: a 5 s call costs no time


class Fake:
    kind: Literal["module", "milter"] = "module"
    immediate: frozenset[Hook] = frozenset()

    def __init__(
        self,
        label: str,
        answer: Any = None,
        on_error: ModuleOnError = "tempfail",
        hooks: frozenset[Hook] = frozenset(Hook),
        delay_s: float = 0.0,
    ) -> None:
        self.label = label
        self.answer = answer
        self.on_error = on_error
        self.hooks = hooks
        self.timeouts = CallTimeouts(connect_secs=0.05, command_secs=0.05,
                                     end_of_message_secs=0.05)  # fmt: skip
        self.delay_s = delay_s
        self.seen: list[Any] = []

    def budget(self, hook: Hook) -> float:
        return 0.05

    async def _reply(self, seen: Any) -> Verdict:
        self.seen.append(seen)
        if self.delay_s:
            await CLOCK.sleep(self.delay_s)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer or CONTINUE

    async def stage(self, hook: Hook, session: Session, arg: str) -> Verdict:
        return await self._reply(arg)

    async def data(self, session: Session, message: Message) -> Verdict:
        return await self._reply(message)

    async def delivery(self, event: DeliveryEvent) -> None:
        await CLOCK.sleep(3600)

    def now(self, hook: Hook, session: Session | None, arg: Any) -> Verdict:
        raise AssertionError("no hook of a Fake is immediate")

    async def session_closed(self, session: Session) -> None:
        return None

    async def close(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {}


def session() -> Session:
    return Session(id="s", peer_ip="192.0.2.1", peer_port=1, listener="l")


async def ask(host: ModuleHost, hook: Hook, arg: str = "x") -> Reply | None:
    return await host.stage(hook, session(), arg)


async def test_the_first_refusal_wins_and_later_modules_are_not_asked() -> None:
    a, b = Fake("a", Verdict(Reply(550, "5.7.1", "no"))), Fake("b")
    assert Reply(550, "5.7.1", "no") == await ask(
        ModuleHost([a, b], ModuleStats(), clock=CLOCK), Hook.RCPT
    )
    assert (["x"], []) == (a.seen, b.seen)


async def test_a_2xx_accepts_the_stage_at_once() -> None:
    a, b = Fake("a", Verdict(Reply(250, "2.1.5", "fine"))), Fake("b", Verdict(Reply(550)))
    assert await ask(ModuleHost([a, b], ModuleStats(), clock=CLOCK), Hook.RCPT) is None
    assert [] == b.seen


@pytest.mark.parametrize(
    ("on_error", "expected"),
    [("tempfail", Reply(451, "4.7.1", "Service temporarily unavailable, try again later")),
     ("reject", Reply(550, "5.7.1", "Message rejected by policy")), ("accept", None)],
)  # fmt: skip
async def test_on_error_decides_what_a_timeout_means(
    on_error: ModuleOnError, expected: Any
) -> None:
    stats = ModuleStats()
    slow = Fake("slow", on_error=on_error, delay_s=5)
    assert expected == await ask(ModuleHost([slow], stats, clock=CLOCK), Hook.MAIL)
    assert {("slow", "on_mail_from", "timeout"): 1} == stats.calls


async def test_an_exception_is_counted_each_time_and_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    stats = ModuleStats()
    host = ModuleHost([Fake("bug", RuntimeError("boom"))], stats, clock=clock)
    for _ in range(3):
        assert 451 == (await ask(host, Hook.HELO) or Reply(250)).code
    clock.advance(61)
    await ask(host, Hook.HELO)
    assert 4 == stats.calls[("bug", "on_helo", "error")]
    logged = [r for r in caplog.records if r.getMessage() == "Module call failed"]
    assert 2 == len(logged)
    assert "failing" == host.status()[0]["health"]


def test_each_module_sees_the_message_as_the_one_before_left_it() -> None:
    first = Fake("first", Verdict(changes=Changes(headers=(AddHeader("X-First", "1"),))))
    second = Fake("second", Verdict(changes=Changes(headers=(DeleteHeader("Subject"),))))
    message = AcceptedMessage("ID", b"Subject: s\r\nFrom: a@b\r\n\r\nbody\r\n", sender="a@b",
                              recipients=["r@x"], facts=FACTS)  # fmt: skip
    host = ModuleHost([first, second], ModuleStats(), clock=CLOCK)
    assert asyncio.run(host.data(session(), message)) is None
    assert ("X-First", "1") in second.seen[0].headers
    assert b"From: a@b\r\nX-First: 1\r\n\r\nbody\r\n" == message.to_bytes()


async def test_a_call_that_awaits_keeps_its_answer_under_the_deadline() -> None:
    # the host runs a call's first step itself and only arms the deadline when the call
    # suspends: what comes after the await must still reach the host, within budget
    waits = Fake("waits", Verdict(Reply(550, "5.7.1", "late no")), delay_s=0.01)
    stats = ModuleStats()
    assert Reply(550, "5.7.1", "late no") == await ask(
        ModuleHost([waits], stats, clock=CLOCK), Hook.RCPT
    )
    assert {("waits", "on_rcpt_to", "reject"): 1} == stats.calls


async def test_cancelling_a_session_cancels_the_module_call_it_waits_for() -> None:
    clock = FakeClock()
    stuck = Fake("stuck", delay_s=0.01)
    cancelled: list[bool] = []
    inner = stuck._reply

    async def reply(seen: Any) -> Verdict:
        try:
            return await inner(seen)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    stuck._reply = reply  # type: ignore[method-assign]
    host = ModuleHost([stuck], ModuleStats(), clock=clock)
    task = asyncio.ensure_future(ask(host, Hook.MAIL))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [True] == cancelled


def test_a_module_sees_the_headers_as_they_were_when_it_was_called() -> None:
    first = Fake("first", Verdict(changes=Changes(headers=(AddHeader("X-First", "1"),))))
    message = AcceptedMessage("ID", b"Subject: s\r\n\r\nbody\r\n", sender="a@b",
                              recipients=["r@x"], facts=FACTS)  # fmt: skip
    host = ModuleHost([first], ModuleStats(), clock=CLOCK)
    assert asyncio.run(host.data(session(), message)) is None
    seen = first.seen[0]  # read only now, after its own change was applied
    assert (("Subject", "s"),) == seen.headers
    assert Message("a@b", ("r@x",), (("Subject", "s"),), b"body\r\n") == seen


def test_a_full_delivery_event_queue_drops_and_counts() -> None:
    async def go() -> ModuleStats:
        stats = ModuleStats()
        host = ModuleHost([Fake("events", hooks=frozenset({Hook.DELIVERY}))], stats, clock=CLOCK)
        host.start(lambda coro, name: asyncio.get_running_loop().create_task(coro, name=name))
        event = DeliveryEvent("delivered", "ID", "x.test", "a@b", ("r@x.test",), 1)
        for _ in range(1005):
            host.delivery_event(event)
        await host.close()
        return stats

    # 1005 events handed over without yielding: the queue holds 1000, 5 are dropped
    assert {"events": 5} == asyncio.run(go()).dropped


def test_loading_needs_async_hooks_and_names_the_entry() -> None:
    cfg = ModuleConfig(type="Python", name="empath.modules.api:Reply")
    with pytest.raises(ConfigError, match=r"modules\[0\] \(empath.modules.api:Reply\)"):
        build_host((cfg,), ModuleContext(resolver=None, hostname="h"), ModuleStats())


class _Decides:
    """Hooks of every shape, for never_suspends()."""

    async def plain(self, session: Session, arg: str) -> Reply | None:
        return Reply(550) if arg == "x" else None

    async def awaits(self, session: Session, arg: str) -> None:
        await asyncio.sleep(0)

    async def bounded(self, session: Session, arg: str) -> None:
        async with asyncio.timeout(1):  # noqa: ASYNC100 - the point: it has no await
            pass

    async def iterates(self, session: Session, arg: str) -> None:
        async for _ in _nothing():
            pass

    def not_async(self, session: Session, arg: str) -> None:
        return None


async def _nothing() -> AsyncIterator[int]:
    none: tuple[int, ...] = ()
    for i in none:
        yield i


def test_only_an_async_hook_with_no_await_async_with_or_async_for_never_suspends() -> None:
    d = _Decides()
    assert never_suspends(d.plain)
    assert not never_suspends(d.awaits)
    assert not never_suspends(d.bounded)  # asyncio.timeout() needs a task on 3.11
    assert not never_suspends(d.iterates)
    assert not never_suspends(d.not_async)
    assert not never_suspends(functools.partial(d.plain))  # not looked into: a task


_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("_VAR", default="outside")


class _SetsVar:
    def __init__(self, arguments: dict[str, object]) -> None:
        pass

    async def on_rcpt_to(self, session: Session, recipient: str) -> Reply | None:
        _VAR.set("inside")
        if recipient == "raise":
            raise RuntimeError("bug")
        return Reply(550, "5.7.1", "no") if recipient == "x" else None


def test_a_hook_that_never_suspends_is_answered_in_place_in_a_context_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = ModuleConfig(type="Python", name="m:SetsVar")
    flt = PythonFilter(cfg, _SetsVar({}))
    assert frozenset({Hook.RCPT}) == flt.immediate
    stats = ModuleStats()
    host = ModuleHost([flt], stats, clock=CLOCK)
    assert frozenset({CheckStage.RCPT}) == host.now
    # no event loop at all: nothing is scheduled
    assert Reply(550, "5.7.1", "no") == host.stage_now(Hook.RCPT, session(), "x")
    assert host.stage_now(Hook.RCPT, session(), "ok") is None
    assert 451 == (host.stage_now(Hook.RCPT, session(), "raise") or Reply(250)).code
    assert "outside" == _VAR.get()  # what the hook set stayed in its own context
    assert {("m:SetsVar", "on_rcpt_to", "reject"): 1, ("m:SetsVar", "on_rcpt_to", "continue"): 1,
            ("m:SetsVar", "on_rcpt_to", "error"): 1} == stats.calls  # fmt: skip
    assert 1 == len([r for r in caplog.records if r.getMessage() == "Module call failed"])


def test_a_stage_is_answered_in_place_only_if_every_module_asked_never_suspends() -> None:
    cfg = ModuleConfig(type="Python", name="m:SetsVar")
    waits = Fake("waits", hooks=frozenset({Hook.MAIL, Hook.RCPT}))  # immediate: none
    host = ModuleHost([PythonFilter(cfg, _SetsVar({})), waits], ModuleStats(), clock=CLOCK)
    assert frozenset({CheckStage.RCPT, CheckStage.MAIL}) == host.checks
    assert frozenset() == host.now


async def test_a_milters_session_cleanup_runs_under_the_daemons_supervisor() -> None:
    """The milter QUIT after a session is a background task the supervisor knows of
    (shutdown cancels it, a crash is logged), not a bare task."""

    class Milter(Fake):
        kind: Literal["module", "milter"] = "milter"

    host = ModuleHost([Milter("m", hooks=frozenset())], ModuleStats(), clock=CLOCK)
    supervisor = Supervisor()
    host.start(supervisor.spawn)
    host.session_closed_soon(Session(id="s", peer_ip="192.0.2.1", peer_port=1, listener="l"))
    assert ["module-session-cleanup"] == supervisor.names()
    await supervisor.shutdown()


class _EventsInPlace:
    """An on_delivery_event that never awaits: events are handed over without a task."""

    def __init__(self, arguments: dict[str, object]) -> None:
        self.seen: list[tuple[str, object]] = []

    async def on_delivery_event(self, event: DeliveryEvent) -> None:
        self.seen.append((event.message_id, _EVENT_VAR.get()))
        _EVENT_VAR.set("changed by the module")


_EVENT_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("_EVENT_VAR", default="unset")


def test_events_for_a_hook_that_never_awaits_come_later_in_order_without_a_task() -> None:
    """Fire-and-forget: delivery_event() returns at once; the hook sees every event of
    the batch in order on a later loop turn, in a context of its own (what it sets
    stays there), and no consumer task exists for it."""
    module = _EventsInPlace({})
    filt = PythonFilter(ModuleConfig(type="Python", name="x:Y"), module)
    assert Hook.DELIVERY in filt.immediate

    async def go() -> tuple[list[tuple[str, object]], int, int, str]:
        stats = ModuleStats()
        host = ModuleHost([filt], stats, clock=CLOCK)
        tasks_before = len(asyncio.all_tasks())
        host.start(lambda coro, name: asyncio.get_running_loop().create_task(coro, name=name))
        tasks = len(asyncio.all_tasks()) - tasks_before
        for i in range(3):
            host.delivery_event(DeliveryEvent("delivered", f"ID{i}", "x.test", "a@b", ("r@x",), 1))
        assert [] == module.seen  # nothing ran in the caller
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await host.close()
        return (
            module.seen,
            tasks,
            stats.calls[("x:Y", "on_delivery_event", "continue")],
            _EVENT_VAR.get(),
        )

    seen, tasks, counted, here = asyncio.run(go())
    assert [("ID0", "unset"), ("ID1", "changed by the module"),
            ("ID2", "changed by the module")] == seen  # fmt: skip
    assert (0, 3, "unset") == (tasks, counted, here)


def test_a_full_in_place_event_queue_drops_and_counts() -> None:
    """The in-place hand-over is bounded as the consumer queue is: 1,000 wait, the rest
    are dropped and counted."""
    module = _EventsInPlace({})
    filt = PythonFilter(ModuleConfig(type="Python", name="x:Y"), module)

    async def go() -> ModuleStats:
        stats = ModuleStats()
        host = ModuleHost([filt], stats, clock=CLOCK)
        host.start(lambda coro, name: asyncio.get_running_loop().create_task(coro, name=name))
        event = DeliveryEvent("delivered", "ID", "x.test", "a@b", ("r@x.test",), 1)
        for _ in range(1005):
            host.delivery_event(event)
        await asyncio.sleep(0)
        await host.close()
        return stats

    stats = asyncio.run(go())
    assert {"x:Y": 5} == stats.dropped
    assert 1000 == stats.calls[("x:Y", "on_delivery_event", "continue")]
    assert 1000 == len(module.seen)


def test_a_module_that_never_reads_the_message_leaves_it_unparsed() -> None:
    """The view a hook gets splits the message only when the hook reads headers or body:
    the message itself stays as received (and is spooled as received)."""
    data = b"Subject: s\r\n\tfolded\r\n\r\nbody\r\n"
    message = AcceptedMessage("ID", data, sender="a@b", recipients=["r@x"], facts=FACTS)
    looks = Fake("looks")
    assert (
        asyncio.run(ModuleHost([looks], ModuleStats(), clock=CLOCK).data(session(), message))
        is None
    )
    assert data == message.raw
    assert message.to_bytes() is data
    seen = looks.seen[0]  # read now: parsed from the bytes it was given
    assert (("Subject", "s\r\n\tfolded"),) == seen.headers
    assert b"body\r\n" == seen.body
    assert Message("a@b", ("r@x",), (("Subject", "s\r\n\tfolded"),), b"body\r\n") == seen
    assert data == message.raw  # the view's parse is its own


@pytest.mark.parametrize(
    ("status", "history", "kind", "detail"),
    [
        (UnitStatus.DELIVERED, (Attempt(1.0, "mx", 250, "2.0.0 Ok"),), "delivered", "250 2.0.0 Ok"),
        (UnitStatus.RETRY, (Attempt(1.0, "", None, "connection refused"),), "deferred",
         "connection refused"),
        (UnitStatus.FAILED, (), "failed", "gave up"),
    ],
)  # fmt: skip
def test_a_delivery_event_is_the_units_outcome_as_the_api_constructor_builds_it(
    status: UnitStatus, history: tuple[Attempt, ...], kind: DeliveryKind, detail: str
) -> None:
    """delivery_event() (which fills the frozen event's slots itself) gives exactly what
    DeliveryEvent(...) gives, and a frozen one."""
    (unit,) = initial_units(["a@x.test", "b@x.test"])
    unit = dataclasses.replace(unit, status=status, attempts=2, history=history,
                               last_error="gave up")  # fmt: skip
    msg = MessageState("MSGID", Envelope("s@y.test", ("a@x.test", "b@x.test"), 1.0), (unit,))
    event = delivery_event(msg, unit)
    expected = DeliveryEvent(kind, "MSGID", "x.test", "s@y.test", ("a@x.test", "b@x.test"), 2,
                             detail)  # fmt: skip
    assert expected == event
    assert {} == event.extra
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.kind = "failed"  # type: ignore[misc]


class _InPlaceShapes:
    """Hooks that never await, answering, raising, and one whose awaitable suspends."""

    def __init__(self, arguments: dict[str, object]) -> None:
        self.suspend_on = ""

    async def on_rcpt_to(self, session: Session, arg: str) -> Reply | None:
        if arg == "raise":
            raise ValueError("boom")
        return Reply(550, "5.1.1", arg) if arg != "ok" else None


def test_in_place_calls_keep_answering_after_a_hook_raised_or_suspended() -> None:
    """Each in-place call gets its own answer: one that raises is the module's error
    (on_error), one that suspends is closed and reported, and the calls after either
    are answered as before."""
    flt = PythonFilter(ModuleConfig(type="Python", name="m:Shapes"), _InPlaceShapes({}))
    assert Hook.RCPT in flt.immediate
    host = ModuleHost([flt], ModuleStats(), clock=CLOCK)
    answers = [host.stage_now(Hook.RCPT, session(), a) for a in ("no", "raise", "ok", "x")]
    assert [Reply(550, "5.1.1", "no"), Reply(451, "4.7.1",
            "Service temporarily unavailable, try again later"), None,
            Reply(550, "5.1.1", "x")] == answers  # fmt: skip

    async def suspends() -> None:
        await asyncio.sleep(0)

    closed: list[bool] = []

    async def watched() -> None:
        try:
            await suspends()
        except GeneratorExit:
            closed.append(True)
            raise

    with pytest.raises(RuntimeError, match="on_rcpt_to suspended"):
        flt._fns[Hook.RCPT] = lambda s, a: watched()
        flt.now(Hook.RCPT, session(), "x")
    assert [True] == closed
    flt._fns[Hook.RCPT] = _InPlaceShapes({}).on_rcpt_to
    assert Verdict(Reply(550, "5.1.1", "y")) == flt.now(Hook.RCPT, session(), "y")
