"""Resolver pieces that need no network: nameserver parsing, error mapping, lookup stats."""

from __future__ import annotations

import asyncio
import math

import pytest

from empath.dns.resolver import (
    DnsFailure,
    DnsResolver,
    DnsSettings,
    LookupStats,
    QueryType,
    failure_error,
    normalize_name,
    parse_nameserver,
)
from empath.errors import (
    ConfigError,
    DnsNameNotFoundError,
    DnsTemporaryError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from empath.testing.fake_resolver import FakeResolver


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        (" 10.0.0.1:53 ", ("10.0.0.1", 53)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[2001:db8::1]", ("2001:db8::1", 53)),
    ],
)
def test_parse_nameserver_accepts_ip_with_optional_port(
    spec: str, expected: tuple[str, int]
) -> None:
    """dns.nameservers entries are "ip[:port]" with bracketed IPv6 for a port."""
    assert expected == parse_nameserver(spec)


@pytest.mark.parametrize(
    "spec", ["dns.example.com", "127.0.0.1:", "127.0.0.1:99999", "[::1", "[::1]53", ""]
)
def test_parse_nameserver_rejects_names_and_bad_ports(spec: str) -> None:
    """A nameserver must be an IP literal; errors name the config key."""
    with pytest.raises(ConfigError, match=r"delivery\.dns\.nameservers"):
        parse_nameserver(spec)


def test_resolver_rejects_bad_settings_and_reconfigure_keeps_the_old() -> None:
    """Invalid nameservers or timeout raise ConfigError; a failed reload changes nothing."""
    with pytest.raises(ConfigError):
        DnsResolver(DnsSettings(("resolver.example",), 5.0))
    with pytest.raises(ConfigError):
        DnsResolver(DnsSettings(("127.0.0.1",), 0))
    resolver = DnsResolver(DnsSettings(("127.0.0.1:5353",), 1.5))
    with pytest.raises(ConfigError):
        resolver.reconfigure(DnsSettings(("nope",), 3.0))
    assert (("127.0.0.1:5353",), 1.5) == (resolver.nameservers, resolver.timeout_s)
    resolver.reconfigure(DnsSettings(("127.0.0.2:53", "[::1]:5300"), 4.0))
    assert (("127.0.0.2:53", "[::1]:5300"), 4.0) == (resolver.nameservers, resolver.timeout_s)


def test_invalid_name_is_permanent_without_any_query() -> None:
    """A name with an empty label cannot exist: 5.1.2 and no round trip recorded."""
    resolver = DnsResolver(DnsSettings(("127.0.0.1:9",), 0.5))
    with pytest.raises(DnsNameNotFoundError) as info:
        asyncio.run(resolver.mx("bad..example"))
    assert "5.1.2" == info.value.enhanced
    stats = resolver.stats
    assert dict.fromkeys(QueryType, 0) == {qt: stats.snapshot(qt).count for qt in QueryType}


@pytest.mark.parametrize(
    ("failure", "cls", "enhanced"),
    [
        (DnsFailure.NXDOMAIN, PermanentDeliveryError, "5.1.2"),
        (DnsFailure.INVALID_NAME, PermanentDeliveryError, "5.1.2"),
        (DnsFailure.SERVFAIL, TemporaryDeliveryError, "4.4.3"),
        (DnsFailure.TIMEOUT, TemporaryDeliveryError, "4.4.3"),
        (DnsFailure.ERROR, TemporaryDeliveryError, "4.4.3"),
    ],
)
def test_failures_map_onto_the_error_tree(
    failure: DnsFailure, cls: type[Exception], enhanced: str
) -> None:
    """NXDOMAIN/invalid → permanent 5.1.2; SERVFAIL/timeout/other → temporary 4.4.3."""
    error = failure_error(failure, "x.test", QueryType.MX)
    assert isinstance(error, cls)
    assert isinstance(error, DnsNameNotFoundError | DnsTemporaryError)
    assert enhanced == error.enhanced
    assert "x.test" in error.text
    assert error.code is None


def test_normalize_name_lowercases_and_strips_the_root_dot() -> None:
    """Keys and comparisons use "example.com" for "Example.COM."."""
    assert "example.com" == normalize_name(" Example.COM. ")


def test_lookup_stats_histogram_is_cumulative_and_ends_with_inf() -> None:
    """observe() feeds a Prometheus-shaped histogram per query type, plus outcome counts."""
    stats = LookupStats(buckets_s=(0.01, 0.1, 1.0), recent=2)
    for d in (0.005, 0.01, 0.05, 2.0):
        stats.observe("MX", d)
    stats.observe("A", 0.2, "timeout")
    mx = stats.snapshot("MX")
    assert 4 == mx.count
    assert math.isclose(2.065, mx.sum_s)
    assert ((0.01, 2), (0.1, 3), (1.0, 3), (math.inf, 4)) == mx.buckets
    assert ((0.01, 0), (0.1, 0), (1.0, 1), (math.inf, 1)) == stats.snapshot("A").buckets
    assert (0, ((0.01, 0), (0.1, 0), (1.0, 0), (math.inf, 0))) == (
        stats.snapshot("AAAA").count,
        stats.snapshot("AAAA").buckets,
    )
    assert (0.05, 2.0) == stats.recent_s("MX")
    assert tuple(sorted(QueryType)) == stats.query_types()  # the known types from the start
    assert 4 == stats.outcomes[("MX", "ok")]
    assert 1 == stats.outcomes[("A", "timeout")]


def test_fake_resolver_counts_a_and_aaaa_and_records_stats() -> None:
    """The fake asks A and AAAA per address lookup, as the real one, and feeds the stats."""
    fake = FakeResolver()
    fake.add_host("h.test", "2001:db8::1", "192.0.2.1")
    answer = asyncio.run(fake.addresses("H.test."))
    assert ("192.0.2.1", "2001:db8::1") == answer.addresses
    assert (1, 1) == (fake.call_count("h.test", "A"), fake.call_count("h.test", "AAAA"))
    assert (1, 1, 0) == tuple(fake.stats.snapshot(t).count for t in ("A", "AAAA", "MX"))
