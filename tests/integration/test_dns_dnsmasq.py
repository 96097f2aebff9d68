"""Routing against a real dnsmasq: every record class, plus a silent and a SERVFAIL server."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from empath.clock import SystemClock
from empath.dns.mx import MxRouter, RoutingSettings, Target, build_router
from empath.dns.resolver import DnsResolver, DnsSettings
from empath.errors import (
    DnsNameNotFoundError,
    DnsTemporaryError,
    NullMxError,
    PermanentDeliveryError,
)
from empath.testing.settings import cache_limits
from tests.dnsmasq import (
    NXDOMAIN_NAME,
    STANDARD,
    DnsmasqServer,
    DnsRecords,
    blackhole_nameserver,
    dnsmasq,
    dnsmasq_factory,
    servfail_nameserver,
)

__all__ = ["dnsmasq_factory"]  # re-exported fixture

T = TypeVar("T")


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsmasqServer]:
    with dnsmasq(STANDARD) as server:
        yield server


def router_for(
    nameservers: list[str], *, timeout_s: float = 2.0, mx_port: int = 2525, seed: int = 3
) -> MxRouter:
    return build_router(
        DnsResolver(DnsSettings(tuple(nameservers), timeout_s)),
        RoutingSettings(cache_limits(), {}),
        clock=SystemClock(),
        rng=random.Random(seed),
        mx_port=mx_port,
    )


async def test_two_mx_domain_routes_by_preference(dns_server: DnsmasqServer) -> None:
    """two.test: mx1 (pref 10, 127.0.0.2) before mx2 (pref 20, 127.0.0.3), on mx_port."""
    route = await router_for([dns_server.nameserver]).route("two.test")
    assert (
        Target("mx1.two.test", 2525, ("127.0.0.2",), 10),
        Target("mx2.two.test", 2525, ("127.0.0.3",), 20),
    ) == route


async def test_resolver_returns_records_with_their_ttls(dns_server: DnsmasqServer) -> None:
    """MX records and A+AAAA addresses come back with dnsmasq's --local-ttl."""
    resolver = DnsResolver(DnsSettings((dns_server.nameserver,), 2.0))

    async def ask() -> tuple[Any, Any]:
        return await resolver.mx("two.test"), await resolver.addresses("dual.test")

    mx, addresses = await ask()
    assert [(10, "mx1.two.test"), (20, "mx2.two.test")] == sorted(
        (r.preference, r.exchange) for r in mx.records
    )
    assert float(STANDARD.ttl_s) == mx.ttl_s
    assert (("127.0.0.7", "::1"), float(STANDARD.ttl_s)) == (addresses.addresses, addresses.ttl_s)
    assert (1, 1, 1) == tuple(resolver.stats.snapshot(t).count for t in ("MX", "A", "AAAA"))


async def test_equal_preferences_come_in_both_orders(dns_server: DnsmasqServer) -> None:
    """equal.test's two pref-10 hosts are randomized across routes (one DNS lookup)."""
    router = router_for([dns_server.nameserver])

    async def many() -> set[tuple[str, ...]]:
        return {tuple(t.host for t in await router.route("equal.test")) for _ in range(50)}

    assert {("a.equal.test", "b.equal.test"), ("b.equal.test", "a.equal.test")} == await many()
    assert (49, 1) == (router.cache.hits, router.cache.misses)


async def test_a_only_domain_uses_implicit_mx(dns_server: DnsmasqServer) -> None:
    """aonly.test has no MX: the route is the domain itself on mx_port."""
    route = await router_for([dns_server.nameserver]).route("aonly.test")
    assert (Target("aonly.test", 2525, ("127.0.0.6",), 0),) == route


async def test_null_mx_domain_fails_permanently_5_1_10(dns_server: DnsmasqServer) -> None:
    """nullmx.test publishes MX 0 . → permanent 5.1.10."""
    with pytest.raises(NullMxError) as info:
        await router_for([dns_server.nameserver]).route("nullmx.test")
    assert "5.1.10" == info.value.enhanced


async def test_nxdomain_fails_permanently_5_1_2(dns_server: DnsmasqServer) -> None:
    """A name dnsmasq answers NXDOMAIN for → permanent 5.1.2."""
    with pytest.raises(DnsNameNotFoundError) as info:
        await router_for([dns_server.nameserver]).route(NXDOMAIN_NAME)
    assert "5.1.2" == info.value.enhanced


async def test_domain_without_mx_or_address_fails_permanently_5_4_4(
    dns_server: DnsmasqServer,
) -> None:
    """nomx-noaddr.test exists but has nothing to route to."""
    with pytest.raises(PermanentDeliveryError) as info:
        await router_for([dns_server.nameserver]).route("nomx-noaddr.test")
    assert "5.4.4" == info.value.enhanced


async def test_mx_host_with_nxdomain_is_skipped(dns_server: DnsmasqServer) -> None:
    """halfbroken.test: ghost.test does not resolve, so only mx2.two.test remains."""
    route = await router_for([dns_server.nameserver]).route("halfbroken.test")
    assert ["mx2.two.test"] == [t.host for t in route]


async def test_silent_nameserver_is_temporary_within_the_timeout() -> None:
    """A resolver that never answers gives a temporary 4.4.3 after ~timeout_s, not later."""
    with blackhole_nameserver() as silent:
        router = router_for([silent], timeout_s=0.6)
        started = time.monotonic()
        with pytest.raises(DnsTemporaryError) as info:
            await router.route("two.test")
        elapsed = time.monotonic() - started
    assert "4.4.3" == info.value.enhanced
    assert "timed out" in info.value.text
    assert 0.5 <= elapsed < 1.5
    assert 0 == len(router.cache), "temporary failures are not cached"


async def test_servfail_is_temporary() -> None:
    """A server answering SERVFAIL gives a temporary 4.4.3 at once."""
    with servfail_nameserver() as broken:
        router = router_for([broken], timeout_s=2.0)
        started = time.monotonic()
        with pytest.raises(DnsTemporaryError) as info:
            await router.route("two.test")
    assert "4.4.3" == info.value.enhanced
    assert "SERVFAIL" in info.value.text
    assert time.monotonic() - started < 1.0


async def test_dead_first_nameserver_falls_through_to_the_second(dns_server: DnsmasqServer) -> None:
    """With [silent, dnsmasq] each lookup still succeeds inside timeout_s.

    Each try gets timeout_s / 2 per server, so the MX stage and the address
    stage each wait ~1 s on the silent server before dnsmasq answers.
    """
    with blackhole_nameserver() as silent:
        router = router_for([silent, dns_server.nameserver], timeout_s=2.0)
        started = time.monotonic()
        route = await router.route("two.test")
    assert ["mx1.two.test", "mx2.two.test"] == [t.host for t in route]
    assert time.monotonic() - started < 2 * 2.0


async def test_cached_route_asks_dnsmasq_nothing_until_refresh(dns_server: DnsmasqServer) -> None:
    """A second route is a cache hit (no round trip); refresh() asks again."""
    router = router_for([dns_server.nameserver])
    resolver = router.resolver
    assert isinstance(resolver, DnsResolver)

    async def scenario() -> None:
        await router.route("two.test")
        await router.route("two.test")
        assert 1 == resolver.stats.snapshot("MX").count
        await router.cache.refresh("two.test")

    await scenario()
    assert 2 == resolver.stats.snapshot("MX").count
    assert [("two.test", False)] == [(e.name, e.negative) for e in router.cache.entries()]


async def test_factory_serves_custom_records_and_ttl(
    dnsmasq_factory: Callable[[DnsRecords], DnsmasqServer],
) -> None:
    """dnsmasq_factory starts a server for a test's own records (used by delivery tests)."""
    server = dnsmasq_factory(
        DnsRecords(
            mx={"custom.test": [(5, "in.custom.test")]},
            hosts={"in.custom.test": ["127.0.0.9"]},
            ttl_s=30,
        )
    )
    resolver = DnsResolver(DnsSettings((server.nameserver,), 2.0))
    mx = await resolver.mx("custom.test")
    assert (30.0, "in.custom.test") == (mx.ttl_s, mx.records[0].exchange)
    assert "query[MX] custom.test" in server.log()
