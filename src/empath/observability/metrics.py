"""Prometheus metrics (SPEC §6): one collector that reads what the components already count.

Theory of operation
-------------------
No component updates a Prometheus object.  The listeners, the delivery runner, the
policy state (breakers, rate limiter), the DNS cache and resolver and the spool
each keep their own plain counters; :class:`EmpathCollector` reads them when
``/metrics`` is scraped (or when the OTLP exporter takes a snapshot) and turns
them into metric families:

* counters and histograms are the components' cumulative counts, as they are;
* queue sizes by status, the oldest unit's age and the per-message retry counts
  come from one pass over the spool's in-memory index at scrape time (units in
  flight are ``in_progress``; on disk they are still pending or retry);
* success, error and SMTP connection-error rates are differences of cumulative
  counters over about ``rate_window_secs`` (:class:`~empath.observability.stats.Window`);
* every ``domain`` label goes through one :class:`DomainLabels` (the runner's), so
  at most ``max_domain_cardinality`` domains appear and the rest are ``other``.

The registry is built by the composition root (``app.py``) and passed to the HTTP
server; more collectors (cluster state) join with :meth:`EmpathCollector.add_source`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from empath.clock import Clock
from empath.dns.resolver import LookupStats
from empath.observability.stats import OTHER, HistogramCounts, RunnerStats, Window
from empath.policy.breaker import BreakerState
from empath.policy.state import PolicySnapshot
from empath.queue.index import UnitKey
from empath.spool.model import MessageState, UnitStatus
from empath.spool.store import SpoolUsage
from empath.transport.listener import ListenerStats

QUEUE_STATUSES = (
    UnitStatus.PENDING,
    UnitStatus.IN_PROGRESS,
    UnitStatus.RETRY,
    UnitStatus.FAILED,
    UnitStatus.EXPIRED,
)
# Which state wins when several domains fold into "other" (the one needing attention).
_STATE_RANK = {BreakerState.OPEN: 2, BreakerState.HALF_OPEN: 1, BreakerState.CLOSED: 0}


class QueueSource(Protocol):
    def messages(self) -> Iterator[MessageState]: ...

    def usage(self) -> SpoolUsage: ...


class PolicySource(Protocol):
    def snapshot(self) -> PolicySnapshot: ...


class DnsCacheCounters(Protocol):
    hits: int
    misses: int
    evictions: int


class MetricsSource(Protocol):
    """Anything that yields metric families at scrape time (e.g. cluster state)."""

    def collect(self) -> Iterable[Metric]: ...


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    max_domain_cardinality: int = 1000
    rate_window_secs: float = 300.0


@dataclass(frozen=True, slots=True)
class QueueSummary:
    """One pass over the spool index."""

    sizes: Mapping[UnitStatus, int]
    oldest_s: float
    retry_counts: tuple[tuple[str, int], ...]  # (message id, attempts), capped


def summarise_queue(
    messages: Iterable[MessageState],
    in_flight: Collection[UnitKey],
    now: float,
    max_retry_series: int,
) -> QueueSummary:
    """Units by status, the oldest non-terminal unit's age, and retry counts (oldest first)."""
    sizes = dict.fromkeys(QUEUE_STATUSES, 0)
    oldest: float | None = None
    retries: list[tuple[str, int]] = []
    delivered = UnitStatus.DELIVERED
    for msg in messages:
        live = False
        tries = 0
        for unit in msg.units:
            status = unit.status
            if status is delivered:
                continue  # delivered units are not queued
            if not status.terminal:
                live = True
                tries = max(tries, unit.attempts)
                if in_flight and UnitKey(msg.id, unit.domain) in in_flight:
                    status = UnitStatus.IN_PROGRESS
            sizes[status] += 1
        if live:
            received = msg.envelope.received_at
            if oldest is None or received < oldest:
                oldest = received
            if tries and len(retries) < max_retry_series:
                retries.append((msg.id, tries))
    return QueueSummary(sizes, 0.0 if oldest is None else max(0.0, now - oldest), tuple(retries))


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``+Inf``, ``0.05``, ``60.0``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def histogram_family(
    name: str,
    documentation: str,
    counts: Iterable[tuple[tuple[str, ...], HistogramCounts]],
    labels: tuple[str, ...] = (),
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    for label_values, h in counts:
        family.add_metric(
            list(label_values),
            [(_le(le), float(n)) for le, n in h.buckets],
            h.sum_s,
        )
    return family


class EmpathCollector:
    """The custom collector behind ``/metrics``; see the module docstring."""

    def __init__(
        self,
        *,
        settings: MetricsSettings,
        clock: Clock,
        queue: QueueSource,
        in_flight: Callable[[], Collection[UnitKey]],
        runner: RunnerStats,
        policy: PolicySource,
        listeners: Mapping[str, ListenerStats],
        dns_cache: DnsCacheCounters,
        dns_lookups: LookupStats,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._queue = queue
        self._in_flight = in_flight
        self._runner = runner
        self._policy = policy
        self._listeners = listeners
        self._dns_cache = dns_cache
        self._dns_lookups = dns_lookups
        start = clock.monotonic()
        self._delivery_window = Window(settings.rate_window_secs, start, 4)
        self._smtp_window = Window(settings.rate_window_secs, start, 2)
        self._sources: list[MetricsSource] = []

    def add_source(self, source: MetricsSource) -> None:
        """More metric families at each scrape (e.g. the cluster's)."""
        self._sources.append(source)

    def describe(self) -> Iterable[Metric]:
        return ()  # no collect at registration time; names are unique by construction

    def collect(self) -> Iterator[Metric]:
        yield from self._delivery()
        yield from self._queue_families()
        yield from self._policy_families()
        yield from self._smtp()
        yield from self._dns()
        yield from self._spool()
        for source in self._sources:
            yield from source.collect()

    # -- delivery -------------------------------------------------------------

    def _delivery(self) -> Iterator[Metric]:
        r = self._runner
        delivered, failed, attempts_failed, attempts = self._delivery_window.delta(
            self._clock.monotonic(),
            (r.units_delivered, r.units_failed, r.attempts_failed, r.attempts_total),
        )
        yield GaugeMetricFamily(
            "empath_delivery_success_rate",
            "Delivered / (delivered + permanently failed) units over the rate window; 1 when none.",
            value=delivered / (delivered + failed) if delivered + failed else 1.0,
        )
        yield GaugeMetricFamily(
            "empath_delivery_error_rate",
            "Failed attempts (temporary or permanent) / all attempts over the rate window.",
            value=attempts_failed / attempts if attempts else 0.0,
        )
        family = CounterMetricFamily(
            "empath_delivery_attempts",
            "Delivery attempts, one per (message, domain) unit attempt.",
            labels=["status", "domain", "smtp_code"],
        )
        for (status, domain, code), n in list(r.attempts.items()):
            family.add_metric([status, domain, code], n)
        yield family
        yield histogram_family(
            "empath_delivery_queue_age_seconds",
            "Seconds from acceptance to each delivery attempt.",
            [((), r.queue_age.snapshot())],
        )

    def _queue_families(self) -> Iterator[Metric]:
        summary = summarise_queue(
            self._queue.messages(),
            self._in_flight(),
            self._clock.now(),
            self.settings.max_domain_cardinality,
        )
        sizes = GaugeMetricFamily(
            "empath_delivery_queue_size", "Delivery units by status.", labels=["status"]
        )
        for status in QUEUE_STATUSES:
            sizes.add_metric([status.value], summary.sizes[status])
        yield sizes
        yield GaugeMetricFamily(
            "empath_delivery_queue_oldest_seconds",
            "Age of the oldest non-terminal unit (0 when none).",
            value=summary.oldest_s,
        )
        # SPEC §6 names the series empath_delivery_retry_count (a gauge); `promtool check
        # metrics` refuses a `_count` suffix on anything but a histogram or summary, so
        # the family is a summary named empath_delivery_retry with only its _count
        # sample: the series name, label and values are the spec's.
        retry = Metric(
            "empath_delivery_retry",
            "Attempts so far (the _count) of queued messages with at least one failed attempt.",
            "summary",
        )
        for mid, n in summary.retry_counts:
            retry.add_sample("empath_delivery_retry_count", {"message_id": mid}, n)
        yield retry

    def _policy_families(self) -> Iterator[Metric]:
        snap = self._policy.snapshot()
        labels = self._runner.domains
        states: dict[str, BreakerState] = {}
        trips: dict[str, int] = {}
        for domain, info in snap.breakers.items():
            label = labels(domain)
            old = states.get(label)
            if old is None or _STATE_RANK[info.state] > _STATE_RANK[old]:
                states[label] = info.state
            trips[label] = trips.get(label, 0) + info.trips_total
        state = GaugeMetricFamily(
            "empath_delivery_circuit_breaker_state",
            "Circuit breaker state per domain: 0 Closed, 1 Open, 2 HalfOpen.",
            labels=["domain", "state"],
        )
        for domain, st in sorted(states.items()):
            state.add_metric([domain, st.value], st.gauge_value)
        yield state
        trip_family = CounterMetricFamily(
            "empath_delivery_circuit_breaker_trips",
            "Circuit breaker transitions into Open.",
            labels=["domain"],
        )
        # Every domain that was attempted has a series (0 before its first trip), so
        # increase() sees the first trip too.
        for domain in labels.known():
            trips.setdefault(domain, 0)
        if OTHER in states:
            trips.setdefault(OTHER, 0)
        for domain, n in sorted(trips.items()):
            trip_family.add_metric([domain], n)
        yield trip_family
        limited: dict[str, int] = {}
        for domain, n in snap.rate_limited_total.items():
            label = labels(domain)
            limited[label] = limited.get(label, 0) + n
        rl = CounterMetricFamily(
            "empath_delivery_rate_limited",
            "Deliveries deferred for want of a rate-limit token.",
            labels=["domain"],
        )
        for domain, n in sorted(limited.items()):
            rl.add_metric([domain], n)
        yield rl

    # -- SMTP, DNS, spool -------------------------------------------------------

    def _smtp(self) -> Iterator[Metric]:
        listeners = list(self._listeners.items())
        total = CounterMetricFamily(
            "empath_smtp_connections", "Accepted SMTP connections.", labels=["listener"]
        )
        active = GaugeMetricFamily(
            "empath_smtp_connections_active", "Open SMTP sessions.", labels=["listener"]
        )
        received = CounterMetricFamily(
            "empath_smtp_messages_received",
            "Messages committed to the spool.",
            labels=["listener"],
        )
        errored = sessions = 0
        for label, st in listeners:
            total.add_metric([label], st.connections_total)
            active.add_metric([label], st.connections_active)
            received.add_metric([label], st.messages_received)
            errored += st.sessions_errored
            sessions += st.sessions_total
        yield total
        yield active
        yield received
        d_err, d_all = self._smtp_window.delta(self._clock.monotonic(), (errored, sessions))
        yield GaugeMetricFamily(
            "empath_smtp_connection_error_rate",
            "Sessions ended by error or timeout / all sessions over the rate window.",
            value=d_err / d_all if d_all else 0.0,
        )

    def _dns(self) -> Iterator[Metric]:
        c = self._dns_cache
        yield CounterMetricFamily("empath_dns_cache_hits", "MX cache hits.", value=c.hits)
        yield CounterMetricFamily("empath_dns_cache_misses", "MX cache misses.", value=c.misses)
        yield CounterMetricFamily(
            "empath_dns_cache_evictions", "MX cache LRU evictions.", value=c.evictions
        )
        lookups = self._dns_lookups
        snaps = []
        for qt in lookups.query_types():
            s = lookups.snapshot(qt)
            snaps.append(((qt,), HistogramCounts(s.count, s.sum_s, s.buckets)))
        yield histogram_family(
            "empath_dns_lookup_duration_seconds",
            "DNS resolver round trips.",
            snaps,
            labels=("query_type",),
        )

    def _spool(self) -> Iterator[Metric]:
        usage = self._queue.usage()
        yield GaugeMetricFamily(
            "empath_spool_free_bytes",
            "Free bytes on the spool's filesystem (for an unprivileged user).",
            value=usage.free_bytes,
        )
        yield GaugeMetricFamily(
            "empath_spool_size_bytes",
            "Size of the spool's filesystem in bytes.",
            value=usage.total_bytes,
        )


def build_registry(collector: EmpathCollector) -> CollectorRegistry:
    """A dedicated registry (no process/platform collectors, no module globals)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def renderer(registry: CollectorRegistry) -> Callable[[], tuple[bytes, str]]:
    """The ``/metrics`` body: Prometheus text format 0.0.4."""

    def render() -> tuple[bytes, str]:
        return generate_latest(registry), CONTENT_TYPE_LATEST

    return render
