"""Bounded counters the delivery runner keeps, and the windows the metrics read them through.

Nothing here grows with traffic: the runner counts attempts into a dict keyed by
``(status, domain label, smtp code)`` — domain labels are capped by
:class:`DomainLabels`, SMTP codes are three digits — and observes queue ages into a
fixed-bucket :class:`Histogram`.  Rates "over the last ``rate_window_secs``" are
not kept as event lists either: :class:`Window` remembers a few samples of the
cumulative counters, taken when the metrics are read, and answers the difference
between now and the newest sample at least one window old (about one window; when
reads are rarer than the window, the span since the previous read).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

OTHER: Final = "other"

# Queue age buckets: 50 ms to one day (DESIGN §6).
QUEUE_AGE_BUCKETS_S: Final[tuple[float, ...]] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    43200.0,
    86400.0,
)


class DomainLabels:
    """The ``domain`` label of a metric: the first ``max_domains`` domains seen keep their
    name, every later one is ``other``.  A domain keeps its label for the process's
    life, so counter series never change label under Prometheus's feet."""

    __slots__ = ("_known", "max_domains")

    def __init__(self, max_domains: int) -> None:
        self.max_domains = max_domains
        self._known: set[str] = set()

    def __call__(self, domain: str) -> str:
        if domain in self._known:
            return domain
        if len(self._known) < self.max_domains:
            self._known.add(domain)
            return domain
        return OTHER

    def __len__(self) -> int:
        return len(self._known)

    def __iter__(self) -> Iterator[str]:
        return iter(self._known)

    def known(self) -> frozenset[str]:
        return frozenset(self._known)


@dataclass(frozen=True, slots=True)
class HistogramCounts:
    """Prometheus-shaped: cumulative ``(le, count)`` buckets ending with ``+Inf``."""

    count: int
    sum_s: float
    buckets: tuple[tuple[float, int], ...]


class Histogram:
    """Fixed buckets; O(log buckets) per observation.  (The modules' host, compiled,
    does what :meth:`observe` does itself, on ``_bounds`` and ``_counts`` in place.)"""

    __slots__ = ("_bounds", "_counts", "count", "sum")

    def __init__(self, bounds: tuple[float, ...] = QUEUE_AGE_BUCKETS_S) -> None:
        self._bounds = tuple(sorted(bounds))
        self._counts = [0] * (len(self._bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self.count += 1
        self.sum += value

    def snapshot(self) -> HistogramCounts:
        running = 0
        cumulative: list[tuple[float, int]] = []
        for bound, n in zip((*self._bounds, float("inf")), self._counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return HistogramCounts(self.count, self.sum, tuple(cumulative))


@dataclass(slots=True)
class RunnerStats:
    """What the delivery runner counts; the metrics collector is its one reader.

    ``attempts`` is ``empath_delivery_attempts_total{status, domain, smtp_code}``;
    the unit totals feed the success and error rates; ``queue_age`` is
    ``empath_delivery_queue_age_seconds``.
    """

    domains: DomainLabels  # capped at metrics.max_domain_cardinality
    attempts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    attempts_total: int = 0
    attempts_failed: int = 0  # temporary or permanent
    units_delivered: int = 0
    units_failed: int = 0  # failed permanently (5xx, gave up, expired)
    dsns: int = 0
    queue_age: Histogram = field(default_factory=Histogram)

    def count_attempt(self, delivered: bool, domain: str, smtp_code: str) -> None:
        """One unit attempt (its recipients' worst reply code, "" for network/DNS)."""
        key = ("delivered" if delivered else "failed", self.domains(domain), smtp_code)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        self.attempts_total += 1
        if delivered:
            self.units_delivered += 1
        else:
            self.attempts_failed += 1

    def count_permanent_failure(self) -> None:
        self.units_failed += 1


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    values: tuple[int, ...]


class Window:
    """Differences of cumulative counters over about ``window_s`` (see module doc).

    Time is cut into buckets of ``window_s / max_samples``; each bucket keeps one
    sample, its newest read, so at most ~``max_samples`` are kept however often the
    window is read.  A read in the same bucket as the newest sample replaces it; a read
    in a later bucket appends.  (Replacing whenever the newest sample was less than a
    bucket old -- the first design -- let a reader faster than one bucket move that
    sample forward for ever: no sample was ever appended, the base never moved, and the
    "windowed" rate froze at its lifetime value.)  The answer is the change since the
    newest sample at least one window old, so it does not depend on how often the
    window is read, only on which bucket the reads fall in.
    """

    __slots__ = ("_samples", "max_samples", "window_s")

    def __init__(self, window_s: float, start: float, width: int, max_samples: int = 120) -> None:
        self.window_s = window_s
        self.max_samples = max_samples
        self._samples: deque[_Sample] = deque([_Sample(start, (0,) * width)])

    def delta(self, now: float, values: tuple[int, ...]) -> tuple[int, ...]:
        samples = self._samples
        step = self.window_s / self.max_samples
        head = samples[-1]
        if len(samples) > 1 and now // step == head.at // step:
            samples[-1] = _Sample(now, values)  # same bucket: its newest read wins
        else:
            samples.append(_Sample(now, values))
        cutoff = now - self.window_s
        while len(samples) > 2 and samples[1].at <= cutoff:
            samples.popleft()
        base = samples[0].values
        return tuple(v - b for v, b in zip(values, base, strict=True))

    @property
    def base_at(self) -> float:
        """When the sample the last :meth:`delta` answered from was taken: the answer
        covers ``now - base_at`` (about ``window_s``, less while the window is young)."""
        return self._samples[0].at

    def __len__(self) -> int:
        return len(self._samples)


class RecentActivity:
    """Per-domain deliveries of the last minute and the last temporary error of each
    domain: what `queue summary` shows as throughput and `breaker list` as the last
    error.  Bounded: at most ``max_events`` deliveries and ``max_errors`` domains."""

    __slots__ = ("_deliveries", "_errors", "max_errors", "window_s")

    def __init__(
        self, window_s: float = 60.0, max_events: int = 1 << 16, max_errors: int = 4096
    ) -> None:
        self.window_s = window_s
        self.max_errors = max_errors
        self._deliveries: deque[tuple[float, str]] = deque(maxlen=max_events)
        self._errors: dict[str, str] = {}

    def delivered(self, mono: float, domain: str) -> None:
        self._deliveries.append((mono, domain))

    def failed(self, domain: str, error: str) -> None:
        errors = self._errors
        errors.pop(domain, None)
        errors[domain] = error
        if len(errors) > self.max_errors:
            del errors[next(iter(errors))]

    def last_error(self, domain: str) -> str:
        return self._errors.get(domain, "")

    def per_domain(self, mono: float) -> dict[str, int]:
        """Deliveries per domain within the window ending at ``mono``."""
        since = mono - self.window_s
        out: dict[str, int] = {}
        for at, domain in reversed(self._deliveries):
            if at < since:
                break
            out[domain] = out.get(domain, 0) + 1
        return out
