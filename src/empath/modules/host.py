"""Running the configured modules and milters: order, timeouts, ``on_error``, counters.

Why this module is (just) over 600 lines: each hook has an awaited form and an in-place
form (no task, for filters that never suspend) that share the bookkeeping here.

Theory of operation
-------------------
Every ``modules`` entry is loaded into a :class:`Filter` (a Python module through
``loader.PythonFilter``, a milter through ``milter.module.MilterFilter``): one
uniform internal interface whose calls return a :class:`Verdict`.  The
:class:`ModuleHost` runs them in config order:

* **stage hooks** (connect, HELO, MAIL, RCPT): the first filter answering 4xx/5xx
  decides the stage; a 2xx from a Python module accepts the stage at once (later
  filters are not asked); ``None``/continue asks the next one;
* **end of data**: each filter sees the message as the ones before it changed it;
  changes accumulate; a 4xx/5xx or a discard ends the chain;
* **delivery events**: handed to each interested filter's bounded queue, so a slow
  module never holds up delivery; a full queue drops the event and counts it.  A
  hook that may await is fed by a consumer task; one that never does by an
  :class:`~empath.modules.events.EventDrain` (a loop callback per batch, no task).

Every call is bounded by the entry's timeout.  A timeout or an exception is
mapped by ``on_error`` (tempfail ``451 4.7.1``, reject ``550 5.7.1``, accept = carry
on), counted, and logged with its traceback at most once a minute per module and
hook (the rest are counted in the line that is logged).  Nothing a module does can
raise out of here.

The host is immutable once built; SIGHUP builds a new one and swaps it in
(sessions already running finish with the one they started with).
"""

from __future__ import annotations

import asyncio
import contextvars
import dis
import enum
import inspect
import time
from bisect import bisect_left
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, get_args

from empath.clock import Clock, SystemClock, deadline
from empath.logs import get_logger
from empath.modules.api import (
    Changes,
    DeliveryEvent,
    Message,
    OnError,
    Reply,
    Session,
)
from empath.modules.events import DELIVERY_QUEUE_MAX, EventDrain
from empath.modules.headers import apply_changes, message_view
from empath.smtp.events import CheckStage
from empath.stats import Histogram
from empath.supervisor import untracked
from empath.transport.acceptance import AcceptedMessage

__all__ = [
    "CONTINUE",
    "Filter",
    "Hook",
    "ModuleHost",
    "ModuleStats",
    "Verdict",
]

log = get_logger("modules", __name__)

ERROR_LOG_INTERVAL_S: Final = 60.0
# (the tuple's type spelled out: mypyc leaves an inferred Final tuple of floats unset)
DURATION_BUCKETS_S: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip


class Hook(enum.Enum):
    CONNECT = "on_connect"
    HELO = "on_helo"
    MAIL = "on_mail_from"
    RCPT = "on_rcpt_to"
    DATA = "on_data"
    DELIVERY = "on_delivery_event"

    # identity hashing in C (members are singletons): hooks key dicts on every call,
    # and Enum's own __hash__ is a Python-level call
    __hash__ = object.__hash__


STAGE_HOOKS: Final = (Hook.CONNECT, Hook.HELO, Hook.MAIL, Hook.RCPT)
_CHECK_OF: Final = {Hook.CONNECT: "connect", Hook.HELO: "helo", Hook.MAIL: "mail",
                    Hook.RCPT: "rcpt"}  # fmt: skip

Result = Literal[
    "continue", "accept", "reject", "tempfail", "changes", "discard", "timeout", "error"
]


@dataclass(frozen=True, slots=True)
class Verdict:
    """One filter's answer.  ``reply`` 2xx = accept now, 4xx/5xx = refuse;
    ``discard``: accept the message but throw it away (a milter's SMFIR_DISCARD)."""

    reply: Reply | None = None
    changes: Changes | None = None
    discard: bool = False
    accepted: bool = False  # a milter's SMFIR_ACCEPT: done with this message, carry on

    @property
    def result(self) -> Result:
        if self.discard:
            return "discard"
        reply = self.reply
        if reply is not None:
            if reply.code >= 500:
                return "reject"
            return "tempfail" if reply.code >= 400 else "accept"
        if self.accepted:
            return "accept"
        return "changes" if self.changes else "continue"


CONTINUE: Final = Verdict()
_ON_ERROR_REPLY: Final[dict[str, Reply | None]] = {
    "tempfail": Reply(451, "4.7.1", "Service temporarily unavailable, try again later"),
    "reject": Reply(550, "5.7.1", "Message rejected by policy"),
    "accept": None,
}


@dataclass(frozen=True, slots=True)
class CallTimeouts:
    """How long one call into a filter may take, in seconds (a ``modules`` entry's
    ``timeouts``; ``modules/loader.py`` builds it from the config)."""

    connect_secs: float
    command_secs: float
    end_of_message_secs: float


class Filter(Protocol):
    """One loaded ``modules`` entry, as the host drives it.  ``immediate``: the hooks
    whose calls never suspend (see :func:`never_suspends`), so the host may run them
    to their end in place, without a task."""

    label: str
    kind: Literal["module", "milter"]
    hooks: frozenset[Hook]
    immediate: frozenset[Hook]
    timeouts: CallTimeouts
    on_error: OnError

    def budget(self, hook: Hook) -> float:
        """The most one call of ``hook`` may take, in seconds."""
        ...

    async def stage(self, hook: Hook, session: Session, arg: str) -> Verdict: ...

    async def data(self, session: Session, message: Message) -> Verdict: ...

    def now(self, hook: Hook, session: Session | None, arg: Any) -> Verdict:
        """A call of a hook in ``immediate``, run to its end here: ``arg`` is what
        :meth:`stage`, :meth:`data` or :meth:`delivery` take after the session."""
        ...

    async def delivery(self, event: DeliveryEvent) -> None: ...

    async def session_closed(self, session: Session) -> None: ...

    async def close(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


# What a coroutine's code does to suspend: await (GET_AWAITABLE/SEND/YIELD_VALUE),
# async with (BEFORE_ASYNC_WITH), async for (GET_AITER/GET_ANEXT/END_ASYNC_FOR).
_SUSPENDING_OPS: Final = frozenset(
    {"GET_AWAITABLE", "SEND", "YIELD_VALUE", "BEFORE_ASYNC_WITH", "GET_AITER", "GET_ANEXT",
     "END_ASYNC_FOR"}
)  # fmt: skip


def never_suspends(fn: object) -> bool:
    """True when ``fn`` is an ``async def`` (or a method of one) whose body has no
    await, ``async with`` or ``async for``: its coroutine always finishes in its first
    step.  Such a call can run to its end outside any task: it cannot reach anything
    that needs one (``asyncio.timeout()`` is an ``async with``).  Anything else —
    a wrapped or native callable, a body that awaits — is False."""
    func = getattr(fn, "__func__", fn)
    code = getattr(func, "__code__", None)
    if code is None or not inspect.iscoroutinefunction(func):
        return False
    return not any(ins.opname in _SUSPENDING_OPS for ins in dis.get_instructions(code))


class _Rest:
    """Awaiting this carries on a coroutine that suspended in its first step (its
    yielded future given back to the task first); sends, throws (cancellation) and the
    result pass through as ``await coro`` would have passed them."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Verdict], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Verdict]:
        coro = self._coro
        out = self._first
        while True:
            try:
                sent = yield out
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the task (a cancellation): pass on
                try:
                    out = coro.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
            else:
                try:
                    out = coro.send(sent)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]


@dataclass(slots=True)
class _Health:
    failing: bool = False  # the last call failed
    last_error: float = 0.0
    error: str = ""
    suppressed: int = 0
    logged_at: dict[Hook, float] = field(default_factory=dict)


class ModuleStats:
    """The counters behind the module metrics; one per daemon (kept across reloads)."""

    __slots__ = ("calls", "dropped", "durations", "milter_errors")

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str, str], int] = {}
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.milter_errors: dict[tuple[str, str], int] = {}
        self.dropped: dict[str, int] = {}

    def observe(self, module: str, hook: Hook, result: str, seconds: float) -> None:
        key = (module, hook.value, result)
        self.calls[key] = self.calls.get(key, 0) + 1
        self.histogram(module, hook.value).observe(seconds)

    def histogram(self, module: str, hook: str) -> Histogram:
        hist = self.durations.get((module, hook))
        if hist is None:
            hist = self.durations[(module, hook)] = Histogram(DURATION_BUCKETS_S)
        return hist

    def milter_error(self, milter: str, kind: str) -> None:
        key = (milter, kind)
        self.milter_errors[key] = self.milter_errors.get(key, 0) + 1


_RESULTS: Final[tuple[str, ...]] = get_args(Result)


class _Slot:
    """One filter's calls of one hook, with what each call records looked up once
    (the counters' keys, the histogram, the filter's health)."""

    __slots__ = ("_bounds", "_buckets", "_calls", "_hist", "_keys", "f", "health", "hook",
                 "immediate")  # fmt: skip

    def __init__(self, f: Filter, hook: Hook, health: _Health, stats: ModuleStats) -> None:
        self.f = f
        self.hook = hook
        self.health = health
        self.immediate = hook in f.immediate
        self._calls = stats.calls
        self._keys: dict[str, tuple[str, str, str]] = {
            r: (f.label, hook.value, r) for r in _RESULTS
        }
        hist = self._hist = stats.histogram(f.label, hook.value)
        # Histogram.observe done here (a call into interpreted stats.py per module call
        # was a third of this bookkeeping): its bounds, and its bucket list updated in place
        self._bounds: tuple[float, ...] = hist._bounds
        self._buckets: list[int] = hist._counts

    def record(self, result: str, seconds: float) -> None:
        key = self._keys[result]
        calls = self._calls
        calls[key] = calls.get(key, 0) + 1
        self._buckets[bisect_left(self._bounds, seconds)] += 1
        hist = self._hist
        hist.count += 1
        hist.sum += seconds


def _stage_answer(session: Session, verdict: Verdict) -> tuple[bool, Reply | None]:
    """Whether ``verdict`` decides a stage, and the stage's answer (None: the usual reply).
    A discard marks the session and lets the next filter speak."""
    if verdict.discard:
        session.notes["empath.discard"] = True
        return False, None
    reply = verdict.reply
    if reply is None:
        return False, None
    return True, (None if reply.code < 400 else reply)


class ModuleHost:
    """The configured filters, in order; see the module docstring."""

    def __init__(
        self,
        filters: list[Filter],
        stats: ModuleStats,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.filters = tuple(filters)
        self.stats = stats
        self._clock = clock or SystemClock()
        self._monotonic = self._clock.monotonic
        self._health = {id(f): _Health() for f in filters}
        self._by_hook = {hook: tuple(f for f in filters if hook in f.hooks) for hook in Hook}
        self._slots = {
            hook: tuple(_Slot(f, hook, self._health[id(f)], stats) for f in fs)
            for hook, fs in self._by_hook.items()
        }
        self.stage_hooks = frozenset(h for h in STAGE_HOOKS if self._by_hook[h])
        # what the SMTP state machine stops for (smtp.events.CheckStage, by value)
        self.checks = frozenset(CheckStage(_CHECK_OF[h]) for h in self.stage_hooks)
        # ... and of those, where every filter asked answers without suspending: the
        # session runs them in place (stage_now) instead of in a task
        self.now = frozenset(
            CheckStage(_CHECK_OF[h])
            for h in self.stage_hooks
            if all(h in f.immediate for f in self._by_hook[h])
        )
        self.has_data = bool(self._by_hook[Hook.DATA])
        self.data_immediate = all(Hook.DATA in f.immediate for f in self._by_hook[Hook.DATA])
        self.wants_delivery_events = bool(self._by_hook[Hook.DELIVERY])
        self._needs_cleanup = any(f.kind == "milter" for f in filters)
        self._cleanups: set[asyncio.Task[None]] = set()
        self._spawn: Callable[..., asyncio.Task[None]] | None = None  # set by start()
        self._queues: list[tuple[str, asyncio.Queue[DeliveryEvent]]] = []
        self._consumers: list[asyncio.Task[None]] = []
        self._drains: list[EventDrain] = []

    def __bool__(self) -> bool:
        return bool(self.filters)

    # -- calls ------------------------------------------------------------------

    async def _call(
        self, slot: _Slot, timeout_s: float, call: Coroutine[Any, Any, Verdict]
    ) -> Verdict:
        started = time.perf_counter()
        try:
            # A hook that never suspends (most Python hooks: a decision from what they
            # were given) finishes in its first step: no timer is armed for it.  One that
            # awaits carries on under the deadline, less what the first step took.
            verdict: Verdict
            try:
                first = call.send(None)
            except StopIteration as done:
                verdict = done.value
            else:
                left = timeout_s - (time.perf_counter() - started)
                async with deadline(self._clock, max(left, 0.0)):
                    verdict = await _Rest(call, first)
        except TimeoutError:
            return self._timed_out(slot, timeout_s, started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._raised(slot, exc, started)
        finally:
            call.close()  # a no-op once finished; frees one abandoned by a cancellation
        return self._answered(slot, verdict, started)

    def _call_now(self, slot: _Slot, session: Session | None, arg: Any) -> Verdict:
        """:meth:`_call` for a hook in ``f.immediate``: run to its end here, through
        the filter's ``now`` (no coroutine of ours around the hook's)."""
        started = time.perf_counter()
        try:
            verdict = slot.f.now(slot.hook, session, arg)
        except TimeoutError:
            return self._timed_out(slot, slot.f.budget(slot.hook), started)
        except (Exception, asyncio.CancelledError) as exc:  # nobody cancels a call in place
            return self._raised(slot, exc, started)
        return self._answered(slot, verdict, started)

    def _answered(self, slot: _Slot, verdict: Verdict, started: float) -> Verdict:
        slot.health.failing = False
        result = "continue" if verdict is CONTINUE else verdict.result
        slot.record(result, time.perf_counter() - started)
        return verdict

    def _timed_out(self, slot: _Slot, timeout_s: float, started: float) -> Verdict:
        self._failed(slot.f, slot.hook, slot.health, f"timed out after {timeout_s:g} s", tb=False)
        slot.record("timeout", time.perf_counter() - started)
        return self._on_error(slot.f)

    def _raised(self, slot: _Slot, exc: BaseException, started: float) -> Verdict:
        error = f"{type(exc).__name__}: {exc}"
        self._failed(slot.f, slot.hook, slot.health, error, tb=True)
        slot.record("error", time.perf_counter() - started)
        return self._on_error(slot.f)

    @staticmethod
    def _on_error(f: Filter) -> Verdict:
        reply = _ON_ERROR_REPLY[f.on_error]
        return CONTINUE if reply is None else Verdict(reply)

    def _failed(self, f: Filter, hook: Hook, health: _Health, error: str, *, tb: bool) -> None:
        now = self._monotonic()
        health.failing = True
        health.last_error = now
        health.error = error
        last = health.logged_at.get(hook)
        if last is not None and now - last < ERROR_LOG_INTERVAL_S:
            health.suppressed += 1
            return
        health.logged_at[hook] = now
        fields = {
            f.kind: f.label,
            "hook": hook.value,
            "on_error": f.on_error,
            "suppressed": health.suppressed,
        }
        health.suppressed = 0
        if tb:
            log.exception("Module call failed", **fields)
        else:
            log.warn("Module call failed", error=error, **fields)

    # -- stages -----------------------------------------------------------------

    async def stage(self, hook: Hook, session: Session, arg: str) -> Reply | None:
        """Connect/HELO/MAIL/RCPT: None = carry on with the usual reply, else the reply."""
        for slot in self._slots[hook]:
            f = slot.f
            verdict = await self._call(slot, f.budget(hook), f.stage(hook, session, arg))
            decided, reply = _stage_answer(session, verdict)
            if decided:
                return reply
        return None

    def stage_now(self, hook: Hook, session: Session, arg: str) -> Reply | None:
        """:meth:`stage` run here and now, for a stage in :attr:`now` (every filter
        asked answers without suspending): no task, no event-loop turn.  In a copy of
        the current context, as a task would run it."""
        return contextvars.copy_context().run(self._stage_now, hook, session, arg)

    def _stage_now(self, hook: Hook, session: Session, arg: str) -> Reply | None:
        for slot in self._slots[hook]:
            decided, reply = _stage_answer(session, self._call_now(slot, session, arg))
            if decided:
                return reply
        return None

    async def data(self, session: Session, message: AcceptedMessage) -> Reply | None:
        """End of data (the acceptance pipeline's MODULES step): each filter sees the
        message as the ones before it left it; None = carry on (the message may have
        been changed or discarded), else the 4xx/5xx reply."""
        if session.notes.pop("empath.discard", False):
            message.discard("discarded by a milter before end of data")
            return None
        session.notes["empath.queue_id"] = message.id
        for slot in self._slots[Hook.DATA]:
            f = slot.f
            verdict = await self._call(
                slot, f.budget(Hook.DATA), f.data(session, message_view(message))
            )
            done, reply = self._data_answer(f, message, verdict)
            if done:
                return reply
        return None

    def data_now(self, session: Session, message: AcceptedMessage) -> Reply | None:
        """:meth:`data` here and now, when every filter's ``on_data`` never suspends
        (:attr:`data_immediate`); in a copy of the current context."""
        return contextvars.copy_context().run(self._data_now, session, message)

    def _data_now(self, session: Session, message: AcceptedMessage) -> Reply | None:
        if session.notes.pop("empath.discard", False):
            message.discard("discarded by a milter before end of data")
            return None
        session.notes["empath.queue_id"] = message.id
        for slot in self._slots[Hook.DATA]:
            verdict = self._call_now(slot, session, message_view(message))
            done, reply = self._data_answer(slot.f, message, verdict)
            if done:
                return reply
        return None

    def _data_answer(
        self, f: Filter, message: AcceptedMessage, verdict: Verdict
    ) -> tuple[bool, Reply | None]:
        """Carry out one filter's end-of-data verdict: (the chain ends, its reply)."""
        if verdict.changes:
            try:
                apply_changes(message, verdict.changes)
            except ValueError as exc:
                self._failed(f, Hook.DATA, self._health[id(f)], str(exc), tb=False)
                verdict = self._on_error(f)
        if verdict.discard:
            message.discard(f"discarded by {f.label}")
            return True, None
        reply = verdict.reply
        if reply is not None:
            return True, (None if reply.code < 400 else reply)
        return False, None

    def session_closed_soon(self, session: Session) -> None:
        """The SMTP session ended: let each filter clean up (milter QUIT) in the
        background; the task is kept until it is done."""
        if not self._needs_cleanup:
            return
        name = "module-session-cleanup"
        if self._spawn is not None:  # under the daemon's supervisor
            task = self._spawn(self.session_closed(session), name=name)
        else:  # a host used without a daemon (tests, tools)
            task = untracked(self.session_closed(session), name=name)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def session_closed(self, session: Session) -> None:
        for f in self.filters:
            try:
                await f.session_closed(session)
            except Exception:  # never let a module's cleanup hurt the session
                log.exception("Module cleanup failed", module=f.label)

    # -- delivery events --------------------------------------------------------

    def start(self, spawn: Callable[..., asyncio.Task[None]]) -> None:
        """Start taking delivery events (a consumer task per interested filter whose
        hook may suspend; a batch callback for one whose hook never does); ``spawn``
        also starts the filters' session cleanups from now on."""
        self._spawn = spawn
        loop = asyncio.get_running_loop()
        for slot in self._slots[Hook.DELIVERY]:
            f = slot.f
            if slot.immediate:
                # its calls run from loop callbacks in one context of their own, as they
                # would in the consumer task's
                self._drains.append(
                    EventDrain(
                        loop, contextvars.copy_context(), self._caller(slot), self._dropper(f.label)
                    )
                )
                continue
            q: asyncio.Queue[DeliveryEvent] = asyncio.Queue(DELIVERY_QUEUE_MAX)
            self._queues.append((f.label, q))
            name = f"module-events-{f.label}"
            self._consumers.append(spawn(self._consume(slot, q), name=name))

    def delivery_event(self, event: DeliveryEvent) -> None:
        """Hand ``event`` to each interested filter; never blocks, never raises."""
        for drain in self._drains:
            drain.put(event)
        for label, q in self._queues:
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                self._dropped(label)

    def _dropped(self, label: str) -> None:
        dropped = self.stats.dropped
        dropped[label] = dropped.get(label, 0) + 1

    def _caller(self, slot: _Slot) -> Callable[[DeliveryEvent], object]:
        return lambda event: self._call_now(slot, None, event)

    def _dropper(self, label: str) -> Callable[[], None]:
        return lambda: self._dropped(label)

    async def _consume(self, slot: _Slot, q: asyncio.Queue[DeliveryEvent]) -> None:
        f = slot.f

        async def one(event: DeliveryEvent) -> Verdict:
            await f.delivery(event)
            return CONTINUE

        while True:
            event = await q.get()
            await self._call(slot, f.budget(Hook.DELIVERY), one(event))

    async def close(self) -> None:
        for task in self._consumers:
            task.cancel()
        for drain in self._drains:
            drain.close()
        for f in self.filters:
            try:
                await f.close()
            except Exception:
                log.exception("Module close failed", module=f.label)

    # -- status -----------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """One entry per filter for ``empathctl system status``."""
        out = []
        now = self._monotonic()
        for f in self.filters:
            h = self._health[id(f)]
            failing = h.failing and now - h.last_error < 300
            entry = {
                "name": f.label,
                "type": "Milter" if f.kind == "milter" else "Python",
                "hooks": [hook.value for hook in Hook if hook in f.hooks],
                "health": "failing" if failing else "ok",
                "last_error": h.error if failing else "",
                "on_error": f.on_error,
            }
            entry.update(f.status())
            out.append(entry)
        return out
