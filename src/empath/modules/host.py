"""Running the configured modules and milters: order, timeouts, ``on_error``, counters.

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
* **delivery events**: handed to each interested filter's bounded queue and
  consumed by one task per filter, so a slow module never holds up delivery; a
  full queue drops the event and counts it.

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
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from empath.config.model import ModuleOnError, ModuleTimeouts
from empath.modules.api import Changes, DeliveryEvent, Message, Reply, Session
from empath.modules.headers import apply_changes, split_message
from empath.observability.logs import get_logger
from empath.observability.stats import Histogram

__all__ = [
    "CONTINUE",
    "DataOutcome",
    "Filter",
    "Hook",
    "ModuleHost",
    "ModuleStats",
    "Verdict",
]

log = get_logger("modules", __name__)

ERROR_LOG_INTERVAL_S: Final = 60.0
DELIVERY_QUEUE_MAX: Final = 1000
DURATION_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                             2.5, 5.0, 10.0, 30.0)  # fmt: skip


class Hook(enum.Enum):
    CONNECT = "on_connect"
    HELO = "on_helo"
    MAIL = "on_mail_from"
    RCPT = "on_rcpt_to"
    DATA = "on_data"
    DELIVERY = "on_delivery_event"


STAGE_HOOKS: Final = (Hook.CONNECT, Hook.HELO, Hook.MAIL, Hook.RCPT)

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


class Filter(Protocol):
    """One loaded ``modules`` entry, as the host drives it."""

    label: str
    kind: Literal["module", "milter"]
    hooks: frozenset[Hook]
    timeouts: ModuleTimeouts
    on_error: ModuleOnError

    def budget(self, hook: Hook) -> float:
        """The most one call of ``hook`` may take, in seconds."""
        ...

    async def stage(self, hook: Hook, session: Session, arg: str) -> Verdict: ...

    async def data(self, session: Session, message: Message) -> Verdict: ...

    async def delivery(self, event: DeliveryEvent) -> None: ...

    async def session_closed(self, session: Session) -> None: ...

    async def close(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


@dataclass(slots=True)
class _Health:
    last_ok: float = 0.0
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
        hk = (module, hook.value)
        hist = self.durations.get(hk)
        if hist is None:
            hist = self.durations[hk] = Histogram(DURATION_BUCKETS_S)
        hist.observe(seconds)

    def milter_error(self, milter: str, kind: str) -> None:
        key = (milter, kind)
        self.milter_errors[key] = self.milter_errors.get(key, 0) + 1


@dataclass(frozen=True, slots=True)
class DataOutcome:
    """End of data: ``reply`` set = refuse with it; else spool ``message`` for
    ``recipients`` (changed by the filters), or nothing at all when ``discard``."""

    reply: Reply | None
    message: bytes
    recipients: tuple[str, ...]
    discard: bool = False
    changed: bool = False


class ModuleHost:
    """The configured filters, in order; see the module docstring."""

    def __init__(
        self,
        filters: list[Filter],
        stats: ModuleStats,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.filters = tuple(filters)
        self.stats = stats
        self._monotonic = monotonic
        self._health = {id(f): _Health() for f in filters}
        self._by_hook = {hook: tuple(f for f in filters if hook in f.hooks) for hook in Hook}
        self.stage_hooks = frozenset(h for h in STAGE_HOOKS if self._by_hook[h])
        self.has_data = bool(self._by_hook[Hook.DATA])
        self._queues: dict[int, asyncio.Queue[DeliveryEvent]] = {}
        self._consumers: list[asyncio.Task[None]] = []

    def __bool__(self) -> bool:
        return bool(self.filters)

    # -- calls ------------------------------------------------------------------

    async def _call(
        self, f: Filter, hook: Hook, timeout_s: float, call: Awaitable[Verdict]
    ) -> Verdict:
        started = time.perf_counter()
        health = self._health[id(f)]
        try:
            async with asyncio.timeout(timeout_s):
                verdict = await call
        except TimeoutError:
            self._failed(f, hook, health, f"timed out after {timeout_s:g} s", tb=False)
            self.stats.observe(f.label, hook, "timeout", time.perf_counter() - started)
            return self._on_error(f)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(f, hook, health, f"{type(exc).__name__}: {exc}", tb=True)
            self.stats.observe(f.label, hook, "error", time.perf_counter() - started)
            return self._on_error(f)
        health.last_ok = self._monotonic()
        self.stats.observe(f.label, hook, verdict.result, time.perf_counter() - started)
        return verdict

    @staticmethod
    def _on_error(f: Filter) -> Verdict:
        reply = _ON_ERROR_REPLY[f.on_error]
        return CONTINUE if reply is None else Verdict(reply)

    def _failed(self, f: Filter, hook: Hook, health: _Health, error: str, *, tb: bool) -> None:
        now = self._monotonic()
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
        for f in self._by_hook[hook]:
            timeout = f.budget(hook)
            verdict = await self._call(f, hook, timeout, f.stage(hook, session, arg))
            if verdict.discard:
                session.notes["empath.discard"] = True
                continue
            reply = verdict.reply
            if reply is not None:
                return None if reply.code < 400 else reply
        return None

    async def data(self, session: Session, message: bytes, sender: str,
                   recipients: tuple[str, ...]) -> DataOutcome:  # fmt: skip
        """End of data (one step of the acceptance pipeline)."""
        discard = bool(session.notes.pop("empath.discard", False))
        changed = False
        if discard:
            return DataOutcome(None, message, recipients, discard=True)
        for f in self._by_hook[Hook.DATA]:
            fields, body = split_message(message)
            view = Message(sender, recipients, tuple((x.name, x.value) for x in fields), body)
            timeout = f.budget(Hook.DATA)
            verdict = await self._call(f, Hook.DATA, timeout, f.data(session, view))
            if verdict.changes:
                message, recipients = apply_changes(message, recipients, [verdict.changes])
                changed = True
            if verdict.discard:
                return DataOutcome(None, message, recipients, discard=True, changed=changed)
            reply = verdict.reply
            if reply is not None:
                if reply.code >= 400:
                    return DataOutcome(reply, message, recipients, changed=changed)
                break
        return DataOutcome(None, message, recipients, changed=changed)

    async def session_closed(self, session: Session) -> None:
        for f in self.filters:
            try:
                await f.session_closed(session)
            except Exception:  # never let a module's cleanup hurt the session
                log.exception("Module cleanup failed", module=f.label)

    # -- delivery events --------------------------------------------------------

    def start(self, spawn: Callable[..., asyncio.Task[None]]) -> None:
        """Start one delivery-event consumer per interested filter."""
        for f in self._by_hook[Hook.DELIVERY]:
            q: asyncio.Queue[DeliveryEvent] = asyncio.Queue(DELIVERY_QUEUE_MAX)
            self._queues[id(f)] = q
            self._consumers.append(spawn(self._consume(f, q), name=f"module-events-{f.label}"))

    def delivery_event(self, event: DeliveryEvent) -> None:
        """Hand ``event`` to each interested filter; never blocks, never raises."""
        for f in self._by_hook[Hook.DELIVERY]:
            q = self._queues.get(id(f))
            if q is None:
                continue
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                self.stats.dropped[f.label] = self.stats.dropped.get(f.label, 0) + 1

    async def _consume(self, f: Filter, q: asyncio.Queue[DeliveryEvent]) -> None:
        async def one(event: DeliveryEvent) -> Verdict:
            await f.delivery(event)
            return CONTINUE

        while True:
            event = await q.get()
            await self._call(f, Hook.DELIVERY, f.budget(Hook.DELIVERY), one(event))

    async def close(self) -> None:
        for task in self._consumers:
            task.cancel()
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
            failing = h.last_error > h.last_ok and now - h.last_error < 300
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
