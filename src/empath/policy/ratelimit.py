"""Per-domain token buckets (DESIGN §4 "Rate limit").

Theory of operation
-------------------
Every recipient domain has a bucket holding at most ``burst_size`` tokens,
refilled continuously at ``messages_per_second``.  A delivery takes one token;
a bucket starts full.  Over any interval of length *t* a bucket therefore
grants at most ``burst_size + messages_per_second * t`` deliveries.

:meth:`RateLimiter.try_acquire` either spends a token (:data:`GRANTED`) or, when
less than one token is left, spends nothing and answers :class:`Wait` with the
monotonic time at which the next whole token will be there.  The caller defers
the unit until then without spending an attempt, and records the deferral with
:meth:`RateLimiter.note_deferred` (counted per domain for
``empath_delivery_rate_limited_total``).  Counting is separate from asking so a
scheduler that re-checks a waiting domain does not count one deferral twice.

Which limit applies to a domain (highest precedence first)
-----------------------------------------------------------
1. ``delivery.domains.<d>.rate_limit`` (messages per **minute**) when set: rate
   = n / 60 per second.  Its burst is the ``domain_limits`` burst for the same
   domain if that is set, else one second's worth (below).  Rationale: it is the
   per-domain setting the operator wrote most specifically, and DESIGN §2 says it
   is enforced.
2. ``delivery.rate_limit.domain_limits.<d>``: its ``messages_per_second``; its
   ``burst_size``, or one second's worth when that is ``None``.
3. ``delivery.rate_limit`` itself: ``messages_per_second`` and ``burst_size``.

"One second's worth" is ``max(1, ceil(rate))`` tokens: a domain limit written
without a burst is not silently loosened by the (usually larger) global burst.
A rate of ``math.inf`` means unlimited.  Domain names are matched lower-cased;
callers pass lower-case domains (as stored in the spool).

:meth:`RateLimiter.reconfigure` (SIGHUP) keeps every bucket's current level,
capped at its new burst.  :meth:`RateLimiter.prune` drops full buckets (a full
bucket is indistinguishable from a new one), which bounds memory.

All time is monotonic, read from the injected clock; nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from empath.clock import Clock

_EPSILON: Final = 1e-9  # float slack so a token due "now" is not refused by rounding


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A bucket's parameters: refill rate and capacity."""

    messages_per_second: float
    burst_size: int

    def __post_init__(self) -> None:
        if not self.messages_per_second > 0:
            raise ValueError("messages_per_second must be positive (math.inf = unlimited)")
        if self.burst_size < 1:
            raise ValueError("burst_size must be at least 1")

    @property
    def unlimited(self) -> bool:
        return math.isinf(self.messages_per_second)


@dataclass(frozen=True, slots=True)
class Granted:
    """A token was spent: go ahead."""


@dataclass(frozen=True, slots=True)
class Wait:
    """No token: the next one is due at monotonic time ``until``.  Nothing was spent."""

    until: float


GRANTED: Final = Granted()

RateDecision = Granted | Wait


class DomainRateLimitLike(Protocol):
    """Shape of ``config.delivery.rate_limit.domain_limits[d]`` (DomainRateLimit)."""

    @property
    def messages_per_second(self) -> float: ...

    @property
    def burst_size(self) -> int | None: ...


def one_second_burst(messages_per_second: float) -> int:
    """Default burst for a domain limit without one: max(1, ceil(rate))."""
    if math.isinf(messages_per_second):
        return 1
    return max(1, math.ceil(messages_per_second))


def resolve_limits(
    domain_limits: Mapping[str, DomainRateLimitLike],
    per_minute: Mapping[str, int | None],
) -> dict[str, RateLimit]:
    """Per-domain overrides from the config, with the precedence in the module docstring.

    ``domain_limits`` is ``delivery.rate_limit.domain_limits``; ``per_minute`` maps
    domain -> ``delivery.domains.<d>.rate_limit`` (``None`` = not set).
    """
    out: dict[str, RateLimit] = {}
    bursts: dict[str, int | None] = {}
    for name, lim in domain_limits.items():
        d = name.lower()
        burst = lim.burst_size
        bursts[d] = burst
        out[d] = RateLimit(
            lim.messages_per_second,
            burst if burst is not None else one_second_burst(lim.messages_per_second),
        )
    for name, per_min in per_minute.items():
        if per_min is None:
            continue
        d = name.lower()
        rate = per_min / 60.0
        burst = bursts.get(d)
        out[d] = RateLimit(rate, burst if burst is not None else one_second_burst(rate))
    return out


class _Bucket:
    __slots__ = ("limit", "stamp", "tokens")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self.tokens = float(limit.burst_size)
        self.stamp = now

    def level(self, now: float) -> float:
        """Tokens available at ``now`` (refilled, capped); also moves the stamp."""
        lim = self.limit
        tokens = self.tokens
        if now > self.stamp:
            tokens = min(
                float(lim.burst_size), tokens + (now - self.stamp) * lim.messages_per_second
            )
            self.tokens = tokens
            self.stamp = now
        return tokens


class RateLimiter:
    """Token buckets for all domains (created lazily, full)."""

    __slots__ = ("_buckets", "_clock", "_default", "_deferred", "_overrides")

    def __init__(
        self,
        default: RateLimit,
        clock: Clock,
        overrides: Mapping[str, RateLimit] | None = None,
    ) -> None:
        self._default = default
        self._clock = clock
        self._overrides: dict[str, RateLimit] = {
            d.lower(): lim for d, lim in (overrides or {}).items()
        }
        self._buckets: dict[str, _Bucket] = {}
        self._deferred: dict[str, int] = {}

    def limit_for(self, domain: str) -> RateLimit:
        """The limit that applies to ``domain``."""
        return self._overrides.get(domain, self._default)

    def try_acquire(self, domain: str) -> RateDecision:
        """Spend one token for ``domain`` now, or say when the next one is due."""
        bucket = self._buckets.get(domain)
        now = self._clock.monotonic()
        if bucket is None:
            limit = self._overrides.get(domain, self._default)
            if limit.unlimited:
                return GRANTED
            bucket = self._buckets[domain] = _Bucket(limit, now)
        tokens = bucket.level(now)
        if tokens >= 1.0 - _EPSILON:
            bucket.tokens = max(0.0, tokens - 1.0)
            return GRANTED
        return Wait(now + (1.0 - tokens) / bucket.limit.messages_per_second)

    def note_deferred(self, domain: str, count: int = 1) -> None:
        """Count ``count`` units deferred for want of a token (a metric, nothing else)."""
        self._deferred[domain] = self._deferred.get(domain, 0) + count

    def deferred(self, domain: str) -> int:
        return self._deferred.get(domain, 0)

    def deferred_totals(self) -> dict[str, int]:
        """Deferrals per domain, for ``empath_delivery_rate_limited_total{domain}``."""
        return dict(self._deferred)

    def tokens(self, domain: str) -> float:
        """Tokens available now (the limit's burst for a domain without a bucket yet)."""
        bucket = self._buckets.get(domain)
        if bucket is None:
            limit = self.limit_for(domain)
            return math.inf if limit.unlimited else float(limit.burst_size)
        return bucket.level(self._clock.monotonic())

    def reconfigure(
        self, default: RateLimit, overrides: Mapping[str, RateLimit] | None = None
    ) -> None:
        """New limits (SIGHUP): buckets keep their level, capped at the new burst."""
        now = self._clock.monotonic()
        self._default = default
        self._overrides = {d.lower(): lim for d, lim in (overrides or {}).items()}
        for domain in list(self._buckets):
            bucket = self._buckets[domain]
            tokens = bucket.level(now)  # refill at the old rate up to now
            limit = self.limit_for(domain)
            if limit.unlimited:
                del self._buckets[domain]
                continue
            bucket.limit = limit
            bucket.tokens = min(tokens, float(limit.burst_size))
            bucket.stamp = now

    def prune(self) -> int:
        """Drop buckets that are full again; returns how many."""
        now = self._clock.monotonic()
        full = [
            d for d, b in self._buckets.items() if b.level(now) >= b.limit.burst_size - _EPSILON
        ]
        for d in full:
            del self._buckets[d]
        return len(full)

    def __len__(self) -> int:
        return len(self._buckets)
