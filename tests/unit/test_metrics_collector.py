"""EmpathCollector over real policy state and fakes for the rest: domain labels capped to
`max_domain_cardinality` (the rest fold into `other`), breaker series per domain, the
text rendering that Prometheus's own parser reads back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from empath.dns.resolver import LookupStats
from empath.observability.metrics import (
    QUEUE_STATUSES,
    EmpathCollector,
    MetricsSettings,
    QueueSummary,
    summarise_queue,
)
from empath.policy.breaker import Admit, BreakerSettings
from empath.policy.ratelimit import RateLimit
from empath.policy.state import LocalPolicyState, PolicySettings
from empath.queue.index import UnitKey
from empath.spool.index import MessageIndex, MessageView
from empath.spool.model import Envelope, MessageState, RecipientState, UnitState, UnitStatus
from empath.spool.store import SpoolUsage
from empath.stats import DomainLabels, RunnerStats
from empath.testing.clock import FakeClock
from empath.transport.listener import ListenerStats


class EmptyQueue:
    index = MessageIndex()

    def views(self) -> list[MessageView]:
        return []

    def usage(self) -> SpoolUsage:
        return SpoolUsage(10, 100, 1)


class Cache:
    hits = 0
    misses = 0
    evictions = 0
    stale_served = 0


def collector(max_domains: int) -> tuple[EmpathCollector, RunnerStats, LocalPolicyState]:
    clock = FakeClock()
    stats = RunnerStats(DomainLabels(max_domains))
    policy = LocalPolicyState(
        clock, PolicySettings(BreakerSettings(1, 60.0, 300.0, 1), RateLimit(10.0, 20), {})
    )
    listener = ListenerStats()
    listener.connections_total = 3
    c = EmpathCollector(
        settings=MetricsSettings(max_domain_cardinality=max_domains, rate_window_secs=60.0),
        clock=clock,
        queue=EmptyQueue(),
        in_flight=set,
        runner=stats,
        policy=policy,
        listeners={'[::]:25 "main"': listener},
        dns_cache=Cache(),
        dns_lookups=LookupStats(),
    )
    return c, stats, policy


def scrape(c: EmpathCollector) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, _ = c.render()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }


def trip(policy: LocalPolicyState, domain: str) -> None:
    decision = policy.breaker_allow(domain)
    assert isinstance(decision, Admit)
    policy.breaker_failure(domain, decision.probe)


def test_domains_beyond_the_cap_fold_into_other() -> None:
    c, stats, policy = collector(2)
    for d in ("a.test", "b.test", "c.test", "d.test"):
        stats.count_attempt(False, d, "")
        trip(policy, d)
        policy.note_rate_limited(d, 2)
    s = scrape(c)
    domains = {dict(k).get("domain") for (n, k) in s if n.startswith("empath_delivery_")} - {None}
    assert {"a.test", "b.test", "other"} == domains
    other_failed = frozenset({("status", "failed"), ("domain", "other"), ("smtp_code", "")})
    assert 2.0 == s[("empath_delivery_attempts_total", other_failed)]
    assert (
        2.0 == s[("empath_delivery_circuit_breaker_trips_total", frozenset({("domain", "other")}))]
    )
    assert 4.0 == s[("empath_delivery_rate_limited_total", frozenset({("domain", "other")}))]
    assert 1.0 == s[("empath_delivery_circuit_breaker_state",
                     frozenset({("domain", "other"), ("state", "Open")}))]  # fmt: skip


def test_dns_lookup_histogram_has_a_zero_series_per_query_type_before_any_lookup() -> None:
    """The runbook's histogram_quantile over empath_dns_lookup_duration_seconds answers on
    a node that has not looked anything up yet (issue 14, "Also")."""
    c, _, _ = collector(10)
    s = scrape(c)
    for qt in ("MX", "A", "AAAA"):
        labels = frozenset({("query_type", qt)})
        assert 0.0 == s[("empath_dns_lookup_duration_seconds_count", labels)]
        assert 0.0 == s[("empath_dns_lookup_duration_seconds_bucket", labels | {("le", "+Inf")})]


def test_rendering_escapes_label_values_that_need_it_and_collect_agrees() -> None:
    c, _, _ = collector(10)
    s = scrape(c)
    assert 3.0 == s[("empath_smtp_connections_total", frozenset({("listener", '[::]:25 "main"')}))]
    via_registry = {m.name for m in c.collect()}
    assert {"empath_smtp_connections", "empath_delivery_queue_size"} <= via_registry


def _walked(
    messages: list[MessageState], in_flight: set[UnitKey], now: float, cap: int
) -> QueueSummary:
    """The summary by a full walk of the queue (what the scrape did before the index)."""
    live = {UnitStatus.PENDING, UnitStatus.RETRY, UnitStatus.IN_PROGRESS}
    counts = dict.fromkeys(UnitStatus, 0)
    oldest: float | None = None
    retries: list[tuple[str, int]] = []
    for msg in messages:
        tries = 0
        for unit in msg.units:
            counts[unit.status] += 1
            if unit.status in live:
                tries = max(tries, unit.attempts)
                if UnitKey(msg.id, unit.domain) in in_flight:
                    counts[unit.status] -= 1
                    counts[UnitStatus.IN_PROGRESS] += 1
        if any(not u.status.terminal and u.status is not UnitStatus.HELD for u in msg.units):
            at = msg.envelope.received_at  # held units do not wait: they do not age the queue
            oldest = at if oldest is None else min(oldest, at)
            if tries and len(retries) < cap:
                retries.append((msg.id, tries))
    sizes = {st: counts[st] for st in QUEUE_STATUSES}
    return QueueSummary(sizes, 0.0 if oldest is None else now - oldest, tuple(retries))


@given(
    st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(["a.test", "b.test", "c.test"]),
                st.sampled_from(list(UnitStatus)),
                st.integers(0, 3),
                st.booleans(),
            ),
            min_size=1,
            max_size=3,
        ),
        max_size=25,
    ),
    st.integers(0, 4),
)
def test_the_scrape_summary_from_the_index_equals_a_full_walk(
    shapes: list[list[tuple[str, UnitStatus, int, bool]]], cap: int
) -> None:
    index = MessageIndex()
    in_flight: set[UnitKey] = set()
    for i, units in enumerate(shapes):
        mid = f"m{i:03d}"
        by_domain = {d: (s, n, f) for d, s, n, f in units}
        index[mid] = MessageState(
            mid,
            Envelope("s@x.test", tuple(f"u@{d}" for d in by_domain), 1000.0 + (i * 7) % 11),
            tuple(
                UnitState(d, (RecipientState(f"u@{d}"),), status=s, attempts=n)
                for d, (s, n, _f) in by_domain.items()
            ),
        )
        in_flight |= {UnitKey(mid, d) for d, (_s, _n, f) in by_domain.items() if f}
    messages = list(index.values())
    got = summarise_queue(index, iter(messages), in_flight, 2000.0, cap)
    assert _walked(messages, in_flight, 2000.0, cap) == got
