"""The delivery runner: carries out the scheduler's decisions with real I/O.

Why this module is (just) over 600 lines: feeding, ticking, one attempt and carrying out
its transition all work on the runner's tables of units in flight and are read together;
what to do is decided elsewhere (queue/scheduler.py, delivery/transition.py).

Theory of operation
-------------------
The pure :class:`~empath.queue.scheduler.Scheduler` decides *which* unit starts
and when; this module does the rest on the event loop:

* **Feeding.**  At start every non-terminal unit recovered from the spool is
  added with its ``next_attempt_at``; a message accepted over SMTP is added by
  :meth:`DeliveryRunner.submit` due now, and a tick is scheduled with
  ``call_soon`` so its first attempt starts within the same loop iteration.
* **Ticking.**  Ticks are coalesced callbacks (never a polling loop): one runs
  after every submit, finished attempt or ``process_now``, and a timer fires at
  the scheduler's next wake-up, at least once a second for the health check's
  heartbeat.
* **One attempt** (:meth:`_attempt`): route (MX cache / override), hand the
  pending recipients to :func:`~empath.delivery.attempt.attempt_delivery` over
  the connection pool.  What the result means (delivered, retry at T, failed,
  expired; which DSNs; what to log) is decided by the pure
  :mod:`empath.delivery.transition`; :meth:`_carry_out` only does what it says.
* **Current state.**  The units of one message run concurrently.  The decision is
  taken on the unit as the spool holds it when the attempt returns, and the new
  unit replaces only itself in the message's state as it is at write time, so
  one unit's result never overwrites another's.
* **Persist before acting.**  A DSN is committed to the spool before the state
  that caused it, so a crash can duplicate a DSN but never lose one; the new unit
  state is group-committed before the unit is rescheduled or forgotten.  A
  message whose units are all delivered is removed with one tombstone record that
  is not waited for (DESIGN §3: a crash before it is written only repeats the
  delivery).
  ``in_progress`` is not written to disk: recovery treats it as pending anyway,
  so at-least-once delivery holds without a flush per attempt.
* **Shutdown** (:meth:`drain`): stop dispatching, let in-flight attempts finish
  within the grace period, cancel the rest (their last durable state is
  ``pending``/``retry``, so they run again after restart).
* **Operator deletes** (:meth:`delete`): no new attempt starts; one in flight is
  waited for, so what it delivered is on record and never bounced.

Why this module is longer than 600 lines: the operator actions on units (delete,
hold, release) must see and change the same in-flight set and spool state the
attempts do, without an await between reading and writing; they live beside them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

from empath import ids
from empath.clock import Clock, Timer
from empath.delivery import transition
from empath.delivery.attempt import AttemptSettings, attempt_delivery
from empath.delivery.bounce import build_dsn, header_block
from empath.delivery.classify import AttemptResult, OutcomeKind
from empath.dns.mx import MxRouter
from empath.errors import DeliveryError, SpoolError, UnknownMessageError
from empath.logs import get_logger
from empath.policy.retry import RetryPolicy
from empath.queue.actions import OperatorActions
from empath.queue.deferral_log import DeferralLog
from empath.queue.index import UnitKey
from empath.queue.scheduler import (
    DeferBreaker,
    DeferRateLimit,
    Dispatch,
    Scheduler,
    WaitForConnection,
)
from empath.spool.index import MessageView
from empath.spool.journal import MessageJournal
from empath.spool.model import MessageState, RcptStatus, UnitState, UnitStatus, initial_units
from empath.spool.store import Spool
from empath.stats import RecentActivity, RunnerStats
from empath.supervisor import Spawn
from empath.transport.outbound import BodySource
from empath.transport.pool import ConnectionPool

log = get_logger("delivery", __name__)

INLINE_BODY_MAX_BYTES = 1 << 20  # bodies up to this size are read whole for sending
HEARTBEAT_S = 1.0
JANITOR_INTERVAL_S = 60.0  # how often finished messages past retention are removed
DELETE_WAIT_S = 30.0  # `queue delete` waits this long for an attempt in flight, then defers
ATTEMPT_SETTINGS_CACHE = 10_000  # domains whose merged attempt settings are kept


@dataclass(frozen=True, slots=True)
class DeleteOutcome:
    """What `queue delete` did.  ``delivered``: recipients an attempt in flight delivered
    before the delete took effect (never bounced).  ``pending``: the attempt is still
    running after :data:`DELETE_WAIT_S`; the delete (and its bounce) happens when it
    ends, and is logged then."""

    dsn_id: str | None = None
    delivered: tuple[str, ...] = ()
    pending: bool = False
    gone: bool = False  # nothing left to delete: every recipient was delivered


@dataclass(frozen=True, slots=True)
class DomainPolicy:
    """Per-domain delivery settings, merged from the global ones (config/derive.py)."""

    require_tls: bool
    accept_invalid_certs: bool
    max_connections: int


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """What the runner takes from the config (derived in config/derive.py)."""

    hostname: str
    attempt: AttemptSettings
    domain_policy: Callable[[str], DomainPolicy]
    dsn_enabled: bool
    reporting_mta: str | None
    postmaster: str
    delay_warning_s: float
    failed_retention_s: float
    drain_timeout_s: float = 30.0  # not a config key: how long drain() waits


_EMIT: dict[transition.Severity, Callable[..., None]] = {
    transition.Severity.INFO: log.info,
    transition.Severity.WARN: log.warn,
    transition.Severity.ERROR: log.error,
}


def _delivered(msg: MessageState) -> frozenset[str]:
    return frozenset(
        r.address for u in msg.units for r in u.recipients if r.status is RcptStatus.DELIVERED
    )


def _unit_of(msg: MessageState, domain: str) -> UnitState | None:
    return next((u for u in msg.units if u.domain == domain), None)


class DeliveryRunner(OperatorActions):
    """Drives the scheduler; see the module docstring."""

    def __init__(
        self,
        *,
        spool: Spool,
        scheduler: Scheduler,
        router: MxRouter,
        pool: ConnectionPool,
        retry: RetryPolicy,
        settings: RunnerSettings,
        clock: Clock,
        spawn: Spawn,
        stats: RunnerStats,
        journal: MessageJournal | None = None,
    ) -> None:
        self.spool = spool
        self.scheduler = scheduler
        self.router = router
        self.pool = pool
        self.retry = retry
        self.settings = settings
        self.clock = clock
        self._spawn = spawn
        self.stats = stats
        # told of each unit's outcome after it is saved (module delivery events, DESIGN §14);
        # must not block or raise (the modules' host queues the event and returns)
        self.on_outcome: Callable[[MessageState, UnitState], None] | None = None
        self.journal = journal or MessageJournal(None, 0.0, clock)
        self.activity = RecentActivity()  # `queue summary` throughput, `breaker list` errors
        self._tasks: dict[UnitKey, asyncio.Task[None]] = {}
        self._tick_pending = False
        self._timer: Timer | None = None
        self._timer_due = 0.0  # monotonic time the armed timer fires at
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._janitor: asyncio.Task[None] | None = None
        self._rate_log = DeferralLog(clock)
        self._deleting: dict[str, bool] = {}  # message id -> bounce, while a delete runs
        # deletes that outwaited DELETE_WAIT_S: message id -> recipients delivered before
        self._delete_deferred: dict[str, frozenset[str]] = {}
        self._settings_for(settings)

    def _settings_for(self, settings: RunnerSettings) -> None:
        self.settings = settings
        self._decision_settings = transition.TransitionSettings(
            delay_warning_s=settings.delay_warning_s, dsn_enabled=settings.dsn_enabled
        )
        # domain -> its attempt settings (the global ones merged with the domain's
        # policy): built once per domain, not per attempt; emptied by a reload
        self._attempt_settings: dict[str, AttemptSettings] = {}

    @property
    def _decide(self) -> transition.TransitionSettings:
        """The decision settings, from the (reloadable) runner settings."""
        return self._decision_settings

    # -- lifecycle ------------------------------------------------------------

    def reconfigure(self, retry: RetryPolicy, settings: RunnerSettings) -> None:
        """SIGHUP: the retry schedule and delivery settings for attempts from now on."""
        self.retry = retry
        self._settings_for(settings)

    def start(self) -> int:
        """Load every recovered unit and start ticking.  Returns units scheduled."""
        self._loop = asyncio.get_running_loop()
        count = 0
        for msg in self.spool.views():
            count += self._schedule_message(msg)
        self._janitor = self._spawn(self._janitor_loop(), name="empath-janitor", essential=True)
        self._kick()
        log.info("Delivery runner started", units=count)
        return count

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop dispatching; wait for in-flight attempts (then cancel them)."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        tasks = list(self._tasks.values())
        if tasks:
            log.info("Waiting for in-flight deliveries", count=len(tasks))
            _done, pending = await asyncio.wait(
                tasks, timeout=self.settings.drain_timeout_s if timeout_s is None else timeout_s
            )
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
                log.warn("In-flight deliveries cancelled at shutdown", count=len(pending))
        await self.pool.close_all()
        self.journal.close()

    # -- feeding --------------------------------------------------------------

    def submit(self, msg: MessageState) -> None:
        """A message was just committed: its units are due now."""
        if self._schedule_message(msg):
            self._kick()

    def process_now(self) -> int:
        """`empathctl queue process-now`: every waiting unit is due now."""
        moved = self.scheduler.process_now()
        self._kick()
        return moved

    def retry_now(self, msg_id: str, domains: Collection[str] | None = None) -> int:
        """`empathctl queue retry`: this message's waiting units (of ``domains``) are due now."""
        msg = self.spool.get(msg_id)
        now = self.clock.now()
        n = 0
        for unit in msg.units:
            key = UnitKey(msg.id, unit.domain)
            if domains is not None and unit.domain not in domains:
                continue
            if (
                not unit.status.terminal
                and unit.status is not UnitStatus.HELD
                and not self.scheduler.is_in_flight(key)
            ):
                self.scheduler.add(key, now)
                n += 1
        self._kick()
        return n

    def wake(self, domain: str) -> None:
        """The policy state of ``domain`` changed outside the scheduler (cluster mode)."""
        self.scheduler.wake(domain)
        self._kick()

    async def delete(self, msg_id: str, *, bounce: bool) -> DeleteOutcome:
        """`empathctl queue delete <id> [--bounce]`: stop scheduling the message, then
        remove it durably, with a DSN (``bounce``) for every recipient still pending.

        An attempt already in flight is waited for (up to :data:`DELETE_WAIT_S`): what it
        delivered is logged (``Delivered``), counted and never bounced; what it left
        pending is deleted.  If it is still running after the wait, the delete is done
        when it ends.  No new attempt starts meanwhile.  Raises UnknownMessageError."""
        msg = self.spool.get(msg_id)
        if msg_id in self._deleting:
            return DeleteOutcome(pending=True)
        self._deleting[msg_id] = bounce
        self.forget(msg_id, [u.domain for u in msg.units])
        before = _delivered(msg)
        busy = [t for k, t in self._tasks.items() if k.message_id == msg_id]
        if busy:
            _done, running = await asyncio.wait(busy, timeout=DELETE_WAIT_S)
            if running and any(k.message_id == msg_id for k in self._tasks):
                self._delete_deferred[msg_id] = before
                log.warn(
                    "Message delete waits for its delivery attempt",
                    message_id=msg_id,
                    waited_s=DELETE_WAIT_S,
                )
                return DeleteOutcome(pending=True)
        return await self._delete_now(msg_id, before)

    async def _delete_now(self, msg_id: str, before: frozenset[str]) -> DeleteOutcome:
        """The delete proper, once no attempt of the message is in flight."""
        bounce = self._deleting.pop(msg_id, False)
        try:
            msg = self.spool.get(msg_id)
        except UnknownMessageError:
            # The attempt delivered every recipient left: the message is gone already.
            log.audit("Message delivered before the operator's delete", message_id=msg_id)
            return DeleteOutcome(gone=True)
        self.forget(msg_id, [u.domain for u in msg.units])  # a retry may have re-added it
        delivered = tuple(sorted(_delivered(msg) - before))
        dsn_id = None
        if bounce:
            report = transition.deleted(msg.units, envelope=msg.envelope, settings=self._decide)
            if report is not None:
                dsn_id = await self._send_dsn(msg, report, self.clock.now())
        self._left(msg, "deleted by the operator" + (" (bounced)" if bounce else ""))
        await self.spool.remove(msg_id)
        log.audit(
            "Message deleted by the operator",
            message_id=msg_id,
            dsn_id=dsn_id or "",
            delivered_meanwhile=len(delivered),
        )
        return DeleteOutcome(dsn_id=dsn_id, delivered=delivered)

    def forget(self, msg_id: str, domains: list[str]) -> None:
        for domain in domains:
            self.scheduler.remove(UnitKey(msg_id, domain))

    def _schedule_message(self, msg: MessageView) -> int:
        n = 0
        for unit in msg.units:
            if unit.status.terminal or unit.status is UnitStatus.HELD:
                continue
            key = UnitKey(msg.id, unit.domain)
            if self.scheduler.is_in_flight(key):
                continue
            self.scheduler.add(key, unit.next_attempt_at)
            n += 1
        return n

    # -- ticking --------------------------------------------------------------

    def _kick(self) -> None:
        if self._tick_pending or self._stopping or self._loop is None:
            return
        self._tick_pending = True
        self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self._tick_pending = False
        if self._stopping:
            return
        try:
            decisions = self.scheduler.tick()
        except Exception:
            log.exception("Scheduler tick failed")
            decisions = []
        rate_limited: dict[str, tuple[int, str]] = {}  # domain -> (units, first message id)
        for key, decision in decisions:
            if isinstance(decision, Dispatch):
                self._tasks[key] = self._spawn(
                    self._run_unit(key), name=f"empath-delivery-{key.message_id}-{key.domain}"
                )
            elif isinstance(decision, DeferRateLimit):
                n, first_id = rate_limited.get(key.domain, (0, key.message_id))
                rate_limited[key.domain] = (n + 1, first_id)
            elif isinstance(decision, DeferBreaker):
                log.debug(
                    "Circuit breaker open, delivery deferred",
                    domain=key.domain,
                    message_id=key.message_id,
                )
            elif isinstance(decision, WaitForConnection):
                log.debug(
                    "Domain at max_connections, delivery waits",
                    domain=key.domain,
                    message_id=key.message_id,
                )
        for domain, (count, first_id) in rate_limited.items():
            if deferred := self._rate_log.note(domain, count):
                log.info(
                    "Rate limit exceeded, delivery deferred",
                    domain=domain,
                    message_id=first_id,
                    deferred=deferred,
                )
        self._arm_timer()

    def _arm_timer(self) -> None:
        """Have the next tick run when the scheduler next needs one (at the latest after
        HEARTBEAT_S).  An armed timer that fires no later than that is kept: under load
        a tick runs for every message, and moving the timer each time cost a timer and a
        cancellation per message; a timer that fires early finds nothing due and arms
        the next one."""
        assert self._loop is not None
        delay = self.scheduler.wake_delay_s()
        delay = HEARTBEAT_S if delay is None else max(0.0, min(delay, HEARTBEAT_S))
        due = self.clock.monotonic() + delay
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = self.clock.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    async def _run_unit(self, key: UnitKey) -> None:
        """Run one attempt and report it to the scheduler exactly once.

        A retried unit is reported by ``_carry_out`` itself (it must be ``finished``
        before it is re-added), which takes it out of ``_tasks``; everything else is
        reported here.  A crash in the attempt keeps the unit: it is tried again after
        the first retry delay.
        """
        outcome: OutcomeKind | None = None  # cancelled: says nothing
        retry_at: float | None = None
        try:
            if key.message_id not in self._deleting:
                outcome = await self._attempt(key)
        except asyncio.CancelledError:
            raise
        except SpoolError as exc:
            # The outcome (or its DSN) could not be made durable - a full or failing spool,
            # already logged by the spool.  Nothing was acted on; the unit runs again.
            retry_at = self.clock.now() + self.retry.delay_for(1)
            log.warn(
                "Delivery outcome not saved, the unit will be retried",
                message_id=key.message_id,
                domain=key.domain,
                error=str(exc),
            )
        except Exception:
            log.exception("Delivery attempt crashed", message_id=key.message_id, domain=key.domain)
            retry_at = self.clock.now() + self.retry.delay_for(1)
        finally:
            if self._tasks.pop(key, None) is not None:
                self.scheduler.finished(key, outcome)
                if retry_at is not None:
                    self.scheduler.add(key, retry_at)
            self._finish_deferred_delete(key.message_id)
            self._kick()

    def _finish_deferred_delete(self, msg_id: str) -> None:
        """A delete that outwaited DELETE_WAIT_S is done when the last attempt ends."""
        if msg_id not in self._delete_deferred or any(k.message_id == msg_id for k in self._tasks):
            return
        before = self._delete_deferred.pop(msg_id)
        self._spawn(self._delete_later(msg_id, before), name=f"empath-delete-{msg_id}")

    async def _delete_later(self, msg_id: str, before: frozenset[str]) -> None:
        try:
            await self._delete_now(msg_id, before)
        except SpoolError as exc:
            log.error("Deferred message delete failed", message_id=msg_id, error=str(exc))

    # -- one attempt ----------------------------------------------------------

    async def _attempt(self, key: UnitKey) -> OutcomeKind | None:
        try:
            msg = self.spool.get(key.message_id)
        except UnknownMessageError:
            return None  # deleted while waiting: says nothing
        unit = _unit_of(msg, key.domain)
        if unit is None or unit.status.terminal:
            return None
        now = self.clock.now()
        env = msg.envelope
        self.stats.queue_age.observe(max(0.0, now - env.received_at))
        if transition.expired_while_waiting(unit, env, self.retry, now):
            expired = transition.expire(unit, envelope=env, now=now, settings=self._decide)
            self.journal.record(msg.id, "expired", domain=unit.domain)
            return await self._carry_out(msg, expired, now)
        result = await self._deliver(msg, unit)
        self._record_attempt(msg.id, unit.domain, result)
        # Decide on the unit as it is now (the message may have changed meanwhile).
        try:
            current = _unit_of(self.spool.get(msg.id), key.domain)
        except UnknownMessageError:
            current = None
        if current is None:
            log.info("Message deleted during delivery", message_id=msg.id, domain=key.domain)
            return None
        decided = transition.after_attempt(
            current, result, envelope=env, retry=self.retry, now=now, settings=self._decide
        )
        return await self._carry_out(msg, decided, now)

    async def _deliver(self, msg: MessageState, unit: UnitState) -> AttemptResult:
        """Route and try once; every failure is in the result."""
        rcpts = unit.pending_recipients()
        try:
            route = await self.router.route(unit.domain)
        except DeliveryError as exc:
            return AttemptResult.failed(rcpts, exc)
        attempt_settings = self._attempt_settings.get(unit.domain)
        if attempt_settings is None:
            domain_policy = self.settings.domain_policy(unit.domain)
            attempt_settings = replace(
                self.settings.attempt,
                require_tls=domain_policy.require_tls,
                accept_invalid_certs=domain_policy.accept_invalid_certs,
            )
            if len(self._attempt_settings) >= ATTEMPT_SETTINGS_CACHE:
                self._attempt_settings.clear()
            self._attempt_settings[unit.domain] = attempt_settings
        body: BodySource
        if msg.envelope.size <= INLINE_BODY_MAX_BYTES:
            body = await self.spool.read_body(msg.id)
        else:
            mid = msg.id
            body = lambda: self.spool.iter_body(mid)  # noqa: E731
        return await attempt_delivery(
            route, msg.envelope, rcpts, body, settings=attempt_settings, pool=self.pool
        )

    async def _carry_out(
        self, msg: MessageState, t: transition.Transition, now: float
    ) -> OutcomeKind | None:
        """Do what the transition says: count, log, spool its DSNs, then the unit's state,
        then tell the scheduler (a retried unit is re-added here)."""
        domain = t.unit.domain
        if t.attempted:
            self.stats.count_attempt(t.ok, domain, t.smtp_code)
            if t.ok:
                self.activity.delivered(self.clock.monotonic(), domain)
            elif t.destination is OutcomeKind.TEMPORARY:
                self.activity.failed(domain, t.unit.last_error)
        if t.permanent_failure:
            self.stats.count_permanent_failure()
        for event in t.events:
            _EMIT[event.severity](event.message, message_id=msg.id, **event.fields)
        for dsn in t.dsns:
            await self._send_dsn(msg, dsn, now)
        held = await self._persist(msg.id, t.unit)
        if self.on_outcome is not None and (t.attempted or t.unit.status.terminal):
            self.on_outcome(msg, t.unit)
        outcome = t.destination
        if t.retry_at is not None:
            key = UnitKey(msg.id, domain)
            self._tasks.pop(key, None)
            self.scheduler.finished(key, outcome)
            if not held:  # held while in flight: it waits for `queue release`
                self.scheduler.add(key, t.retry_at)
        return outcome

    async def _persist(self, msg_id: str, new: UnitState) -> bool:
        """Write ``new`` into the message's *current* state, durably; forget the message
        when nothing is left to keep.

        The message is read again here, after the attempt's network round trip and DSN
        commit: the other units of the same message run concurrently and may have
        finished meanwhile, so only this unit is replaced.  Reading and writing the index
        happen without an await in between, so no other unit's result can slip between.
        A unit the operator held during its attempt stays held unless it finished.
        Whether the unit is now held.
        """
        try:
            current = self.spool.get(msg_id)
        except UnknownMessageError:
            log.info("Message deleted during delivery", message_id=msg_id, domain=new.domain)
            return False
        old = _unit_of(current, new.domain)
        held = old is not None and old.status is UnitStatus.HELD and not new.status.terminal
        if held:
            new = replace(new, status=UnitStatus.HELD)
        units = tuple(new if u.domain == new.domain else u for u in current.units)
        if all(u.status is UnitStatus.DELIVERED for u in units):
            # History first (durable in the same batch, journal.py).  The tombstone is not
            # waited for (DESIGN §3, what a relayed message writes): a crash before it is
            # on disk delivers the message again; nothing is lost.
            self._left(MessageState(current.id, current.envelope, units), "delivered")
            await self.spool.remove(msg_id, durable=False)
        else:
            await self.spool.update(msg_id, units)
        return held

    async def _send_dsn(self, msg: MessageState, report: transition.DsnReport, now: float) -> str:
        """Compose the DSN, commit it to the spool and schedule it; its id."""
        kind = report.kind
        try:
            headers = header_block(await self.spool.read_body(msg.id))
        except (SpoolError, OSError):
            headers = b""
        dsn = build_dsn(
            kind=kind,
            original_id=msg.id,
            envelope=msg.envelope,
            recipients=report.recipients,
            original_headers=headers,
            hostname=self.settings.hostname,
            reporting_mta=self.settings.reporting_mta,
            postmaster=self.settings.postmaster,
            now=now,
            message_id_factory=ids.new_ulid,
        )
        writer = self.spool.begin()
        writer.write(dsn.body)
        env = dsn.envelope(now)
        env = replace(env, size=writer.size)
        stored = await self.spool.commit(writer, env, initial_units(env.recipients, now))
        self.stats.dsns += 1
        self.journal.record(
            msg.id, "dsn", kind=kind.value, dsn_id=stored.id, recipients=len(report.recipients)
        )
        log.audit(
            "DSN queued",
            message_id=stored.id,
            original_message_id=msg.id,
            kind=kind.value,
            recipients=len(report.recipients),
        )
        self.submit(stored)
        return stored.id

    # -- retention ------------------------------------------------------------

    async def _janitor_loop(self) -> None:
        while True:
            await self.clock.sleep(JANITOR_INTERVAL_S)
            try:
                await self.purge_expired_failures()
            except Exception:
                log.exception("Retention sweep failed")

    async def purge_expired_failures(self) -> int:
        """Drop messages whose units are all terminal and older than the retention."""
        cutoff = self.clock.now() - self.settings.failed_retention_s
        victims = [
            m.id
            for m in self.spool.views()
            if m.finished and max((u.finished_at for u in m.units), default=0.0) <= cutoff
        ]
        for msg_id in victims:
            with contextlib.suppress(UnknownMessageError):
                m = self.spool.get(msg_id)
                self._left(m, "failed, removed after failed_retention_secs")
                await self.spool.remove(m.id)
        self.journal.purge()
        if victims:
            log.info("Removed finished messages past retention", count=len(victims))
        return len(victims)

    def in_flight_keys(self) -> set[UnitKey]:
        return set(self._tasks)

    def snapshot(self) -> dict[str, Any]:
        return {"in_flight": len(self._tasks), "heartbeat_age_s": self.heartbeat_age_s()}

    def heartbeat_age_s(self) -> float:
        return self.scheduler.heartbeat().age_s(self.clock.monotonic())
