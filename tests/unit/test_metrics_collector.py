"""EmpathCollector over real policy state and fakes for the rest: domain labels capped to
`max_domain_cardinality` (the rest fold into `other`), breaker series per domain, the
text rendering that Prometheus's own parser reads back."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families

from empath.dns.resolver import LookupStats
from empath.observability.metrics import EmpathCollector, MetricsSettings
from empath.observability.stats import DomainLabels, RunnerStats
from empath.policy.breaker import Admit, BreakerSettings
from empath.policy.ratelimit import RateLimit
from empath.policy.state import LocalPolicyState, PolicySettings
from empath.spool.model import MessageState
from empath.spool.store import SpoolUsage
from empath.testing.clock import FakeClock
from empath.transport.listener import ListenerStats


class EmptyQueue:
    def messages(self) -> Iterator[MessageState]:
        return iter(())

    def usage(self) -> SpoolUsage:
        return SpoolUsage(10, 100, 1)


class Cache:
    hits = 0
    misses = 0
    evictions = 0


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


def test_rendering_escapes_label_values_that_need_it_and_collect_agrees() -> None:
    c, _, _ = collector(10)
    s = scrape(c)
    assert 3.0 == s[("empath_smtp_connections_total", frozenset({("listener", '[::]:25 "main"')}))]
    via_registry = {m.name for m in c.collect()}
    assert {"empath_smtp_connections", "empath_delivery_queue_size"} <= via_registry
