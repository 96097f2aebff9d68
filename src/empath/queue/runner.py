"""The delivery runner: carries out the scheduler's decisions with real I/O.

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
  the connection pool, then apply per-recipient outcomes: 2xx delivered,
  5xx failed, 4xx left pending for a retry at ``RetryPolicy.decide`` (or failed
  or expired when it gives up).
* **Persist before acting.**  A DSN is committed to the spool before the state
  that caused it, so a crash can duplicate a DSN but never lose one; the new unit
  state is group-committed before the unit is rescheduled or forgotten.  A
  message whose units are all delivered is removed with one tombstone record.
  ``in_progress`` is not written to disk: recovery treats it as pending anyway,
  so at-least-once delivery holds without a flush per attempt.
* **Shutdown** (:meth:`drain`): stop dispatching, let in-flight attempts finish
  within the grace period, cancel the rest (their last durable state is
  ``pending``/``retry``, so they run again after restart).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

from empath import ids
from empath.clock import Clock, Timer
from empath.delivery.attempt import AttemptResult, AttemptSettings, attempt_delivery
from empath.delivery.bounce import (
    DsnAction,
    DsnKind,
    RecipientReport,
    build_dsn,
    diagnostic_code,
    header_block,
    should_send_dsn,
)
from empath.delivery.classify import OutcomeKind, RecipientOutcome, is_breaker_failure
from empath.dns.mx import MxRouter
from empath.errors import DeliveryError, SpoolError, UnknownMessageError
from empath.observability.logs import get_logger
from empath.observability.stats import RunnerStats
from empath.policy.retry import GiveUp, RetryPolicy
from empath.queue.index import UnitKey
from empath.queue.scheduler import (
    DeferBreaker,
    DeferRateLimit,
    Dispatch,
    Outcome,
    Scheduler,
    WaitForConnection,
)
from empath.spool.model import (
    Attempt,
    MessageState,
    RcptStatus,
    RecipientState,
    UnitState,
    UnitStatus,
    initial_units,
)
from empath.spool.store import Spool
from empath.supervisor import Spawn
from empath.transport.outbound import BodySource, ConnectionPool

log = get_logger("delivery", __name__)

INLINE_BODY_MAX_BYTES = 1 << 20  # bodies up to this size are read whole for sending
HEARTBEAT_S = 1.0
JANITOR_INTERVAL_S = 60.0  # how often finished messages past retention are removed


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


def _summary(
    result: AttemptResult | None, error: DeliveryError | None
) -> tuple[str, int | None, str]:
    """(mx, code, text) describing an attempt for history and logs."""
    if error is not None:
        return error.mx, error.code, error.text
    assert result is not None
    if result.error is not None:
        return result.mx or result.error.mx, result.error.code, result.error.text
    worst: RecipientOutcome | None = None
    for o in result.outcomes:
        if worst is None or (not o.delivered and worst.delivered):
            worst = o
    if worst is None:
        return result.mx, None, "no recipients"
    return result.mx, worst.code, worst.diagnostic


def _connection_fields(result: AttemptResult | None) -> dict[str, str]:
    """Which MX address took the attempt and whether TLS was used (log fields)."""
    if result is None:
        return {"mx_address": "", "tls": "none", "tls_cipher": ""}
    return {
        "mx_address": result.address,
        "tls": result.tls_version or "none",
        "tls_cipher": result.tls_cipher,
    }


class DeliveryRunner:
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
        stats: RunnerStats | None = None,
    ) -> None:
        self.spool = spool
        self.scheduler = scheduler
        self.router = router
        self.pool = pool
        self.retry = retry
        self.settings = settings
        self.clock = clock
        self._spawn = spawn
        self.stats = stats if stats is not None else RunnerStats()
        self._tasks: dict[UnitKey, asyncio.Task[None]] = {}
        self._tick_pending = False
        self._timer: Timer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._janitor: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------

    def reconfigure(self, retry: RetryPolicy, settings: RunnerSettings) -> None:
        """SIGHUP: the retry schedule and delivery settings for attempts from now on."""
        self.retry = retry
        self.settings = settings

    def start(self) -> int:
        """Load every recovered unit and start ticking.  Returns units scheduled."""
        self._loop = asyncio.get_running_loop()
        count = 0
        for msg in list(self.spool.messages()):
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
            if not unit.status.terminal and not self.scheduler.is_in_flight(key):
                self.scheduler.add(key, now)
                n += 1
        self._kick()
        return n

    def wake(self, domain: str) -> None:
        """The policy state of ``domain`` changed outside the scheduler (cluster mode)."""
        self.scheduler.wake(domain)
        self._kick()

    async def delete(self, msg_id: str, *, bounce: bool) -> str | None:
        """`empathctl queue delete <id> [--bounce]`: stop scheduling the message, send its
        sender a DSN for every recipient still pending (``bounce``), then remove it durably.
        An attempt already in flight ends on its own ("Message deleted during delivery").
        Returns the DSN's id, if one was queued.  Raises UnknownMessageError."""
        msg = self.spool.get(msg_id)
        self.forget(msg_id, [u.domain for u in msg.units])
        dsn_id = None
        if bounce:
            now = self.clock.now()
            reports = []
            for unit in msg.units:
                last = unit.history[-1] if unit.history else None
                reports += [
                    RecipientReport(
                        address,
                        DsnAction.FAILED,
                        "5.0.0",
                        last.mx if last else "",
                        diagnostic_code(None, "deleted from the queue by the administrator"),
                        last.at if last else None,
                    )
                    for address in unit.pending_recipients()
                ]
            dsn_id = await self._send_dsn(msg, DsnKind.DELETED, reports, now)
        await self.spool.remove(msg_id)
        log.audit("Message deleted by the operator", message_id=msg_id, dsn_id=dsn_id or "")
        return dsn_id

    def forget(self, msg_id: str, domains: list[str]) -> None:
        for domain in domains:
            self.scheduler.remove(UnitKey(msg_id, domain))

    def _schedule_message(self, msg: MessageState) -> int:
        n = 0
        for unit in msg.units:
            if unit.status.terminal:
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
        for key, decision in decisions:
            if isinstance(decision, Dispatch):
                self._tasks[key] = self._spawn(
                    self._run_unit(key), name=f"empath-delivery-{key.message_id}-{key.domain}"
                )
            elif isinstance(decision, DeferRateLimit):
                log.info(
                    "Rate limit exceeded, delivery deferred",
                    domain=key.domain,
                    message_id=key.message_id,
                )
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
        self._arm_timer()

    def _arm_timer(self) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        delay = self.scheduler.wake_delay_s()
        delay = HEARTBEAT_S if delay is None else max(0.0, min(delay, HEARTBEAT_S))
        self._timer = self.clock.call_later(delay, self._kick)

    async def _run_unit(self, key: UnitKey) -> None:
        """Run one attempt and report it to the scheduler exactly once.

        A retried unit is reported by ``_apply`` itself (it must be ``finished``
        before it is re-added), which takes it out of ``_tasks``; everything else is
        reported here.  A crash in the attempt keeps the unit: it is tried again after
        the first retry delay.
        """
        outcome = Outcome.CANCELLED
        retry_at: float | None = None
        try:
            outcome = await self._attempt(key)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Delivery attempt crashed", message_id=key.message_id, domain=key.domain)
            retry_at = self.clock.now() + self.retry.delay_for(1)
        finally:
            if self._tasks.pop(key, None) is not None:
                self.scheduler.finished(key, outcome)
                if retry_at is not None:
                    self.scheduler.add(key, retry_at)
            self._kick()

    # -- one attempt ----------------------------------------------------------

    async def _attempt(self, key: UnitKey) -> Outcome:
        try:
            msg = self.spool.get(key.message_id)
        except UnknownMessageError:
            return Outcome.CANCELLED  # deleted while waiting
        unit = next((u for u in msg.units if u.domain == key.domain), None)
        if unit is None or unit.status.terminal:
            return Outcome.CANCELLED
        now = self.clock.now()
        env = msg.envelope
        self.stats.queue_age.observe(max(0.0, now - env.received_at))
        if self.retry.is_expired(unit.expiry_base(env.received_at), now) and unit.attempts > 0:
            await self._give_up(msg, unit, "expired", now)
            return Outcome.CANCELLED

        rcpts = unit.pending_recipients()
        domain_policy = self.settings.domain_policy(key.domain)
        attempt_settings = replace(
            self.settings.attempt,
            require_tls=domain_policy.require_tls,
            accept_invalid_certs=domain_policy.accept_invalid_certs,
        )
        result: AttemptResult | None = None
        error: DeliveryError | None = None
        try:
            route = await self.router.route(key.domain)
        except DeliveryError as exc:
            error = exc
        else:
            body: BodySource
            if env.size <= INLINE_BODY_MAX_BYTES:
                body = await self.spool.read_body(msg.id)
            else:
                mid = msg.id
                body = lambda: self.spool.iter_body(mid)  # noqa: E731
            result = await attempt_delivery(
                route, env, rcpts, body, settings=attempt_settings, pool=self.pool
            )

        outcomes = (
            result.outcomes
            if result is not None
            else tuple(
                RecipientOutcome(
                    address=r,
                    kind=OutcomeKind.PERMANENT
                    if error and error.permanent
                    else OutcomeKind.TEMPORARY,
                    code=error.code if error else None,
                    enhanced=error.enhanced if error else "",
                    text=error.text if error else "",
                    mx=error.mx if error else "",
                )
                for r in rcpts
            )
        )
        return await self._apply(msg, unit, outcomes, result, error, now)

    async def _apply(
        self,
        msg: MessageState,
        unit: UnitState,
        outcomes: tuple[RecipientOutcome, ...],
        result: AttemptResult | None,
        error: DeliveryError | None,
        now: float,
    ) -> Outcome:
        by_addr = {o.address: o for o in outcomes}
        mx, code, text = _summary(result, error)
        recipients: list[RecipientState] = []
        newly_failed: list[RecipientOutcome] = []
        for r in unit.recipients:
            o = by_addr.get(r.address)
            if o is None or r.status is not RcptStatus.PENDING:
                recipients.append(r)
                continue
            if o.delivered:
                recipients.append(RecipientState(r.address, RcptStatus.DELIVERED, o.code, o.text))
            elif o.permanent:
                recipients.append(
                    RecipientState(r.address, RcptStatus.FAILED, o.code, o.diagnostic)
                )
                newly_failed.append(o)
            else:
                recipients.append(
                    RecipientState(r.address, RcptStatus.PENDING, o.code, o.diagnostic)
                )
        attempts = unit.attempts + 1
        new = replace(
            unit,
            recipients=tuple(recipients),
            attempts=attempts,
            last_error="" if all(o.delivered for o in outcomes) else text,
        )
        new = new.with_attempt(Attempt(now, mx, code, text))
        domain = unit.domain
        delivered = [o for o in outcomes if o.delivered]
        smtp_code = "" if code is None else str(code)

        # metrics + logs, one per unit attempt
        ok = bool(delivered) and not newly_failed and all(o.delivered for o in outcomes)
        self.stats.count_attempt(ok, domain, smtp_code)
        if newly_failed:
            self.stats.count_permanent_failure()
        if delivered:
            log.audit(
                "Delivered",
                message_id=msg.id,
                domain=domain,
                mx=mx,
                smtp_code=str(delivered[0].code or ""),
                attempt=attempts,
                recipients=len(delivered),
                **_connection_fields(result),
            )
        for o in newly_failed:
            log.error(
                "Delivery failed permanently",
                message_id=msg.id,
                domain=domain,
                recipient=o.address,
                mx=o.mx,
                smtp_code="" if o.code is None else str(o.code),
                dsn=o.enhanced,
                attempt=attempts,
                error=o.diagnostic,
                audit=True,
            )

        dsn_reports: list[tuple[DsnKind, list[RecipientReport]]] = []
        if newly_failed:
            dsn_reports.append(
                (
                    DsnKind.FAILED,
                    [
                        RecipientReport(
                            o.address,
                            DsnAction.FAILED,
                            o.enhanced or "5.0.0",
                            o.mx,
                            diagnostic_code(o.code, o.text),
                            now,
                        )
                        for o in newly_failed
                    ],
                )
            )

        pending = new.pending_recipients()
        if pending:
            decision = self.retry.decide(attempts, unit.expiry_base(msg.envelope.received_at), now)
            if isinstance(decision, GiveUp):
                status = UnitStatus.EXPIRED if decision.reason == "expired" else UnitStatus.FAILED
                kind = DsnKind.EXPIRED if decision.reason == "expired" else DsnKind.EXHAUSTED
                reason = (
                    "message expired"
                    if decision.reason == "expired"
                    else f"gave up after {attempts} attempts"
                )
                new = self._fail_pending(new, status, f"{reason}: {text}", now)
                if not newly_failed:
                    self.stats.count_permanent_failure()
                dsn_reports.append(
                    (
                        kind,
                        [
                            RecipientReport(
                                a,
                                DsnAction.FAILED,
                                self._enhanced(by_addr.get(a), "4.4.7"),
                                mx,
                                diagnostic_code(code, text),
                                now,
                            )
                            for a in pending
                        ],
                    )
                )
                log.error(
                    "Delivery gave up",
                    message_id=msg.id,
                    domain=domain,
                    mx=mx,
                    smtp_code=smtp_code,
                    attempt=attempts,
                    error=f"{reason}: {text}",
                    audit=True,
                )
            else:
                new = replace(new, status=UnitStatus.RETRY, next_attempt_at=decision.at)
                log.warn(
                    "Delivery deferred",
                    message_id=msg.id,
                    domain=domain,
                    mx=mx,
                    smtp_code=smtp_code,
                    attempt=attempts,
                    error=text,
                    retry_in_s=round(decision.at - now, 1),
                    **_connection_fields(result),
                )
                if (
                    not new.delay_warned
                    and now - msg.envelope.received_at >= self.settings.delay_warning_s
                ):
                    new = replace(new, delay_warned=True)
                    dsn_reports.append(
                        (
                            DsnKind.DELAYED,
                            [
                                RecipientReport(
                                    a,
                                    DsnAction.DELAYED,
                                    self._delayed_status(by_addr.get(a)),
                                    mx,
                                    diagnostic_code(code, text),
                                    now,
                                    will_retry_until=self.retry.deadline(
                                        unit.expiry_base(msg.envelope.received_at)
                                    ),
                                )
                                for a in pending
                            ],
                        )
                    )
        else:
            any_failed = any(r.status is RcptStatus.FAILED for r in new.recipients)
            new = replace(
                new,
                status=UnitStatus.FAILED if any_failed else UnitStatus.DELIVERED,
                finished_at=now,
            )

        for kind, reports in dsn_reports:
            await self._send_dsn(msg, kind, reports, now)

        await self._persist(msg.id, new)

        if new.status is UnitStatus.RETRY:
            self._tasks.pop(UnitKey(msg.id, domain), None)
            outcome = (
                Outcome.TEMPORARY_FAILURE
                if (error is not None and not error.permanent) or is_breaker_failure(outcomes)
                else (Outcome.SUCCESS if delivered else Outcome.PERMANENT_FAILURE)
            )
            self.scheduler.finished(UnitKey(msg.id, domain), outcome)
            self.scheduler.add(UnitKey(msg.id, domain), new.next_attempt_at)
            return outcome
        if delivered:
            return Outcome.SUCCESS
        if (error is not None and not error.permanent) or is_breaker_failure(outcomes):
            return Outcome.TEMPORARY_FAILURE
        return Outcome.PERMANENT_FAILURE

    @staticmethod
    def _delayed_status(o: RecipientOutcome | None) -> str:
        """A delayed report keeps the transient 4.x.x class of the reply (RFC 3463 §3.1)."""
        if o is None or not o.enhanced.startswith("4."):
            return "4.0.0"
        return o.enhanced

    @staticmethod
    def _enhanced(o: RecipientOutcome | None, default: str) -> str:
        """The status of a give-up report: the last reply's detail, made permanent."""
        if o is None or not o.enhanced:
            return default
        return "5" + o.enhanced[1:] if o.enhanced[0] == "4" else o.enhanced

    @staticmethod
    def _fail_pending(unit: UnitState, status: UnitStatus, text: str, now: float) -> UnitState:
        recipients = tuple(
            RecipientState(r.address, RcptStatus.FAILED, r.code, text)
            if r.status is RcptStatus.PENDING
            else r
            for r in unit.recipients
        )
        return replace(unit, recipients=recipients, status=status, finished_at=now, last_error=text)

    async def _give_up(self, msg: MessageState, unit: UnitState, reason: str, now: float) -> None:
        """Expire a unit without an attempt (its deadline passed while it waited)."""
        pending = unit.pending_recipients()
        text = unit.last_error or "message expired"
        new = self._fail_pending(unit, UnitStatus.EXPIRED, f"message expired: {text}", now)
        self.stats.count_permanent_failure()
        last = unit.history[-1] if unit.history else None
        await self._send_dsn(
            msg,
            DsnKind.EXPIRED,
            [
                RecipientReport(
                    a,
                    DsnAction.FAILED,
                    "4.4.7",
                    last.mx if last else "",
                    diagnostic_code(last.code if last else None, text),
                    last.at if last else None,
                )
                for a in pending
            ],
            now,
        )
        log.error(
            "Delivery gave up",
            message_id=msg.id,
            domain=unit.domain,
            attempt=unit.attempts,
            error=f"message expired: {text}",
            smtp_code="",
            audit=True,
        )
        await self._persist(msg.id, new)

    async def _persist(self, msg_id: str, new: UnitState) -> None:
        """Write ``new`` into the message's *current* state, durably; forget the message
        when nothing is left to keep.

        The message is read again here, after the attempt's network round trip and DSN
        commit: the other units of the same message run concurrently and may have
        finished meanwhile, so only this unit is replaced.  Reading and writing the index
        happen without an await in between, so no other unit's result can slip between.
        """
        try:
            current = self.spool.get(msg_id)
        except UnknownMessageError:
            log.info("Message deleted during delivery", message_id=msg_id, domain=new.domain)
            return
        units = tuple(new if u.domain == new.domain else u for u in current.units)
        if all(u.status is UnitStatus.DELIVERED for u in units):
            await self.spool.remove(msg_id)
        else:
            await self.spool.update(msg_id, units)

    async def _send_dsn(
        self, msg: MessageState, kind: DsnKind, reports: list[RecipientReport], now: float
    ) -> str | None:
        """Commit a DSN about ``msg`` and schedule it; its id (None when none is due)."""
        if not self.settings.dsn_enabled or not reports or not should_send_dsn(msg.envelope):
            return None
        try:
            headers = header_block(await self.spool.read_body(msg.id))
        except (SpoolError, OSError):
            headers = b""
        dsn = build_dsn(
            kind=kind,
            original_id=msg.id,
            envelope=msg.envelope,
            recipients=reports,
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
        log.audit(
            "DSN queued",
            message_id=stored.id,
            original_message_id=msg.id,
            kind=kind.value,
            recipients=len(reports),
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
            for m in self.spool.messages()
            if m.finished and max((u.finished_at for u in m.units), default=0.0) <= cutoff
        ]
        for mid in victims:
            with contextlib.suppress(UnknownMessageError):
                await self.spool.remove(mid)
        if victims:
            log.info("Removed finished messages past retention", count=len(victims))
        return len(victims)

    def in_flight_keys(self) -> set[UnitKey]:
        return set(self._tasks)

    def snapshot(self) -> dict[str, Any]:
        return {"in_flight": len(self._tasks), "heartbeat_age_s": self.heartbeat_age_s()}

    def heartbeat_age_s(self) -> float:
        return self.scheduler.heartbeat().age_s(self.clock.monotonic())
