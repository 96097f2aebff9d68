"""Delivery decisions: what one attempt, or an expiry, means for a unit.  Pure.

Theory of operation
-------------------
The runner does the I/O (route, connect, send, spool, schedule); this module
decides.  :func:`after_attempt` takes the unit's state as it is now, the
:class:`~empath.delivery.attempt.AttemptResult` (one
:class:`~empath.delivery.classify.RecipientOutcome` per recipient tried), the
retry policy, ``now`` and the settings, and returns a :class:`Transition`: the
unit's new state, the DSNs to send, the log events and what the attempt says
about the destination (for the circuit breaker).  :func:`expire` does the same
for a unit whose deadline passed while it waited, :func:`deleted` says which DSN
an operator's ``queue delete --bounce`` sends, :func:`released` what `queue release`
makes of a held unit (held mail does not expire; the first attempt after its
release is always made, as Postfix does).  No clock, no spool, no
network: the same inputs give the same transition (the retry policy's jitter
comes from its own seeded ``random.Random``).

Per recipient (DESIGN §4): 2xx delivered, 5xx failed (a DSN now), 4xx pending.
Then, with recipients still pending, :meth:`RetryPolicy.decide
<empath.policy.retry.RetryPolicy.decide>` says retry at T (with the one-time
delay warning once ``delay_warning_s`` has passed) or give up: ``max_attempts``
→ failed, deadline → expired, every pending recipient failed with one DSN.
Without pending recipients the unit is final: delivered when nobody failed,
else failed.

Invariants (tested with hypothesis in ``tests/unit/test_delivery_transition.py``):
a final unit never changes again; ``attempts`` only grows, by one per attempt;
every recipient that fails is reported in exactly one failure DSN (none when the
sender is null, the message is a DSN or DSNs are off); a 4xx never fails a
recipient before ``max_attempts`` or the deadline.  A failure report's status is
always 5.x.x and a delay report's 4.x.x (RFC 3464 §2.3.3 Action values with the
RFC 3463 §3.1 classes): only giving up turns a transient 4.x.x into 5.x.x.

Not frozen, against the house style: ``LogEvent``, ``Transition`` and ``_Attempt`` (one
of each per delivery attempt). Why, and what stands in for frozen: DESIGN §15.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

from empath.delivery.bounce import (
    DsnAction,
    DsnKind,
    RecipientReport,
    diagnostic_code,
    should_send_dsn,
)
from empath.delivery.classify import AttemptResult, OutcomeKind, RecipientOutcome
from empath.policy.retry import GiveUp, RetryPolicy
from empath.spool.model import (
    MAX_HISTORY,
    Attempt,
    Envelope,
    RcptStatus,
    RecipientState,
    UnitState,
    UnitStatus,
)


class Severity(enum.Enum):
    """How loud a :class:`LogEvent` is."""

    INFO = "info"
    WARN = "warn"
    ERROR = "error"


@dataclass(slots=True, init=False, unsafe_hash=True)  # not frozen: see the module doc
class LogEvent:
    """One log line the runner writes (it adds ``message_id``)."""

    severity: Severity
    message: str
    fields: dict[str, Any]

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(self, severity: Severity, message: str, fields: dict[str, Any]) -> None:
        self.severity = severity
        self.message = message
        self.fields = fields


@dataclass(frozen=True, slots=True)
class DsnReport:
    """One DSN to compose and spool: its kind and the affected recipients."""

    kind: DsnKind
    recipients: tuple[RecipientReport, ...]


@dataclass(frozen=True, slots=True)
class TransitionSettings:
    """The settings a decision needs."""

    delay_warning_s: float
    dsn_enabled: bool


@dataclass(slots=True, init=False, unsafe_hash=True)  # not frozen: see the module doc
class Transition:
    """What the runner carries out, in this order: DSNs, then the unit state, then the
    scheduler (``destination`` for the breaker, a retry at ``unit.next_attempt_at``)."""

    unit: UnitState
    dsns: tuple[DsnReport, ...] = ()
    events: tuple[LogEvent, ...] = ()
    # What the attempt says about the destination (see destination_of): DELIVERED (it
    # works), TEMPORARY (counts for the breaker), PERMANENT (5xx only); None: no attempt.
    destination: OutcomeKind | None = None
    attempted: bool = False  # an attempt was made (the attempts counter)
    ok: bool = False  # every recipient tried was delivered
    smtp_code: str = ""  # the attempt's summary reply code ("" for none)
    permanent_failure: bool = False  # a recipient failed or the unit gave up

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(
        self,
        unit: UnitState,
        dsns: tuple[DsnReport, ...] = (),
        events: tuple[LogEvent, ...] = (),
        destination: OutcomeKind | None = None,
        attempted: bool = False,
        ok: bool = False,
        smtp_code: str = "",
        permanent_failure: bool = False,
    ) -> None:
        self.unit = unit
        self.dsns = dsns
        self.events = events
        self.destination = destination
        self.attempted = attempted
        self.ok = ok
        self.smtp_code = smtp_code
        self.permanent_failure = permanent_failure

    @property
    def retry_at(self) -> float | None:
        return self.unit.next_attempt_at if self.unit.status is UnitStatus.RETRY else None


def destination_of(result: AttemptResult) -> OutcomeKind:
    """DESIGN §4 breaker input: what the attempt says about the destination as a whole.

    * DELIVERED: it works -- it took a recipient, or it answered each recipient's RCPT
      itself (a 4xx there is that mailbox's trouble: full, greylisted, moved);
    * TEMPORARY: a failure of the destination (connect, TLS, timeout, 421, a 4xx to the
      greeting, EHLO, MAIL, DATA or end of data, DNS temporary): counts for the breaker;
    * PERMANENT: only 5xx -- "5xx never counts".
    """
    outcomes = result.outcomes
    if any(o.delivered for o in outcomes):
        return OutcomeKind.DELIVERED
    if any(o.temporary and not o.at_rcpt for o in outcomes) or (
        not outcomes and result.error is not None and not result.error.permanent
    ):
        return OutcomeKind.TEMPORARY
    if any(o.temporary for o in outcomes):
        return OutcomeKind.DELIVERED
    return OutcomeKind.PERMANENT


def expired_while_waiting(
    unit: UnitState, envelope: Envelope, retry: RetryPolicy, now: float
) -> bool:
    """The deadline passed before this (not first) attempt: give up without one.  Not
    for the first attempt after a release from hold, which is always made (see
    :func:`released`)."""
    if unit.attempts == 0 or _owed_after_release(unit):
        return False
    return retry.is_expired(unit.expiry_base(envelope.received_at), now)


def _owed_after_release(unit: UnitState) -> bool:
    last = unit.history[-1].at if unit.history else 0.0
    return unit.released_at > last


def released(unit: UnitState, now: float, *, restart_expiry: bool = False) -> UnitState:
    """A held unit released by the operator (`queue release`), as Postfix treats mail
    released from its hold queue (postsuper(1) -H): held mail never expires, and once
    released it is due at once and subject to expiry again, counted from acceptance as
    before.  Like Postfix's queue manager, which bounces mail past
    ``maximal_queue_lifetime`` only when a delivery attempt fails temporarily, the
    first attempt after the release is always made: it delivers, or a temporary
    failure past the deadline expires the unit with its DSN.  ``restart_expiry``
    (postsuper -r, which Postfix advises for mail held a good part of its lifetime)
    starts a new ``message_expiration_secs`` window at the release instead."""
    if unit.status is not UnitStatus.HELD:
        return unit
    return replace(
        unit,
        status=UnitStatus.RETRY if unit.attempts else UnitStatus.PENDING,
        next_attempt_at=now,
        released_at=now,
        reopened_at=now if restart_expiry else unit.reopened_at,
    )


def after_attempt(
    unit: UnitState,
    result: AttemptResult,
    *,
    envelope: Envelope,
    retry: RetryPolicy,
    now: float,
    settings: TransitionSettings,
) -> Transition:
    """The unit after ``result``; see the module docstring."""
    if unit.status.terminal:
        return Transition(unit)
    mx, code, text = result.summary
    this = _Attempt(
        domain=unit.domain,
        result=result,
        by_addr={o.address: o for o in result.outcomes},
        number=unit.attempts + 1,
        mx=mx,
        code=code,
        text=text,
        now=now,
        wants_dsn=settings.dsn_enabled and should_send_dsn(envelope),
    )
    recipients, newly_failed = _recipients_after(unit, this)
    events = [*_delivered(this), *(_failed(this, o) for o in newly_failed)]
    dsns: list[DsnReport] = []
    if newly_failed and this.wants_dsn:
        reports = tuple(
            RecipientReport(
                o.address,
                DsnAction.FAILED,
                _permanent(o.enhanced or "5.0.0"),
                o.mx,
                diagnostic_code(o.code, o.text),
                now,
            )
            for o in newly_failed
        )
        dsns.append(DsnReport(DsnKind.FAILED, reports))

    gave_up = False
    # the attempt counted and recorded in the history
    last_error = "" if all(o.delivered for o in result.outcomes) else this.text
    history = (*unit.history, Attempt(now, this.mx, this.code, this.text))[-MAX_HISTORY:]
    if not any(r.status is RcptStatus.PENDING for r in recipients):
        any_failed = any(r.status is RcptStatus.FAILED for r in recipients)
        # The final unit of every relayed message: built field by field, as replace()
        # would (3.7 µs against ~1; a test checks both agree on every field).
        new = UnitState(
            domain=unit.domain,
            recipients=recipients,
            status=UnitStatus.FAILED if any_failed else UnitStatus.DELIVERED,
            attempts=this.number,
            next_attempt_at=unit.next_attempt_at,
            history=history,
            delay_warned=unit.delay_warned,
            last_error=last_error,
            finished_at=now,
            reopened_at=unit.reopened_at,
            released_at=unit.released_at,
        )
    else:
        new = replace(
            unit,
            recipients=recipients,
            attempts=this.number,
            last_error=last_error,
            history=history,
        )
        # A unit reopened by `queue retry` counts its expiry from the reopening.
        expiry_base = unit.expiry_base(envelope.received_at)
        decision = retry.decide(this.number, expiry_base, now)
        if isinstance(decision, GiveUp):
            gave_up = True
            new, dsn, event = _give_up(this, new, expired=decision.reason == "expired")
        else:
            warn = not new.delay_warned and now - envelope.received_at >= settings.delay_warning_s
            until = retry.deadline(expiry_base)
            new, dsn, event = _defer(this, new, decision.at, warn=warn, until=until)
        dsns += [dsn] if dsn is not None else []
        events.append(event)

    outcomes = result.outcomes
    return Transition(
        unit=new,
        dsns=tuple(dsns),
        events=tuple(events),
        destination=destination_of(result),
        attempted=True,
        ok=bool(outcomes) and not newly_failed and all(o.delivered for o in outcomes),
        smtp_code=this.smtp_code,
        permanent_failure=bool(newly_failed) or gave_up,
    )


@dataclass(slots=True, init=False, unsafe_hash=True)  # not frozen: see the module doc
class _Attempt:
    """What the steps of :func:`after_attempt` share about the attempt just made."""

    domain: str
    result: AttemptResult
    by_addr: dict[str, RecipientOutcome]
    number: int  # the unit's attempts, this one included
    mx: str  # the attempt's summary (history, logs, reports)
    code: int | None
    text: str
    now: float
    wants_dsn: bool

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(
        self,
        domain: str,
        result: AttemptResult,
        by_addr: dict[str, RecipientOutcome],
        number: int,
        mx: str,
        code: int | None,
        text: str,
        now: float,
        wants_dsn: bool,
    ) -> None:
        self.domain = domain
        self.result = result
        self.by_addr = by_addr
        self.number = number
        self.mx = mx
        self.code = code
        self.text = text
        self.now = now
        self.wants_dsn = wants_dsn

    @property
    def smtp_code(self) -> str:
        return "" if self.code is None else str(self.code)

    def status_of(self, address: str, default: str) -> str:
        o = self.by_addr.get(address)
        return o.enhanced if o is not None and o.enhanced else default


def _recipients_after(
    unit: UnitState, this: _Attempt
) -> tuple[tuple[RecipientState, ...], list[RecipientOutcome]]:
    """Per recipient: 2xx delivered, 5xx failed (returned, for the DSN), 4xx pending."""
    recipients: list[RecipientState] = []
    newly_failed: list[RecipientOutcome] = []
    for r in unit.recipients:
        o = this.by_addr.get(r.address)
        if o is None or r.status is not RcptStatus.PENDING:
            recipients.append(r)
        elif o.delivered:
            recipients.append(RecipientState(r.address, RcptStatus.DELIVERED, o.code, o.text))
        elif o.permanent:
            recipients.append(RecipientState(r.address, RcptStatus.FAILED, o.code, o.diagnostic))
            newly_failed.append(o)
        else:
            recipients.append(RecipientState(r.address, RcptStatus.PENDING, o.code, o.diagnostic))
    return tuple(recipients), newly_failed


def _delivered(this: _Attempt) -> list[LogEvent]:
    delivered = [o for o in this.result.outcomes if o.delivered]
    if not delivered:
        return []
    fields = {
        "domain": this.domain,
        "mx": this.mx,
        "smtp_code": str(delivered[0].code or ""),
        "attempt": this.number,
        "recipients": len(delivered),
        **_connection_fields(this.result),
        "audit": True,
    }
    return [LogEvent(Severity.INFO, "Delivered", fields)]


def _failed(this: _Attempt, o: RecipientOutcome) -> LogEvent:
    fields = {
        "domain": this.domain,
        "recipient": o.address,
        "mx": o.mx,
        "smtp_code": "" if o.code is None else str(o.code),
        "dsn": o.enhanced,
        "attempt": this.number,
        "error": o.diagnostic,
        "audit": True,
    }
    return LogEvent(Severity.ERROR, "Delivery failed permanently", fields)


def _give_up(
    this: _Attempt, unit: UnitState, *, expired: bool
) -> tuple[UnitState, DsnReport | None, LogEvent]:
    """``max_attempts`` (failed) or the deadline (expired): every pending recipient fails."""
    pending = unit.pending_recipients()
    reason = "message expired" if expired else f"gave up after {this.number} attempts"
    error = f"{reason}: {this.text}"
    new = _fail_pending(unit, UnitStatus.EXPIRED if expired else UnitStatus.FAILED, error, this.now)
    dsn = None
    if this.wants_dsn:
        reports = tuple(
            RecipientReport(
                a,
                DsnAction.FAILED,
                _permanent(this.status_of(a, "4.4.7")),
                this.mx,
                diagnostic_code(this.code, this.text),
                this.now,
            )
            for a in pending
        )
        dsn = DsnReport(DsnKind.EXPIRED if expired else DsnKind.EXHAUSTED, reports)
    fields = {
        "domain": this.domain,
        "mx": this.mx,
        "smtp_code": this.smtp_code,
        "attempt": this.number,
        "error": error,
        "rcpt": list(pending),  # redact_recipients hides these here and in the error text
        "audit": True,
    }
    return new, dsn, LogEvent(Severity.ERROR, "Delivery gave up", fields)


def _defer(
    this: _Attempt, unit: UnitState, at: float, *, warn: bool, until: float
) -> tuple[UnitState, DsnReport | None, LogEvent]:
    """Retry at ``at``; with ``warn``, the one delay warning (its status stays 4.x.x)."""
    new = replace(unit, status=UnitStatus.RETRY, next_attempt_at=at)
    fields = {
        "domain": this.domain,
        "mx": this.mx,
        "smtp_code": this.smtp_code,
        "attempt": this.number,
        "error": this.text,
        "rcpt": list(unit.pending_recipients()),  # hidden with the error's local parts
        "retry_in_s": round(at - this.now, 1),
        **_connection_fields(this.result),
    }
    event = LogEvent(Severity.WARN, "Delivery deferred", fields)
    if not warn:
        return new, None, event
    new = replace(new, delay_warned=True)
    if not this.wants_dsn:
        return new, None, event
    reports = tuple(
        RecipientReport(
            a,
            DsnAction.DELAYED,
            _transient(this.status_of(a, "4.0.0")),
            this.mx,
            diagnostic_code(this.code, this.text),
            this.now,
            will_retry_until=until,
        )
        for a in new.pending_recipients()
    )
    return new, DsnReport(DsnKind.DELAYED, reports), event


def expire(
    unit: UnitState, *, envelope: Envelope, now: float, settings: TransitionSettings
) -> Transition:
    """Expire a unit without an attempt: its deadline passed while it waited."""
    if unit.status.terminal:
        return Transition(unit)
    pending = unit.pending_recipients()
    text = unit.last_error or "message expired"
    new = _fail_pending(unit, UnitStatus.EXPIRED, f"message expired: {text}", now)
    dsns: tuple[DsnReport, ...] = ()
    if settings.dsn_enabled and should_send_dsn(envelope) and pending:
        last = unit.history[-1] if unit.history else None
        reports = tuple(
            RecipientReport(
                a,
                DsnAction.FAILED,
                "5.4.7",  # RFC 3463: delivery time expired
                last.mx if last else "",
                diagnostic_code(last.code if last else None, text),
                last.at if last else None,
            )
            for a in pending
        )
        dsns = (DsnReport(DsnKind.EXPIRED, reports),)
    event = LogEvent(
        Severity.ERROR,
        "Delivery gave up",
        {
            "domain": unit.domain,
            "attempt": unit.attempts,
            "error": f"message expired: {text}",
            "smtp_code": "",
            "audit": True,
        },
    )
    return Transition(unit=new, dsns=dsns, events=(event,), permanent_failure=True)


def deleted(
    units: tuple[UnitState, ...], *, envelope: Envelope, settings: TransitionSettings
) -> DsnReport | None:
    """`queue delete --bounce`: the DSN for every recipient still pending, if one is due."""
    if not (settings.dsn_enabled and should_send_dsn(envelope)):
        return None
    reports: list[RecipientReport] = []
    for unit in units:
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
    return DsnReport(DsnKind.DELETED, tuple(reports)) if reports else None


# -- helpers ---------------------------------------------------------------------------


def _connection_fields(result: AttemptResult) -> dict[str, str]:
    """Which MX address took the attempt and whether TLS was used."""
    return {
        "mx_address": result.address,
        "tls": result.tls_version or "none",
        "tls_cipher": result.tls_cipher,
    }


def _permanent(status: str) -> str:
    """Giving up: the reply's subject and detail, in the permanent class."""
    return "5" + status[1:] if status[:1] == "4" else status


def _transient(status: str) -> str:
    """Still retrying: a delay report keeps (or gets) the transient class."""
    return status if status[:1] == "4" else "4.0.0"


def _fail_pending(unit: UnitState, status: UnitStatus, text: str, now: float) -> UnitState:
    recipients = tuple(
        RecipientState(r.address, RcptStatus.FAILED, r.code, text)
        if r.status is RcptStatus.PENDING
        else r
        for r in unit.recipients
    )
    return replace(unit, recipients=recipients, status=status, finished_at=now, last_error=text)
