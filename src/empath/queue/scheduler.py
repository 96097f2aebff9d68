"""The pure scheduling step: which due units start now, and what the others wait for.

Theory of operation
-------------------
The scheduler tracks every live unit in exactly one of three places:

* the **due index** (:class:`~empath.queue.index.DueIndex`, wall-clock
  ``next_attempt_at``): units waiting for their time;
* a **domain line**: units that are due but whose domain cannot take them now
  (breaker Open or probing, no rate-limit token, ``max_connections`` reached).
  A line is a FIFO per domain; while a domain has a line, every newly due unit of
  that domain joins its back, so policy is checked once per wake-up of the
  domain, not once per waiting unit (no busy polling, no O(n²) re-deferral);
* **in flight**: dispatched, until the runner reports :meth:`Scheduler.finished`.

A blocked line is woken by a timer (the breaker's ``until``, the next token's due
time, capped at ``parked_recheck_s`` as a fallback for shared cluster state) or by
an event: a delivery of that domain finishing frees a connection slot or a probe.
Woken lines are *ready*: :meth:`Scheduler.tick` serves ready lines first (they
were due earlier), one unit per domain per round, then pops the due index, until
``max_concurrent_deliveries`` units are in flight.

:func:`decide` is the per-unit decision against the :class:`PolicyState`, in this
order so nothing is held when the answer is "wait": the breaker (an Admit may be
the Half-Open probe), then a connection slot, then a rate-limit token; a refusal
at a later step gives back what the earlier steps took.  No deferral spends an
attempt: the runner only counts attempts for :class:`Dispatch`.

How the async runner drives it::

    scheduler.add(UnitKey(msg_id, domain), unit.next_attempt_at)   # accepted / retried
    for key, decision in scheduler.tick():                         # wall now by default
        match decision:
            case Dispatch(): start the delivery (decision.probe is informational)
            case DeferRateLimit(): log "Rate limit exceeded" (per domain, throttled)
            case DeferBreaker() | WaitForConnection(): debug log, nothing to do
    scheduler.finished(key, OutcomeKind.TEMPORARY)       # then add(key, retry_at) if retrying
    delay = scheduler.wake_delay_s()   # None: wait for add/finished/process_now

Call :meth:`tick` after :meth:`add`, :meth:`finished`, :meth:`process_now`,
:meth:`reconfigure`, and when :meth:`wake_delay_s` elapses.  A unit added due now
is dispatched by the very next tick when nothing throttles it.  For the health
check's heartbeat the runner should tick at least every few seconds even when
idle (sleep ``min(wake_delay_s() or 1.0, 1.0)``).

Deferrals are reported once per unit and wait: a unit joining a blocked line is
reported then; re-checks of a line's head are not reported again.  Rate-limit
waits are counted (``PolicyState.note_rate_limited``, the metric
``empath_delivery_rate_limited_total``) and reported for **every unit that waits
in a line blocked by the rate limit**, once per wait: the units that join it, and
the units that joined the line while it was ready (or blocked for another reason)
when it then blocks on the rate limit.  (Counting only the joiners missed a
backlog drained at exactly the limit: its line is woken for each token, its new
units join while it is ready, and its head is refused silently.)  A line keeps the
token of the last unit counted, so each block looks only at the units that joined
since: every unit is looked at once per wait, not once per re-check.

Pure: the clock is injected; no I/O, no asyncio.  Wall time orders the due index
(``next_attempt_at`` is wall clock, as the spool records it); monotonic time drives
the policy and line timers.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from empath.clock import Clock
from empath.delivery.classify import OutcomeKind
from empath.policy.breaker import BreakerState, Deny
from empath.policy.ratelimit import Wait
from empath.policy.state import PolicyState
from empath.queue.index import DueIndex, UnitKey


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Start the delivery now.  ``probe`` > 0: it is the breaker's Half-Open probe."""

    probe: int = 0


@dataclass(frozen=True, slots=True)
class DeferBreaker:
    """The domain's circuit breaker is Open (or its one probe is in flight) until ``until``
    (monotonic)."""

    until: float
    state: BreakerState


@dataclass(frozen=True, slots=True)
class DeferRateLimit:
    """No rate-limit token for the domain before ``until`` (monotonic)."""

    until: float


@dataclass(frozen=True, slots=True)
class WaitForConnection:
    """The domain has ``max_connections`` deliveries in flight; woken when one ends."""

    max_connections: int


@dataclass(frozen=True, slots=True)
class Suspended:
    """The operator suspended the domain (`queue suspend`) until ``until`` (monotonic,
    ``inf`` until resumed).  Units join the line silently: no per-unit report."""

    until: float


DISPATCH: Final = Dispatch()

Decision = Dispatch | DeferBreaker | DeferRateLimit | WaitForConnection
Block = DeferBreaker | DeferRateLimit | WaitForConnection | Suspended


def decide(domain: str, policy: PolicyState, max_connections: int) -> Decision:
    """May a due unit of ``domain`` start now?  Takes the slot, token and probe if so."""
    admit = policy.breaker_allow(domain)
    if isinstance(admit, Deny):
        return DeferBreaker(admit.until, admit.state)
    if not policy.try_acquire_connection(domain, max_connections):
        policy.breaker_release(domain, admit.probe)
        return WaitForConnection(max_connections)
    token = policy.acquire_token(domain)
    if isinstance(token, Wait):
        policy.release_connection(domain)
        policy.breaker_release(domain, admit.probe)
        return DeferRateLimit(token.until)
    return Dispatch(admit.probe) if admit.probe else DISPATCH


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """When the scheduler last ticked, for ``/health/ready`` (DESIGN §7: within 10 s)."""

    last_tick_monotonic: float
    ticks: int

    def age_s(self, now_monotonic: float) -> float:
        return max(0.0, now_monotonic - self.last_tick_monotonic)


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    scheduled: int  # in the due index (not yet due, or due and not yet looked at)
    parked: int  # due, waiting in a domain line
    in_flight: int
    blocked_domains: int
    ready_domains: int


# Scheduler knobs that are not config keys (config/derive.py passes them in).
PARKED_RECHECK_S: Final = 5.0  # a parked domain is looked at again after this at most
MAX_UNITS_PER_TICK: Final = 10_000  # units decided per tick (the rest: next tick)
PRUNE_INTERVAL_S: Final = 60.0  # how often idle domain lines are dropped


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """The caps the config sets (deliveries at once, connections per domain) and the
    scheduler's own knobs."""

    max_concurrent_deliveries: int
    max_connections_for: Callable[[str], int]
    parked_recheck_s: float
    max_units_per_tick: int
    prune_interval_s: float

    def __post_init__(self) -> None:
        if self.max_concurrent_deliveries < 1:
            raise ValueError("max_concurrent_deliveries must be at least 1")
        if self.parked_recheck_s <= 0 or self.max_units_per_tick < 1:
            raise ValueError("parked_recheck_s and max_units_per_tick must be positive")


class _Line:
    """Due units of one domain waiting for the domain to take them (internal)."""

    __slots__ = ("blocked", "counted_through", "waiters")

    def __init__(self, blocked: Block | None) -> None:
        self.waiters: deque[tuple[UnitKey, int]] = deque()
        self.blocked = blocked  # None: ready to be served
        self.counted_through = 0  # waiters with a token up to this one were counted


class Scheduler:
    """Due index + domain lines + in-flight set; see the module docstring."""

    __slots__ = (
        "_clock",
        "_cut_short",
        "_index",
        "_inflight",
        "_last_prune",
        "_last_tick",
        "_lines",
        "_max_concurrent",
        "_max_connections_for",
        "_max_units_per_tick",
        "_parked",
        "_parked_recheck_s",
        "_policy",
        "_prune_interval_s",
        "_ready",
        "_ticks",
        "_timers",
        "_tokens",
        "suspended",
    )

    def __init__(
        self,
        policy: PolicyState,
        clock: Clock,
        settings: SchedulerSettings,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._apply(settings)
        self._index: DueIndex[UnitKey] = DueIndex()
        self._timers: DueIndex[str] = DueIndex()  # domain -> monotonic wake-up
        self._lines: dict[str, _Line] = {}
        self._parked: dict[UnitKey, int] = {}  # key -> token of its live line entry
        self._ready: dict[str, None] = {}  # ordered set of ready domains
        self._inflight: dict[UnitKey, int] = {}  # key -> breaker probe ticket (0 = none)
        self._tokens = itertools.count(1)
        self._last_tick = clock.monotonic()
        self._last_prune = self._last_tick
        self._ticks = 0
        self._cut_short = False
        # domain -> wall-clock end of its suspension (the Suspensions' dict, shared)
        self.suspended: dict[str, float] = {}

    # -- feeding -----------------------------------------------------------------

    def add(self, key: UnitKey, due_at: float) -> None:
        """Track ``key``, due at wall-clock ``due_at`` (0 or the past = now).

        Re-adding a waiting unit reschedules it.  Adding an in-flight unit is a bug
        (report :meth:`finished` first) and raises ValueError.
        """
        if key in self._inflight:
            raise ValueError(f"unit {key} is in flight; call finished() before add()")
        self._parked.pop(key, None)
        self._index.schedule(key, due_at)

    def remove(self, key: UnitKey) -> bool:
        """Stop tracking a waiting unit (deleted, or terminal).  False if unknown or in
        flight (an in-flight unit is ended by :meth:`finished`)."""
        if self._index.remove(key):
            return True
        return self._parked.pop(key, None) is not None

    def finished(self, key: UnitKey, outcome: OutcomeKind | None) -> bool:
        """A dispatched unit's attempt ended: ``outcome`` is what it says about the
        destination (``delivery.transition.destination_of``; None: cancelled, nothing).
        Frees its slot, feeds the breaker (only TEMPORARY counts against it: 5xx never
        does, DESIGN §4), wakes its domain's line.  Returns False (and does nothing) for
        a unit not in flight."""
        probe = self._inflight.pop(key, None)
        if probe is None:
            return False
        domain = key.domain
        policy = self._policy
        policy.release_connection(domain)
        if outcome is OutcomeKind.DELIVERED:
            policy.breaker_success(domain, probe)
        elif outcome is OutcomeKind.TEMPORARY:
            policy.breaker_failure(domain, probe)
        else:
            policy.breaker_release(domain, probe)
        self._wake(domain)
        return True

    def process_now(self, now: float | None = None) -> int:
        """``queue process-now``: every scheduled unit becomes due now and every domain
        line is re-checked at the next tick.  Returns how many units were moved earlier."""
        moved = self._index.make_all_due(self._clock.now() if now is None else now)
        for domain in list(self._lines):
            self._wake(domain)
        return moved

    def wake(self, domain: str) -> None:
        """Re-check ``domain``'s line at the next tick: its shared policy state changed
        (a cluster node's answer arrived; see ``empath.cluster.state``)."""
        self._wake(domain)

    def reconfigure(self, settings: SchedulerSettings) -> None:
        """SIGHUP: new caps; every domain line is re-checked at the next tick."""
        self._apply(settings)
        for domain in list(self._lines):
            self._wake(domain)

    def _apply(self, settings: SchedulerSettings) -> None:
        self._max_concurrent = settings.max_concurrent_deliveries
        self._max_connections_for = settings.max_connections_for
        self._parked_recheck_s = settings.parked_recheck_s
        self._max_units_per_tick = settings.max_units_per_tick
        self._prune_interval_s = settings.prune_interval_s

    # -- the step ----------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[tuple[UnitKey, Decision]]:
        """Decide for every unit that can be looked at now (``now``: wall clock).

        Returns ``(key, Dispatch)`` for units to start and ``(key, Defer*/Wait*)``
        for units that just entered a domain line.
        """
        clock = self._clock
        if now is None:
            now = clock.now()
        mono = clock.monotonic()
        self._last_tick = mono
        self._ticks += 1
        if mono - self._last_prune >= self._prune_interval_s:
            self._last_prune = mono
            self._policy.prune()

        out: list[tuple[UnitKey, Decision]] = []
        lines = self._lines
        ready = self._ready
        timers = self._timers
        while (domain := timers.pop_one(mono)) is not None:
            line = lines.get(domain)
            if line is not None and line.blocked is not None:
                line.blocked = None
                ready[domain] = None

        budget = self._max_concurrent - len(self._inflight)
        examined = 0
        limit = self._max_units_per_tick

        # 1. Ready domain lines, round robin: their units were due before the index's.
        while budget > 0 and ready and examined < limit:
            for domain in list(ready):
                if budget <= 0 or examined >= limit:
                    break
                examined += 1
                if self._serve_head(domain, mono, out):
                    budget -= 1

        # 2. The due index, earliest first.
        index = self._index
        policy = self._policy
        inflight = self._inflight
        max_conn = self._max_connections_for
        suspended = self.suspended
        while budget > 0 and examined < limit:
            key = index.pop_one(now)
            if key is None:
                break
            examined += 1
            domain = key.domain
            line = lines.get(domain)
            if line is not None:
                self._join(line, key, out)
                continue
            if suspended and (block := self._suspension(domain, now, mono)) is not None:
                line = lines[domain] = _Line(block)
                self._set_timer(domain, block, mono)
                self._join(line, key, out)
                continue
            decision = decide(domain, policy, max_conn(domain))
            if isinstance(decision, Dispatch):
                inflight[key] = decision.probe
                budget -= 1
            else:
                line = lines[domain] = _Line(decision)
                self._set_timer(domain, decision, mono)
                self._join(line, key, out)
                continue
            out.append((key, decision))
        self._cut_short = examined >= limit
        return out

    def wake_at(self) -> float | None:
        """Wall-clock time the runner should tick next; None: only after add/finished/
        process_now (nothing scheduled, or all ``max_concurrent_deliveries`` busy)."""
        if len(self._inflight) >= self._max_concurrent:
            return None
        now = self._clock.now()
        if self._ready or self._cut_short:
            return now
        best = self._index.next_due()
        timer = self._timers.next_due()
        if timer is not None:
            at = now + (timer - self._clock.monotonic())
            best = at if best is None else min(best, at)
        return best

    def wake_delay_s(self) -> float | None:
        """Seconds until :meth:`wake_at` (0 when overdue), or None."""
        at = self.wake_at()
        return None if at is None else max(0.0, at - self._clock.now())

    # -- inspection --------------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(self._last_tick, self._ticks)

    def stats(self) -> SchedulerStats:
        blocked = sum(1 for line in self._lines.values() if line.blocked is not None)
        return SchedulerStats(
            scheduled=len(self._index),
            parked=len(self._parked),
            in_flight=len(self._inflight),
            blocked_domains=blocked,
            ready_domains=len(self._ready),
        )

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def max_concurrent_deliveries(self) -> int:
        return self._max_concurrent

    def is_in_flight(self, key: UnitKey) -> bool:
        return key in self._inflight

    def blocked(self, domain: str) -> Block | None:
        """Why ``domain``'s line is waiting, or None (no line, or ready)."""
        line = self._lines.get(domain)
        return None if line is None else line.blocked

    def __len__(self) -> int:
        return len(self._index) + len(self._parked) + len(self._inflight)

    def backlog(self, limit: int, now: float | None = None) -> int:
        """Units that wait only for this node, counted up to ``limit`` (for readiness):
        in flight, due now in the due index (no delivery slot yet), and in lines that
        are ready.  Not those waiting for their retry time, nor those their destination
        holds (breaker Open, no rate-limit token, its max_connections reached): a
        destination's outage says nothing about what this node can still take in."""
        count = len(self._inflight)
        for domain in self._ready:
            line = self._lines.get(domain)
            if line is not None and line.blocked is None:
                count += len(line.waiters)
            if count >= limit:
                return count
        when = self._clock.now() if now is None else now
        return count + self._index.count_due(when, limit - count)

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<Scheduler scheduled={s.scheduled} parked={s.parked} "
            f"in_flight={s.in_flight}/{self._max_concurrent} "
            f"domains blocked={s.blocked_domains} ready={s.ready_domains}>"
        )

    def __contains__(self, key: object) -> bool:
        return key in self._index or key in self._parked or key in self._inflight

    # -- internals ---------------------------------------------------------------

    def _suspension(self, domain: str, now: float, mono: float) -> Suspended | None:
        """The domain's suspension as a line block, if it is suspended at wall ``now``."""
        until = self.suspended.get(domain)
        if until is None or until <= now:
            return None
        return Suspended(mono + (until - now))

    def _join(self, line: _Line, key: UnitKey, out: list[tuple[UnitKey, Decision]]) -> None:
        token = next(self._tokens)
        self._parked[key] = token
        line.waiters.append((key, token))
        blocked = line.blocked
        if blocked is None:
            return  # a ready line: served in order at the next tick (wake_at says now)
        if isinstance(blocked, Suspended):
            return  # suspended by the operator: nothing to report per unit
        if isinstance(blocked, DeferRateLimit):
            self._policy.note_rate_limited(key.domain)
            line.counted_through = token
        out.append((key, blocked))

    def _count_rate_limited(
        self,
        domain: str,
        line: _Line,
        blocked: DeferRateLimit,
        out: list[tuple[UnitKey, Decision]],
    ) -> None:
        """The line just blocked on the rate limit: count and report the live units that
        joined it since the last count (a suffix of the line; see the module docstring)."""
        waiters = line.waiters
        if not waiters:
            return
        parked = self._parked
        newly: list[UnitKey] = []
        for key, token in reversed(waiters):
            if token <= line.counted_through:
                break
            if parked.get(key) == token:
                newly.append(key)
        line.counted_through = waiters[-1][1]
        if newly:
            self._policy.note_rate_limited(domain, len(newly))
            out.extend((key, blocked) for key in reversed(newly))

    def _serve_head(self, domain: str, mono: float, out: list[tuple[UnitKey, Decision]]) -> bool:
        """Try the first live unit of a ready line; True if it was dispatched."""
        line = self._lines[domain]
        waiters = line.waiters
        parked = self._parked
        while waiters:
            key, token = waiters[0]
            if parked.get(key) != token:
                waiters.popleft()  # removed or re-added since it joined
                continue
            decision: Decision | Suspended
            if (
                self.suspended
                and (block := self._suspension(domain, self._clock.now(), mono)) is not None
            ):
                decision = block
            else:
                decision = decide(domain, self._policy, self._max_connections_for(domain))
            if not isinstance(decision, Dispatch):
                line.blocked = decision
                del self._ready[domain]
                self._set_timer(domain, decision, mono)
                if isinstance(decision, DeferRateLimit):
                    self._count_rate_limited(domain, line, decision, out)
                return False
            waiters.popleft()
            del parked[key]
            self._inflight[key] = decision.probe
            out.append((key, decision))
            if not waiters:
                self._drop_line(domain)
            return True
        self._drop_line(domain)
        return False

    def _drop_line(self, domain: str) -> None:
        del self._lines[domain]
        self._ready.pop(domain, None)
        self._timers.remove(domain)

    def _wake(self, domain: str) -> None:
        line = self._lines.get(domain)
        if line is not None and line.blocked is not None:
            line.blocked = None
            self._ready[domain] = None
            self._timers.remove(domain)

    def _set_timer(self, domain: str, blocked: Block, mono: float) -> None:
        at = mono + self._parked_recheck_s
        if not isinstance(blocked, WaitForConnection):
            at = min(at, blocked.until)
        self._timers.schedule(domain, at)
