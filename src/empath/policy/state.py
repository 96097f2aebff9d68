"""The per-destination policy state the scheduler consults (DESIGN §4, §11).

Theory of operation
-------------------
Three kinds of per-domain state decide whether a due unit may start now: the
circuit breaker, the rate-limit bucket and the count of open connections.  On
one machine they live in process (:class:`LocalPolicyState`).  With
``cluster: ( redis_url: ... )`` they must be shared so N nodes together respect
one domain limit and one breaker (DESIGN §11).  The scheduler only sees the
:class:`PolicyState` protocol, so the shared implementation can replace the
local one without touching it.

The protocol is deliberately synchronous and cheap: the scheduler calls it for
every unit it considers, on the hot path.  A shared implementation is expected
to answer from a local view kept fresh by a background task, not by a network
round trip per call — e.g. lease batches of tokens and connection slots from
Redis with atomic Lua scripts, mirror breaker states (and take the one probe
with a ``SET NX PX``), and give unused leases back.  Cross-node changes (a slot
freed on another node) reach a waiting scheduler through its fallback re-check
timer (``SchedulerSettings.parked_recheck_s``), not through an event.

Contract of the breaker methods: every :class:`~empath.policy.breaker.Admit`
obtained from :meth:`PolicyState.breaker_allow` is ended by exactly one of
``breaker_success``, ``breaker_failure`` or ``breaker_release`` with its probe
ticket (0 for ordinary admits).  See :mod:`empath.policy.breaker`.

Pure and clock-injected: no I/O, no clocks read other than the injected one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from empath.clock import Clock
from empath.policy.breaker import (
    BreakerDecision,
    BreakerInfo,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    TransitionCallback,
)
from empath.policy.ratelimit import RateDecision, RateLimit, RateLimiter


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """Everything the metrics collector and ``empathctl`` read, at one instant."""

    breakers: Mapping[str, BreakerInfo] = field(default_factory=dict)
    rate_limited_total: Mapping[str, int] = field(default_factory=dict)
    connections: Mapping[str, int] = field(default_factory=dict)


class PolicyState(Protocol):
    """Per-domain breaker, rate-limit and connection state, behind one interface."""

    # circuit breaker
    def breaker_allow(self, domain: str) -> BreakerDecision:
        """Admit (with a probe ticket when Half-Open) or Deny(until, state)."""
        ...

    def breaker_success(self, domain: str, probe: int) -> None: ...

    def breaker_failure(self, domain: str, probe: int) -> None:
        """A temporary failure; never call for permanent (5xx) outcomes."""
        ...

    def breaker_release(self, domain: str, probe: int) -> None:
        """End an admit without counting it (permanent outcome or cancelled)."""
        ...

    def breaker_state(self, domain: str) -> BreakerState: ...

    async def breaker_reset(self, domain: str) -> BreakerState:
        """`empathctl breaker reset`: Closed now, failures forgotten (cluster-wide when
        shared); the state it was in.  Leaving Open/Half-Open is a logged transition."""
        ...

    async def breaker_probe(self, domain: str) -> BreakerState:
        """`empathctl breaker probe`: an Open breaker lets its one probe through now;
        the state it was in."""
        ...

    # rate limit
    def acquire_token(self, domain: str) -> RateDecision:
        """Spend a token, or Wait(until) spending nothing."""
        ...

    def note_rate_limited(self, domain: str, count: int = 1) -> None:
        """Count units deferred for want of a token."""
        ...

    # connection slots
    def try_acquire_connection(self, domain: str, max_connections: int) -> bool:
        """Take a connection slot for ``domain`` if fewer than ``max_connections`` are taken."""
        ...

    def release_connection(self, domain: str) -> None: ...

    def connections(self, domain: str) -> int: ...

    # housekeeping and inspection
    def prune(self) -> None:
        """Forget idle per-domain records (called now and then by the scheduler)."""
        ...

    def snapshot(self) -> PolicySnapshot: ...


class ConnectionSlots:
    """Counts of connections (in-flight deliveries) per domain."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def try_acquire(self, domain: str, max_connections: int) -> bool:
        n = self._counts.get(domain, 0)
        if n >= max_connections:
            return False
        self._counts[domain] = n + 1
        return True

    def release(self, domain: str) -> None:
        n = self._counts.get(domain, 0)
        if n <= 1:
            self._counts.pop(domain, None)  # also forgives a double release
        else:
            self._counts[domain] = n - 1

    def count(self, domain: str) -> int:
        return self._counts.get(domain, 0)

    def counts(self) -> dict[str, int]:
        return dict(self._counts)


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """The breaker's settings and the rate limits (default and per domain)."""

    breaker: BreakerSettings
    default_rate: RateLimit
    rate_overrides: Mapping[str, RateLimit]


class LocalPolicyState:
    """The in-process :class:`PolicyState`: a breaker, a rate limiter and slot counts."""

    __slots__ = ("breaker", "limiter", "slots")

    def __init__(
        self,
        clock: Clock,
        settings: PolicySettings,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        self.breaker = CircuitBreaker(settings.breaker, clock, on_transition)
        self.limiter = RateLimiter(settings.default_rate, clock, settings.rate_overrides)
        self.slots = ConnectionSlots()

    def reconfigure(self, settings: PolicySettings) -> None:
        """SIGHUP: new settings, current breaker states and bucket levels kept."""
        self.breaker.reconfigure(settings.breaker)
        self.limiter.reconfigure(settings.default_rate, settings.rate_overrides)

    def breaker_allow(self, domain: str) -> BreakerDecision:
        return self.breaker.allow(domain)

    def breaker_success(self, domain: str, probe: int) -> None:
        self.breaker.record_success(domain, probe)

    def breaker_failure(self, domain: str, probe: int) -> None:
        self.breaker.record_failure(domain, probe)

    def breaker_release(self, domain: str, probe: int) -> None:
        self.breaker.release(domain, probe)

    def breaker_state(self, domain: str) -> BreakerState:
        return self.breaker.state(domain)

    async def breaker_reset(self, domain: str) -> BreakerState:
        return self.breaker.reset(domain)

    async def breaker_probe(self, domain: str) -> BreakerState:
        return self.breaker.probe_now(domain)

    def acquire_token(self, domain: str) -> RateDecision:
        return self.limiter.try_acquire(domain)

    def note_rate_limited(self, domain: str, count: int = 1) -> None:
        self.limiter.note_deferred(domain, count)

    def try_acquire_connection(self, domain: str, max_connections: int) -> bool:
        return self.slots.try_acquire(domain, max_connections)

    def release_connection(self, domain: str) -> None:
        self.slots.release(domain)

    def connections(self, domain: str) -> int:
        return self.slots.count(domain)

    def prune(self) -> None:
        self.breaker.prune()
        self.limiter.prune()

    def snapshot(self) -> PolicySnapshot:
        return PolicySnapshot(
            breakers=self.breaker.snapshot(),
            rate_limited_total=self.limiter.deferred_totals(),
            connections=self.slots.counts(),
        )
