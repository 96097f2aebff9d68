"""Per-domain circuit breaker (DESIGN §4): stop hammering a destination that is down.

Theory of operation
-------------------
Each recipient domain has a small state machine, created on first use::

              failure_threshold temporary failures
              within failure_window_s
    CLOSED ───────────────────────────────────────▶ OPEN ◀──────────────┐
      ▲                                               │ timeout_s passed │ the probe
      │ success_threshold probe successes             ▼ (entered lazily) │ failed
      └──────────────────────────────────────────── HALF_OPEN ──────────┘
                                                  one probe in flight

* **Closed** admits everything.  Temporary failures of the destination (connect,
  TLS, timeout, 421, a 4xx to the greeting, EHLO, MAIL or end of data, DNS
  temporary failure -- not a 4xx to one RCPT, which is one mailbox's trouble; see
  ``delivery.transition.destination_of``) are remembered with their monotonic time; once
  ``failure_threshold`` of them lie within ``failure_window_s`` the breaker
  *trips*: Open.  Permanent (5xx) outcomes never count: "5xx never counts".
* **Open** denies everything until ``timeout_s`` after the trip.  Units are
  deferred without spending an attempt (the scheduler parks them).
* **Half-Open** is entered lazily, by the first look at the domain after the
  timeout.  It admits exactly one *probe* at a time; each admitted probe gets a
  ticket (a positive int) that the caller hands back with its outcome.  A probe
  success counts towards ``success_threshold``; reaching it closes the breaker.
  A probe failure opens it again, which is a new trip.

Only the probe's outcome moves a Half-Open breaker: outcomes of deliveries that
were admitted earlier (ticket ``0``) are ignored in Open and Half-Open, so a late
success from before the trip can neither close the breaker nor free the probe
slot (which would let a second probe in).

A probe whose outcome never comes
---------------------------------
The caller must end every admitted probe with exactly one of
:meth:`CircuitBreaker.record_success`, :meth:`record_failure` or
:meth:`release` (the last for outcomes that say nothing about the destination:
a permanent 5xx, or a delivery cancelled at shutdown).  The scheduler does this
in ``Scheduler.finished``.  As a safety net against a caller bug, a probe that
has been in flight for ``probe_timeout_s`` is considered lost: the next
:meth:`allow` discards it and admits a new probe; its late outcome, if it ever
comes, carries a stale ticket and is ignored.

Transitions are reported through the ``on_transition`` callback as
:class:`BreakerTransition` values; the caller logs ``transition.message``
(``Circuit breaker OPENED|HALF-OPEN|CLOSED for <domain>``, component
"delivery", ``transition.log_fields()``) at ``transition.log_level``.  Trips are counted per
domain for ``empath_delivery_circuit_breaker_trips_total``.

All time is monotonic, read from the injected clock; nothing here does I/O.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from empath.clock import Clock

DEFAULT_PROBE_TIMEOUT_S: Final = 900.0  # longer than a whole SMTP transaction's timeouts


class BreakerState(enum.Enum):
    """Breaker states; values are the metric label (DESIGN §6)."""

    CLOSED = "Closed"
    OPEN = "Open"
    HALF_OPEN = "HalfOpen"

    @property
    def gauge_value(self) -> int:
        """Value of ``empath_delivery_circuit_breaker_state``: 0 Closed, 1 Open, 2 HalfOpen."""
        return _GAUGE[self]


_GAUGE: Final = {BreakerState.CLOSED: 0, BreakerState.OPEN: 1, BreakerState.HALF_OPEN: 2}
_VERB: Final = {
    BreakerState.CLOSED: "CLOSED",
    BreakerState.OPEN: "OPENED",
    BreakerState.HALF_OPEN: "HALF-OPEN",
}
_LOG_LEVEL: Final = {  # stdlib logging levels (numbers; nothing is logged here)
    BreakerState.CLOSED: logging.INFO,
    BreakerState.OPEN: logging.ERROR,  # the runbook's storm query filters on level="ERROR"
    BreakerState.HALF_OPEN: logging.WARNING,
}


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """``delivery.circuit_breaker`` (DESIGN §2) plus the lost-probe safety net."""

    failure_threshold: int
    failure_window_s: float
    timeout_s: float
    success_threshold: int
    probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError("breaker thresholds must be at least 1")
        if self.failure_window_s < 0 or self.timeout_s < 0 or self.probe_timeout_s <= 0:
            raise ValueError("breaker durations must not be negative")


@dataclass(frozen=True, slots=True)
class Admit:
    """Go ahead.  ``probe`` is the Half-Open probe ticket, or 0 for an ordinary admit."""

    probe: int = 0


@dataclass(frozen=True, slots=True)
class Deny:
    """Not now: look again at monotonic time ``until`` (or when the probe finishes)."""

    until: float
    state: BreakerState


ADMIT: Final = Admit()

BreakerDecision = Admit | Deny


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """A state change of one domain's breaker, for logs and metrics."""

    domain: str
    old: BreakerState
    new: BreakerState
    at: float  # monotonic
    trips_total: int  # trips of this domain so far, this one included

    @property
    def message(self) -> str:
        return f"Circuit breaker {_VERB[self.new]} for {self.domain}"

    @property
    def log_level(self) -> int:
        """ERROR for OPENED, WARNING for HALF-OPEN, INFO for CLOSED."""
        return _LOG_LEVEL[self.new]

    def log_fields(self) -> dict[str, object]:
        """The fields of its log line (besides ``message``)."""
        return {"domain": self.domain, "state": self.new.value, "trips_total": self.trips_total}


@dataclass(frozen=True, slots=True)
class BreakerInfo:
    """One domain in :meth:`CircuitBreaker.snapshot`."""

    state: BreakerState
    trips_total: int
    open_until: float | None  # monotonic, while Open
    since: float | None = None  # monotonic: when it entered this state (None: never left Closed)
    failures: int = 0  # temporary failures inside the window (Closed only)


class _Domain:
    """Mutable per-domain record (internal)."""

    __slots__ = (
        "failures",
        "open_until",
        "probe",
        "probe_started",
        "since",
        "state",
        "successes",
    )

    def __init__(self, failure_threshold: int) -> None:
        self.state = BreakerState.CLOSED
        self.failures: deque[float] = deque(maxlen=failure_threshold)
        self.open_until = 0.0
        self.probe = 0  # ticket of the probe in flight, 0 = none
        self.probe_started = 0.0
        self.successes = 0  # probe successes in this Half-Open period
        self.since: float | None = None  # monotonic: when the current state was entered


TransitionCallback = Callable[[BreakerTransition], None]


class CircuitBreaker:
    """All domains' breakers.  Domains are compared as given (callers pass lower case)."""

    __slots__ = ("_clock", "_domains", "_next_ticket", "_on_transition", "_settings", "_trips")

    def __init__(
        self,
        settings: BreakerSettings,
        clock: Clock,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._on_transition = on_transition
        self._domains: dict[str, _Domain] = {}
        self._trips: dict[str, int] = {}
        self._next_ticket = 1

    @property
    def settings(self) -> BreakerSettings:
        return self._settings

    def __repr__(self) -> str:
        states = [d.state for d in self._domains.values()]
        open_ = sum(1 for s in states if s is BreakerState.OPEN)
        half = sum(1 for s in states if s is BreakerState.HALF_OPEN)
        return (
            f"<CircuitBreaker domains={len(states)} open={open_} half_open={half} "
            f"trips={sum(self._trips.values())} threshold={self._settings.failure_threshold}"
            f"/{self._settings.failure_window_s:g}s>"
        )

    def reconfigure(self, settings: BreakerSettings) -> None:
        """Apply new settings (SIGHUP); current states, trips and open timers are kept."""
        self._settings = settings
        for rec in self._domains.values():
            if rec.failures.maxlen != settings.failure_threshold:
                rec.failures = deque(rec.failures, maxlen=settings.failure_threshold)

    # -- decisions -------------------------------------------------------------

    def allow(self, domain: str) -> BreakerDecision:
        """May a delivery to ``domain`` start now?  A Half-Open admit is the one probe."""
        rec = self._domains.get(domain)
        if rec is None or rec.state is BreakerState.CLOSED:
            return ADMIT
        now = self._clock.monotonic()
        if rec.state is BreakerState.OPEN:
            if now < rec.open_until:
                return Deny(rec.open_until, BreakerState.OPEN)
            self._enter(domain, rec, BreakerState.HALF_OPEN, now)
        if rec.probe:
            probe_deadline = rec.probe_started + self._settings.probe_timeout_s
            if now < probe_deadline:
                return Deny(probe_deadline, BreakerState.HALF_OPEN)
            rec.probe = 0  # lost probe (caller never reported it): see module docstring
        rec.probe = self._next_ticket
        self._next_ticket += 1
        rec.probe_started = now
        return Admit(rec.probe)

    def record_success(self, domain: str, probe: int = 0) -> None:
        """A delivery admitted with ticket ``probe`` reached the destination."""
        rec = self._domains.get(domain)
        if rec is None or rec.state is not BreakerState.HALF_OPEN:
            return  # Closed: nothing to undo (successes do not erase failures); Open: stale
        if not probe or probe != rec.probe:
            return  # not the probe: only the probe moves a Half-Open breaker
        rec.probe = 0
        rec.successes += 1
        if rec.successes >= self._settings.success_threshold:
            self._enter(domain, rec, BreakerState.CLOSED, self._clock.monotonic())

    def record_failure(self, domain: str, probe: int = 0) -> None:
        """The destination failed *temporarily* (connect, timeout, 421, 4xx to the session).

        Never call this for permanent (5xx) outcomes: "5xx never counts" (DESIGN §4).
        """
        now = self._clock.monotonic()
        rec = self._domains.get(domain)
        if rec is None:
            rec = self._domains[domain] = _Domain(self._settings.failure_threshold)
        if rec.state is BreakerState.CLOSED:
            failures = rec.failures
            failures.append(now)
            if (
                len(failures) >= self._settings.failure_threshold
                and now - failures[0] <= self._settings.failure_window_s
            ):
                self._enter(domain, rec, BreakerState.OPEN, now)
            return
        if rec.state is BreakerState.HALF_OPEN and probe and probe == rec.probe:
            self._enter(domain, rec, BreakerState.OPEN, now)
        # Open, or a stale non-probe outcome in Half-Open: ignored.

    def release(self, domain: str, probe: int = 0) -> None:
        """End an admit without counting it (5xx, cancelled): frees the probe slot."""
        if not probe:
            return
        rec = self._domains.get(domain)
        if rec is not None and rec.state is BreakerState.HALF_OPEN and rec.probe == probe:
            rec.probe = 0

    # -- operator actions (`empathctl breaker reset|probe`) -----------------------

    def reset(self, domain: str) -> BreakerState:
        """Close ``domain``'s breaker now and forget its failures; the state it was in.
        Leaving Open or Half-Open is a transition like any other (logged, counted)."""
        rec = self._domains.get(domain)
        if rec is None:
            return BreakerState.CLOSED
        old = rec.state
        if old is BreakerState.CLOSED:
            rec.failures.clear()
        else:
            self._enter(domain, rec, BreakerState.CLOSED, self._clock.monotonic())
        return old

    def probe_now(self, domain: str) -> BreakerState:
        """Let one attempt through now: an Open breaker becomes Half-Open at once (its
        next admit is the probe).  The state it was in; Closed and Half-Open are kept."""
        rec = self._domains.get(domain)
        if rec is None:
            return BreakerState.CLOSED
        old = rec.state
        if old is BreakerState.OPEN:
            now = self._clock.monotonic()
            rec.open_until = now
            self._enter(domain, rec, BreakerState.HALF_OPEN, now)
        return old

    # -- inspection ------------------------------------------------------------

    def state(self, domain: str) -> BreakerState:
        """Current state (an expired Open becomes Half-Open on this look)."""
        rec = self._domains.get(domain)
        if rec is None:
            return BreakerState.CLOSED
        self._refresh(domain, rec)
        return rec.state

    def probe_in_flight(self, domain: str) -> bool:
        rec = self._domains.get(domain)
        return rec is not None and rec.probe != 0

    def trips_total(self, domain: str) -> int:
        return self._trips.get(domain, 0)

    def info(self, domain: str) -> BreakerInfo | None:
        """One domain's entry of :meth:`snapshot` (None: the breaker does not know it),
        for views that show a few domains of many."""
        rec = self._domains.get(domain)
        if rec is None:
            trips = self._trips.get(domain)
            return None if trips is None else BreakerInfo(BreakerState.CLOSED, trips, None)
        now = self._clock.monotonic()
        is_open = BreakerState.OPEN
        if rec.state is is_open and now >= rec.open_until:
            self._refresh(domain, rec)
        window_start = now - self._settings.failure_window_s
        failures = rec.failures
        return BreakerInfo(
            rec.state,
            self._trips.get(domain, 0),
            rec.open_until if rec.state is is_open else None,
            rec.since,
            sum(1 for t in failures if t >= window_start),
        )

    def noteworthy(self) -> list[tuple[int, str]]:
        """``(rank, domain)`` of every breaker that is not plainly Closed: 0 Half-Open,
        1 Open, 2 Closed with failures inside the window - what `breaker list` ranks
        and counts, without a :class:`BreakerInfo` per domain (10,000 open breakers:
        the snapshot took ~15 ms of the event loop, this ~2).  An expired Open becomes
        Half-Open on this look, as in :meth:`snapshot`."""
        out: list[tuple[int, str]] = []
        now = self._clock.monotonic()
        window_start = now - self._settings.failure_window_s
        closed, is_open, half_open = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
        for domain, rec in self._domains.items():
            state = rec.state
            if state is closed:
                failures = rec.failures
                if failures and failures[-1] >= window_start:
                    out.append((2, domain))
                continue
            if state is is_open and now >= rec.open_until:
                self._refresh(domain, rec)
                state = rec.state
            out.append((0 if state is half_open else 1, domain))
        return out

    def snapshot(self) -> dict[str, BreakerInfo]:
        """State and trip count of every domain the breaker knows (for metrics)."""
        out: dict[str, BreakerInfo] = {}
        now = self._clock.monotonic()
        window_start = now - self._settings.failure_window_s
        trips_of = self._trips
        is_open = BreakerState.OPEN
        for domain, rec in self._domains.items():
            if rec.state is is_open and now >= rec.open_until:
                self._refresh(domain, rec)
            failures = rec.failures
            if failures and failures[0] < window_start:
                n = sum(1 for t in failures if t >= window_start)
            else:
                n = len(failures)
            out[domain] = BreakerInfo(
                rec.state,
                trips_of.get(domain, 0),
                rec.open_until if rec.state is is_open else None,
                rec.since,
                n,
            )
        for domain, trips in self._trips.items():
            if domain not in out:
                out[domain] = BreakerInfo(BreakerState.CLOSED, trips, None)
        return out

    def prune(self) -> int:
        """Forget Closed domains with no failure inside the window; returns how many.

        A forgotten domain behaves exactly like a fresh one; trip counts are kept.
        """
        now = self._clock.monotonic()
        window = self._settings.failure_window_s
        stale = [
            d
            for d, rec in self._domains.items()
            if rec.state is BreakerState.CLOSED
            and (not rec.failures or now - rec.failures[-1] > window)
        ]
        for d in stale:
            del self._domains[d]
        return len(stale)

    def __len__(self) -> int:
        return len(self._domains)

    # -- internals -------------------------------------------------------------

    def _refresh(self, domain: str, rec: _Domain) -> None:
        if rec.state is BreakerState.OPEN:
            now = self._clock.monotonic()
            if now >= rec.open_until:
                self._enter(domain, rec, BreakerState.HALF_OPEN, now)

    def _enter(self, domain: str, rec: _Domain, new: BreakerState, now: float) -> None:
        old = rec.state
        rec.state = new
        rec.since = now
        rec.probe = 0
        rec.successes = 0
        if new is BreakerState.OPEN:
            rec.open_until = now + self._settings.timeout_s
            rec.failures.clear()
            self._trips[domain] = self._trips.get(domain, 0) + 1
        elif new is BreakerState.CLOSED:
            rec.failures.clear()
        if self._on_transition is not None:
            self._on_transition(
                BreakerTransition(domain, old, new, now, self._trips.get(domain, 0))
            )


def states_by_domain(snapshot: Mapping[str, BreakerInfo]) -> dict[str, BreakerState]:
    """Convenience for tests and ``empathctl``: domain -> state."""
    return {d: info.state for d, info in snapshot.items()}
