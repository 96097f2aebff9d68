"""MxRouter with a scripted resolver: ordering, implicit/null MX, error classes, overrides."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.dns.mx import (
    MxRouter,
    OwnListeners,
    RoutingSettings,
    Target,
    build_router,
    is_local_address,
    parse_override,
)
from empath.dns.resolver import DnsFailure, QueryType
from empath.errors import (
    DnsNameNotFoundError,
    DnsTemporaryError,
    NullMxError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from empath.testing.clock import FakeClock
from empath.testing.fake_resolver import FakeResolver
from empath.testing.settings import cache_limits

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_router(
    fake: FakeResolver,
    *,
    clock: FakeClock | None = None,
    seed: int = 1,
    overrides: Callable[[str], str | None] = lambda _d: None,
    mx_port: int = 25,
    own: OwnListeners | None = None,
) -> MxRouter:
    router = build_router(
        fake,
        RoutingSettings(cache_limits(min_cache_ttl_secs=60, max_cache_ttl_secs=3600), {}),
        clock=clock or FakeClock(),
        rng=random.Random(seed),
        mx_port=mx_port,
        own=own,
    )
    router.set_overrides(overrides)
    return router


def two_mx() -> FakeResolver:
    fake = FakeResolver()
    fake.add_mx("two.test", (20, "mx2.two.test"), (10, "mx1.two.test"))
    fake.add_host("mx1.two.test", "192.0.2.1", "2001:db8::1")
    fake.add_host("mx2.two.test", "192.0.2.2")
    return fake


async def test_mx_hosts_are_ordered_by_preference_with_their_addresses() -> None:
    """Lower preference first; each target carries its A then AAAA addresses and port 25."""
    router = make_router(two_mx())
    route = await router.route("two.test")
    assert (
        Target("mx1.two.test", 25, ("192.0.2.1", "2001:db8::1"), 10),
        Target("mx2.two.test", 25, ("192.0.2.2",), 20),
    ) == route


async def test_mx_port_is_configurable() -> None:
    """Targets from MX records use the router's mx_port (tests run peers on high ports)."""
    router = make_router(two_mx(), mx_port=2525)
    assert [2525, 2525] == [t.port for t in await router.route("two.test")]


async def test_domain_is_case_insensitive_and_trailing_dot_is_ignored() -> None:
    """TWO.test. routes like two.test and shares its cache entry."""
    fake = two_mx()
    router = make_router(fake)

    async def both() -> tuple[Any, Any]:
        return await router.route("TWO.test."), await router.route("two.test")

    first, second = await both()
    assert first == second
    assert 1 == fake.call_count("two.test", QueryType.MX)


async def test_equal_preferences_are_shuffled_on_every_call_even_from_cache() -> None:
    """RFC 5321 §5.1: equal-preference MX hosts are randomized per route, not per cache fill."""
    fake = FakeResolver()
    fake.add_mx(
        "eq.test", (10, "a.eq.test"), (10, "b.eq.test"), (10, "c.eq.test"), (5, "p.eq.test")
    )
    for h, ip in [("a", "1"), ("b", "2"), ("c", "3"), ("p", "9")]:
        fake.add_host(f"{h}.eq.test", f"192.0.2.{ip}")
    router = make_router(fake, seed=7)

    async def many() -> list[tuple[str, ...]]:
        return [tuple(t.host for t in await router.route("eq.test")) for _ in range(200)]

    orders = await many()
    assert {"p.eq.test"} == {o[0] for o in orders}, "the lone best preference always leads"
    assert 6 == len(set(orders)), "all 3! orders of the equal group appear"
    assert 1 == fake.call_count("eq.test", QueryType.MX)


async def test_no_mx_uses_implicit_mx_from_the_domains_addresses() -> None:
    """RFC 5321 §5.1 implicit MX: the domain itself, preference 0, its A/AAAA addresses."""
    fake = FakeResolver()
    fake.add_host("aonly.test", "2001:db8::6", "192.0.2.6")
    route = await make_router(fake).route("aonly.test")
    assert (Target("aonly.test", 25, ("192.0.2.6", "2001:db8::6"), 0),) == route


async def test_no_mx_and_no_address_is_permanent_5_4_4() -> None:
    """A domain that exists but has neither MX nor A/AAAA cannot be routed."""
    fake = FakeResolver()
    fake.add_name("empty.test")
    with pytest.raises(PermanentDeliveryError) as info:
        await make_router(fake).route("empty.test")
    assert "5.4.4" == info.value.enhanced


async def test_null_mx_is_permanent_5_1_10_and_cached_negatively() -> None:
    """RFC 7505 null MX fails permanently with 5.1.10; the second route asks DNS nothing."""
    fake = FakeResolver()
    fake.add_null_mx("nullmx.test")
    router = make_router(fake)

    async def twice() -> list[BaseException]:
        errors: list[BaseException] = []
        for _ in range(2):
            try:
                await router.route("nullmx.test")
            except PermanentDeliveryError as exc:
                errors.append(exc)
        return errors

    errors = await twice()
    assert 2 == len(errors)
    assert all(isinstance(e, NullMxError) for e in errors)
    assert ["5.1.10", "5.1.10"] == [getattr(e, "enhanced", "") for e in errors]
    assert errors[0] is not errors[1], "each raise is a fresh exception"
    assert 1 == fake.call_count("nullmx.test")


async def test_null_mx_mixed_with_real_exchangers_is_ignored() -> None:
    """A '.' beside real MX records is a misconfiguration: skip it, use the others."""
    fake = FakeResolver()
    fake.add_mx("mixed.test", (0, "."), (10, "mx.mixed.test"))
    fake.add_host("mx.mixed.test", "192.0.2.10")
    assert ["mx.mixed.test"] == [t.host for t in await make_router(fake).route("mixed.test")]


async def test_nxdomain_is_permanent_5_1_2() -> None:
    """A domain that does not exist fails permanently with 5.1.2."""
    with pytest.raises(DnsNameNotFoundError) as info:
        await make_router(FakeResolver()).route("missing.test")
    assert isinstance(info.value, PermanentDeliveryError)
    assert "5.1.2" == info.value.enhanced


async def test_invalid_domain_name_is_permanent_5_1_2() -> None:
    """The real resolver maps invalid names to 5.1.2; so does the router through it."""
    fake = FakeResolver()
    fake.fail("bad..test", DnsFailure.INVALID_NAME)
    with pytest.raises(PermanentDeliveryError) as info:
        await make_router(fake).route("bad..test")
    assert "5.1.2" == info.value.enhanced


@pytest.mark.parametrize("failure", [DnsFailure.SERVFAIL, DnsFailure.TIMEOUT, DnsFailure.ERROR])
async def test_servfail_and_timeout_are_temporary_4_4_3_and_not_cached(failure: DnsFailure) -> None:
    """Temporary DNS failures defer (4.4.3) and the next route asks DNS again."""
    fake = two_mx()
    fake.fail("two.test", failure, QueryType.MX)
    router = make_router(fake)

    async def scenario() -> tuple[str, Any]:
        with pytest.raises(DnsTemporaryError) as info:
            await router.route("two.test")
        fake.heal("two.test")
        return info.value.enhanced, await router.route("two.test")

    enhanced, route = await scenario()
    assert "4.4.3" == enhanced
    assert ["mx1.two.test", "mx2.two.test"] == [t.host for t in route]
    assert 2 == fake.call_count("two.test", QueryType.MX)


async def test_mx_host_that_does_not_resolve_is_skipped() -> None:
    """An MX host with NXDOMAIN or no addresses is left out; the rest still route."""
    fake = FakeResolver()
    fake.add_mx(
        "half.test", (10, "ghost.half.test"), (20, "noaddr.half.test"), (30, "ok.half.test")
    )
    fake.add_name("noaddr.half.test")
    fake.add_host("ok.half.test", "192.0.2.30")
    assert ["ok.half.test"] == [t.host for t in await make_router(fake).route("half.test")]


async def test_all_mx_hosts_failing_is_temporary() -> None:
    """MX records present but none usable: temporary 4.4.3, not a bounce."""
    fake = FakeResolver()
    fake.add_mx("dead.test", (10, "a.dead.test"), (20, "b.dead.test"))
    fake.fail("b.dead.test", DnsFailure.TIMEOUT)
    with pytest.raises(TemporaryDeliveryError) as info:
        await make_router(fake).route("dead.test")
    assert "4.4.3" == info.value.enhanced
    assert "a.dead.test" in info.value.text


async def test_mx_host_with_one_family_failing_keeps_the_other() -> None:
    """AAAA timing out does not lose the A addresses."""
    fake = two_mx()
    fake.fail("mx1.two.test", DnsFailure.TIMEOUT, QueryType.AAAA)
    route = await make_router(fake).route("two.test")
    assert ("192.0.2.1",) == route[0].addresses


async def test_ip_literal_exchange_is_used_without_lookup() -> None:
    """An MX exchange written as an address is taken literally."""
    fake = FakeResolver()
    fake.add_mx("lit.test", (10, "192.0.2.50"))
    route = await make_router(fake).route("lit.test")
    assert (Target("192.0.2.50", 25, ("192.0.2.50",), 10),) == route
    assert 0 == fake.call_count("192.0.2.50")


async def test_duplicate_exchange_is_tried_once_at_its_best_preference() -> None:
    """The same host under two preferences appears once, at the lower preference."""
    fake = FakeResolver()
    fake.add_mx("dup.test", (20, "mx.dup.test"), (10, "mx.dup.test"))
    fake.add_host("mx.dup.test", "192.0.2.7")
    route = await make_router(fake).route("dup.test")
    assert [("mx.dup.test", 10)] == [(t.host, t.preference) for t in route]


async def test_override_ip_literal_needs_no_lookup() -> None:
    """mx_override "127.0.0.1:2526" is the whole route and costs no DNS query."""
    fake = FakeResolver()
    router = make_router(fake, overrides={"example.com": "127.0.0.1:2526"}.get)
    route = await router.route("example.com")
    assert (Target("127.0.0.1", 2526, ("127.0.0.1",)),) == route
    assert 0 == sum(fake.calls.values())


async def test_override_host_name_is_resolved_and_cached_default_port_25() -> None:
    """mx_override "relay.test" resolves the host once and defaults to port 25."""
    fake = FakeResolver()
    fake.add_host("relay.test", "192.0.2.99")
    router = make_router(fake, overrides={"example.com": "relay.test"}.get, mx_port=2525)

    async def twice() -> tuple[Any, Any]:
        return await router.route("example.com"), await router.route("example.com")

    first, second = await twice()
    assert (Target("relay.test", 25, ("192.0.2.99",)),) == first == second
    assert 1 == fake.call_count("relay.test", QueryType.A)
    assert 0 == fake.call_count("example.com")


async def test_override_host_not_found_is_temporary() -> None:
    """An override is configuration: a broken one defers mail, never bounces it."""
    router = make_router(FakeResolver(), overrides={"example.com": "nowhere.test:25"}.get)
    with pytest.raises(TemporaryDeliveryError) as info:
        await router.route("example.com")
    assert "nowhere.test" == info.value.mx


async def test_invalid_override_is_temporary() -> None:
    """A malformed override defers with 4.3.5 (configuration error)."""
    router = make_router(FakeResolver(), overrides={"example.com": "host:notaport"}.get)
    with pytest.raises(TemporaryDeliveryError) as info:
        await router.route("example.com")
    assert "4.3.5" == info.value.enhanced


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("relay.test", ("relay.test", 25)),
        ("Relay.Test.:2525", ("relay.test", 2525)),
        ("127.0.0.1:2526", ("127.0.0.1", 2526)),
        ("127.0.0.1", ("127.0.0.1", 25)),
        ("[::1]:2526", ("::1", 2526)),
        ("[::1]", ("::1", 25)),
        ("::1", ("::1", 25)),
    ],
)
def test_parse_override_accepts_host_and_optional_port(
    spec: str, expected: tuple[str, int]
) -> None:
    """ "host[:port]" with bracketed or bare IPv6, default port 25."""
    assert expected == parse_override(spec)


@pytest.mark.parametrize("spec", ["", "host:", "host:0", "host:70000", "[::1", "[::1]x", "a:b:c"])
def test_parse_override_rejects_malformed(spec: str) -> None:
    """Malformed overrides raise ValueError naming the spec."""
    with pytest.raises(ValueError, match="mx_override"):
        parse_override(spec)


async def test_changing_mx_port_applies_to_already_cached_routes() -> None:
    """Setting mx_port (e.g. on reload) re-plans cached resolutions with the new port."""
    fake = two_mx()
    router = make_router(fake)

    async def scenario() -> tuple[list[int], list[int]]:
        before = [t.port for t in await router.route("two.test")]
        router.mx_port = 2600
        return before, [t.port for t in await router.route("two.test")]

    assert ([25, 25], [2600, 2600]) == await scenario()
    assert 1 == fake.call_count("two.test", QueryType.MX)


async def test_set_overrides_replaces_the_override_lookup() -> None:
    """A reload's new overrides win at once; removing one falls back to MX routing."""
    fake = two_mx()
    router = make_router(fake, overrides={"two.test": "127.0.0.1:2526"}.get)

    async def scenario() -> list[list[tuple[str, int]]]:
        seen = [[(t.host, t.port) for t in await router.route("two.test")]]
        router.set_overrides({"two.test": "127.0.0.9:2527"}.get)
        seen.append([(t.host, t.port) for t in await router.route("two.test")])
        router.set_overrides(lambda _d: None)
        seen.append([(t.host, t.port) for t in await router.route("two.test")])
        return seen

    assert [
        [("127.0.0.1", 2526)],
        [("127.0.0.9", 2527)],
        [("mx1.two.test", 25), ("mx2.two.test", 25)],
    ] == await scenario()


@given(
    records=st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from("abcdefgh")),
        min_size=1,
        max_size=8,
        unique_by=lambda r: r[1],
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_route_is_every_mx_host_once_in_non_decreasing_preference(
    records: list[tuple[int, str]], seed: int
) -> None:
    """Property: whatever the MX set and shuffle, each host appears once, preferences ascend."""
    fake = FakeResolver()
    fake.add_mx("p.test", *((pref, f"{h}.p.test") for pref, h in records))
    for _pref, h in records:
        fake.add_host(f"{h}.p.test", "192.0.2.1")
    route = run(make_router(fake, seed=seed).route("p.test"))
    assert sorted(f"{h}.p.test" for _p, h in records) == sorted(t.host for t in route)
    prefs = [t.preference for t in route]
    assert sorted(prefs) == prefs


# -- loops back to myself (issue 7, defect 4) ------------------------------------------

LOCAL = {"192.0.2.1", "2001:db8::1", "127.0.0.1"}  # this host's addresses, for the tests


def own(*listeners: tuple[str, int]) -> OwnListeners:
    return OwnListeners(listeners, is_local=LOCAL.__contains__)


@pytest.mark.parametrize(
    ("listener", "address", "port", "is_self"),
    [
        (("192.0.2.1", 25), "192.0.2.1", 25, True),
        (("192.0.2.1", 25), "192.0.2.1", 2525, False),  # another port is another server
        (("192.0.2.1", 25), "192.0.2.2", 25, False),
        (("0.0.0.0", 25), "127.0.0.1", 25, True),  # wildcard: any local address
        (("0.0.0.0", 25), "192.0.2.9", 25, False),  # ... but not a remote one
        (("0.0.0.0", 25), "2001:db8::1", 25, False),  # 0.0.0.0 is IPv4 only
        (("::", 25), "2001:db8::1", 25, True),
        (("::", 25), "192.0.2.1", 25, True),  # [::] takes IPv4 too (dual stack)
        (("[::]", 25), "::ffff:192.0.2.1", 25, True),
        (("2001:db8::1", 25), "2001:DB8:0::1", 25, True),
        (("192.0.2.1", 0), "192.0.2.1", 25, False),
    ],
)
def test_own_listeners_match_address_and_port_or_any_local_address_of_a_wildcard(
    listener: tuple[str, int], address: str, port: int, is_self: bool
) -> None:
    assert is_self == own(listener).is_self(address, port)


def test_is_local_address_asks_the_kernel() -> None:
    assert is_local_address("127.0.0.1")
    assert is_local_address("127.0.0.29")  # all of 127.0.0.0/8 is loopback
    assert not is_local_address("192.0.2.200")  # TEST-NET-1, never assigned here
    assert not is_local_address("mx.example.com")


async def test_override_to_our_own_listener_fails_permanently_as_a_loop() -> None:
    router = make_router(
        FakeResolver(), overrides={"loop.test": "127.0.0.1:2525"}.get, own=own(("0.0.0.0", 2525))
    )
    with pytest.raises(PermanentDeliveryError) as info:
        await router.route("loop.test")
    assert "5.4.6" == info.value.enhanced
    assert "mail for loop.test loops back to myself" == info.value.text


async def test_when_we_are_the_best_mx_the_route_loops() -> None:
    router = make_router(two_mx(), own=own(("192.0.2.1", 25)))
    with pytest.raises(PermanentDeliveryError, match=r"mail for two\.test loops back to myself"):
        await router.route("two.test")


async def test_when_we_are_a_backup_mx_only_the_better_ones_are_kept() -> None:
    """As Postfix: our own MX and every MX of equal or worse preference are dropped."""
    fake = two_mx()
    fake.add_mx("three.test", (10, "mx1.two.test"), (20, "mx2.two.test"), (30, "mx3.test"))
    fake.add_host("mx3.test", "192.0.2.3")
    router = make_router(fake, own=own(("192.0.2.2", 25)))
    route = await router.route("three.test")
    assert ["mx1.two.test"] == [t.host for t in route]


async def test_other_ports_and_remote_addresses_are_not_loops() -> None:
    router = make_router(two_mx(), own=own(("0.0.0.0", 2525), ("192.0.2.2", 587)))
    assert 2 == len(await router.route("two.test"))
