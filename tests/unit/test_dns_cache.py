"""MxCache in virtual time: TTL clamps, negative caching, LRU, counters, single flight, ops."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeVar

import pytest

from empath.dns.cache import CacheLimits, EntryKind, Exchanger, MxCache, Resolution
from empath.dns.mx import dns_loader
from empath.dns.resolver import DnsFailure, QueryType
from empath.errors import ConfigError, DnsNameNotFoundError, DnsTemporaryError
from empath.testing.clock import FakeClock
from empath.testing.fake_resolver import FakeResolver

T = TypeVar("T")
MX = EntryKind.MX


def make_cache(
    fake: FakeResolver,
    clock: FakeClock,
    *,
    size: int = 100,
    min_ttl: float = 60,
    max_ttl: float = 3600,
    negative_ttl: float = 300,
    serve_stale: float = 0,
) -> MxCache:
    return MxCache(
        dns_loader(fake),
        clock=clock,
        limits=CacheLimits(size, min_ttl, max_ttl, negative_ttl, serve_stale),
    )


def domain_with_ttl(
    fake: FakeResolver, domain: str, mx_ttl: float, addr_ttl: float = 86400
) -> None:
    fake.add_mx(domain, (10, f"mx.{domain}"), ttl_s=mx_ttl)
    fake.add_host(f"mx.{domain}", "192.0.2.1", ttl_s=addr_ttl)


async def lookups_after(cache: MxCache, clock: FakeClock, domain: str, delays: list[float]) -> None:
    for delay in delays:
        clock.advance(delay)
        with contextlib.suppress(DnsNameNotFoundError, DnsTemporaryError):
            await cache.lookup(MX, domain)


@pytest.mark.parametrize(
    ("record_ttl", "lives_s"),
    [(5, 60), (600, 600), (999_999, 3600)],
    ids=["short-ttl-raised-to-min", "ttl-honoured", "long-ttl-cut-to-max"],
)
async def test_entry_lives_for_its_ttl_clamped_to_min_and_max(
    record_ttl: float, lives_s: float
) -> None:
    """An entry is served until clamp(ttl, min, max) has passed, then asked again."""
    fake, clock = FakeResolver(), FakeClock()
    domain_with_ttl(fake, "d.test", record_ttl)
    cache = make_cache(fake, clock)
    await lookups_after(cache, clock, "d.test", [0, lives_s - 0.5])
    assert 1 == fake.call_count("d.test", QueryType.MX)
    await lookups_after(cache, clock, "d.test", [1.0])
    assert 2 == fake.call_count("d.test", QueryType.MX)
    assert (1, 2) == (cache.hits, cache.misses)


async def test_entry_ttl_is_the_smallest_record_ttl() -> None:
    """An address TTL shorter than the MX TTL bounds the entry."""
    fake, clock = FakeResolver(), FakeClock()
    domain_with_ttl(fake, "d.test", mx_ttl=3000, addr_ttl=100)
    cache = make_cache(fake, clock)
    await lookups_after(cache, clock, "d.test", [0, 101])
    assert 2 == fake.call_count("d.test", QueryType.MX)


async def test_nxdomain_is_cached_for_negative_ttl() -> None:
    """NXDOMAIN is remembered for negative_ttl_secs, then asked again."""
    fake, clock = FakeResolver(), FakeClock()
    cache = make_cache(fake, clock, negative_ttl=300)
    await lookups_after(cache, clock, "gone.test", [0, 299])
    assert 1 == fake.call_count("gone.test", QueryType.MX)
    await lookups_after(cache, clock, "gone.test", [2])
    assert 2 == fake.call_count("gone.test", QueryType.MX)


async def test_temporary_failure_is_not_cached() -> None:
    """A SERVFAIL is asked again on the very next lookup."""
    fake, clock = FakeResolver(), FakeClock()
    fake.fail("flaky.test", DnsFailure.SERVFAIL)
    cache = make_cache(fake, clock)
    await lookups_after(cache, clock, "flaky.test", [0, 0, 0])
    assert 3 == fake.call_count("flaky.test", QueryType.MX)
    assert (0, 3, 0) == (cache.hits, cache.misses, len(cache))


async def test_partial_temporary_failure_is_cached_only_for_min_ttl() -> None:
    """When an MX host was skipped for a temporary reason, the route is re-checked soon."""
    fake, clock = FakeResolver(), FakeClock()
    fake.add_mx("p.test", (10, "a.p.test"), (20, "b.p.test"), ttl_s=3600)
    fake.add_host("a.p.test", "192.0.2.1", ttl_s=3600)
    fake.fail("b.p.test", DnsFailure.TIMEOUT)
    cache = make_cache(fake, clock, min_ttl=60)
    await lookups_after(cache, clock, "p.test", [0, 61])
    assert 2 == fake.call_count("p.test", QueryType.MX)


async def test_lru_evicts_least_recently_used_and_counts_it() -> None:
    """Past cache_size the least recently *used* entry goes, and evictions count it."""
    fake, clock = FakeResolver(), FakeClock()
    for d in ("a.test", "b.test", "c.test", "d.test"):
        domain_with_ttl(fake, d, 600)
    cache = make_cache(fake, clock, size=3)

    async def scenario() -> None:
        for d in ("a.test", "b.test", "c.test"):
            await cache.lookup(MX, d)
        await cache.lookup(MX, "a.test")  # a becomes most recent; b is now oldest
        await cache.lookup(MX, "d.test")  # evicts b

    await scenario()
    assert ["a.test", "c.test", "d.test"] == [e.name for e in cache.entries()]
    assert (1, 1, 4) == (cache.evictions, cache.hits, cache.misses)


async def test_expired_entry_pushed_out_is_not_an_eviction() -> None:
    """Dropping an entry that had already expired does not count as crowding."""
    fake, clock = FakeResolver(), FakeClock()
    domain_with_ttl(fake, "old.test", 60)
    domain_with_ttl(fake, "new.test", 600)
    cache = make_cache(fake, clock, size=1)
    await lookups_after(cache, clock, "old.test", [0])
    await lookups_after(cache, clock, "new.test", [120])
    assert 0 == cache.evictions
    assert ["new.test"] == [e.name for e in cache.entries()]


async def test_cache_size_zero_disables_caching() -> None:
    """cache_size 0: every lookup asks DNS and nothing is stored."""
    fake, clock = FakeResolver(), FakeClock()
    domain_with_ttl(fake, "d.test", 600)
    cache = make_cache(fake, clock, size=0)
    await lookups_after(cache, clock, "d.test", [0, 0])
    assert (2, 0, 0) == (fake.call_count("d.test", QueryType.MX), len(cache), cache.evictions)


async def test_concurrent_lookups_share_one_query() -> None:
    """50 simultaneous lookups of an uncached domain cost one MX query (1 miss, 49 hits)."""
    fake, clock = FakeResolver(), FakeClock()
    domain_with_ttl(fake, "burst.test", 600)
    cache = make_cache(fake, clock)

    async def scenario() -> list[Resolution]:
        gate = fake.gate("burst.test")
        tasks = [asyncio.create_task(cache.lookup(MX, "burst.test")) for _ in range(50)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*tasks)

    results = await scenario()
    assert 1 == len({id(r) for r in results})
    assert 1 == fake.call_count("burst.test", QueryType.MX)
    assert (49, 1) == (cache.hits, cache.misses)


async def test_cancelled_waiter_does_not_cancel_the_shared_query() -> None:
    """One caller giving up leaves the others their answer, and the answer is cached."""
    fake, clock = FakeResolver(), FakeClock()
    domain_with_ttl(fake, "c.test", 600)
    cache = make_cache(fake, clock)

    async def scenario() -> Resolution:
        gate = fake.gate("c.test")
        first = asyncio.create_task(cache.lookup(MX, "c.test"))
        second = asyncio.create_task(cache.lookup(MX, "c.test"))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        gate.set()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        return await second

    resolution = await scenario()
    assert "mx.c.test" == resolution.exchangers[0].host
    assert ["c.test"] == [e.name for e in cache.entries()]


async def test_concurrent_waiters_each_get_a_fresh_negative_error() -> None:
    """Waiters on a failing shared query each receive their own exception instance."""
    fake, clock = FakeResolver(), FakeClock()
    cache = make_cache(fake, clock)

    async def scenario() -> list[BaseException | Resolution]:
        gate = fake.gate("nx.test")
        tasks = [asyncio.create_task(cache.lookup(MX, "nx.test")) for _ in range(3)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    errors = await scenario()
    assert all(isinstance(e, DnsNameNotFoundError) for e in errors)
    assert 3 == len({id(e) for e in errors})


async def test_entries_lists_live_entries_with_remaining_ttl_and_negative_flag() -> None:
    """entries(): positive and negative entries, TTL remaining, one line each."""
    fake, clock = FakeResolver(), FakeClock()
    domain_with_ttl(fake, "ok.test", 600)
    cache = make_cache(fake, clock, negative_ttl=300)
    await lookups_after(cache, clock, "ok.test", [0])
    await lookups_after(cache, clock, "nx.test", [100])
    entries = cache.entries()
    assert [("nx.test", True), ("ok.test", False)] == [(e.name, e.negative) for e in entries]
    nx, ok = entries
    assert (300.0, 500.0) == (nx.ttl_remaining_s, ok.ttl_remaining_s)
    assert (Exchanger(10, "mx.ok.test", ("192.0.2.1",)),) == ok.exchangers
    assert "5.1.2" == nx.enhanced
    assert "ok.test MX ttl=500s 10 mx.ok.test [192.0.2.1]" == ok.line()
    assert nx.line().startswith("nx.test MX ttl=300s negative 5.1.2 ")
    assert "\n" not in nx.line() + ok.line()


async def test_entries_drops_expired_entries() -> None:
    """An entry past its TTL is neither listed nor kept."""
    fake, clock = FakeResolver(), FakeClock()
    domain_with_ttl(fake, "ok.test", 60)
    cache = make_cache(fake, clock)
    await lookups_after(cache, clock, "ok.test", [0])
    clock.advance(61)
    assert ([], 0) == (cache.entries(), len(cache))


async def test_clear_drops_everything_and_returns_the_count() -> None:
    """clear() returns how many entries it dropped; the next lookup asks DNS again."""
    fake, clock = FakeResolver(), FakeClock()
    domain_with_ttl(fake, "a.test", 600)
    domain_with_ttl(fake, "b.test", 600)
    cache = make_cache(fake, clock)
    await lookups_after(cache, clock, "a.test", [0])
    await lookups_after(cache, clock, "b.test", [0])
    assert 2 == cache.clear()
    assert 0 == len(cache)
    await lookups_after(cache, clock, "a.test", [0])
    assert 2 == fake.call_count("a.test", QueryType.MX)


async def test_refresh_drops_and_resolves_again_now() -> None:
    """refresh(domain) re-queries at once and stores the new answer."""
    fake, clock = FakeResolver(), FakeClock()
    domain_with_ttl(fake, "r.test", 600)
    cache = make_cache(fake, clock)
    await lookups_after(cache, clock, "r.test", [0])
    fake.add_mx("r.test", (5, "new.r.test"))
    fake.add_host("new.r.test", "192.0.2.5")
    resolution = await cache.refresh("r.test")
    assert ["new.r.test"] == [e.host for e in resolution.exchangers]
    assert ["new.r.test"] == [e.host for e in cache.entries()[0].exchangers]
    assert (0, 1) == (cache.hits, cache.misses), "refresh counts as neither hit nor miss"


async def test_refresh_of_a_vanished_domain_raises_and_caches_negatively() -> None:
    """refresh() of a domain now NXDOMAIN raises 5.1.2 and leaves a negative entry."""
    fake, clock = FakeResolver(), FakeClock()
    domain_with_ttl(fake, "r.test", 600)
    cache = make_cache(fake, clock)
    await lookups_after(cache, clock, "r.test", [0])
    fake.remove("r.test")
    with pytest.raises(DnsNameNotFoundError):
        await cache.refresh("r.test")
    assert [True] == [e.negative for e in cache.entries()]


async def test_reconfigure_shrink_keeps_most_recent_and_counts_evictions() -> None:
    """Shrinking on reload keeps the newest entries; the dropped ones count as evictions."""
    fake, clock = FakeResolver(), FakeClock()
    names = [f"d{i}.test" for i in range(5)]
    for d in names:
        domain_with_ttl(fake, d, 600)
    cache = make_cache(fake, clock, size=10)
    for d in names:
        await lookups_after(cache, clock, d, [0])
    cache.reconfigure(CacheLimits(2, 1, 10, 5))
    assert ["d3.test", "d4.test"] == [e.name for e in cache.entries()]
    assert 3 == cache.evictions
    assert (2, 1.0, 10.0, 5.0) == (
        cache.cache_size,
        cache.min_cache_ttl_secs,
        cache.max_cache_ttl_secs,
        cache.negative_ttl_secs,
    )


@pytest.mark.parametrize(
    "settings",
    [
        {
            "cache_size": -1,
            "min_cache_ttl_secs": 1,
            "max_cache_ttl_secs": 2,
            "negative_ttl_secs": 1,
        },
        {"cache_size": 1, "min_cache_ttl_secs": 5, "max_cache_ttl_secs": 2, "negative_ttl_secs": 1},
        {
            "cache_size": 1,
            "min_cache_ttl_secs": 1,
            "max_cache_ttl_secs": 2,
            "negative_ttl_secs": -1,
        },
    ],
)
def test_reconfigure_rejects_invalid_settings_and_keeps_the_old(settings: dict[str, Any]) -> None:
    """Bad limits raise ConfigError and change nothing."""
    cache = make_cache(FakeResolver(), FakeClock(), size=7)
    with pytest.raises(ConfigError):
        cache.reconfigure(CacheLimits(**settings))
    assert 7 == cache.cache_size


async def test_host_and_mx_entries_are_separate() -> None:
    """The same name as an MX domain and as an override host are two entries."""
    fake, clock = FakeResolver(), FakeClock()
    domain_with_ttl(fake, "x.test", 600)
    fake.add_host("x.test", "192.0.2.77")
    cache = make_cache(fake, clock)

    async def both() -> tuple[Resolution, Resolution]:
        return await cache.lookup(MX, "x.test"), await cache.lookup(EntryKind.HOST, "x.test")

    mx, host = await both()
    assert "mx.x.test" == mx.exchangers[0].host
    assert ("192.0.2.77",) == host.exchangers[0].addresses
    assert [EntryKind.HOST, EntryKind.MX] == [e.kind for e in cache.entries()]
    assert 2 == cache.invalidate("x.test")


# --- serve-stale (issue 14 defect 18, RFC 8767) ------------------------------------


def stale_cache(fake: FakeResolver, clock: FakeClock, window: float = 3600) -> MxCache:
    domain_with_ttl(fake, "ok.test", 60)
    return make_cache(fake, clock, serve_stale=window)


async def test_an_expired_answer_is_served_stale_while_the_resolver_fails() -> None:
    """Past its TTL the entry is asked for again; a temporary failure answers with the
    last good data (counted), which is then reused for 30 s before asking again."""
    fake, clock = FakeResolver(), FakeClock()
    cache = stale_cache(fake, clock)
    good = await cache.lookup(MX, "ok.test")
    fake.fail("ok.test", DnsFailure.TIMEOUT)
    clock.advance(61)
    assert good == await cache.lookup(MX, "ok.test")
    assert 1 == cache.stale_served
    assert 2 == fake.call_count("ok.test", QueryType.MX)
    (entry,) = cache.entries()
    assert entry.stale and " stale " in entry.line()
    clock.advance(29)
    assert good == await cache.lookup(MX, "ok.test")  # the stale answer's own 30 s
    assert 2 == fake.call_count("ok.test", QueryType.MX)
    clock.advance(2)
    assert good == await cache.lookup(MX, "ok.test")
    assert (3, 2) == (fake.call_count("ok.test", QueryType.MX), cache.stale_served)
    fake.heal("ok.test")
    clock.advance(31)
    await cache.lookup(MX, "ok.test")
    (entry,) = cache.entries()
    assert not entry.stale


async def test_stale_answers_end_with_the_window_and_never_beat_an_authoritative_no() -> None:
    fake, clock = FakeResolver(), FakeClock()
    cache = stale_cache(fake, clock, window=100)
    await cache.lookup(MX, "ok.test")
    fake.fail("ok.test", DnsFailure.SERVFAIL)
    clock.advance(60 + 101)
    with pytest.raises(DnsTemporaryError):
        await cache.lookup(MX, "ok.test")
    assert 0 == cache.stale_served
    fake2, clock2 = FakeResolver(), FakeClock()
    cache2 = stale_cache(fake2, clock2)
    await cache2.lookup(MX, "ok.test")
    fake2.remove("ok.test")
    clock2.advance(61)
    with pytest.raises(DnsNameNotFoundError):
        await cache2.lookup(MX, "ok.test")
    assert 0 == cache2.stale_served


async def test_clear_marks_entries_for_refresh_and_keeps_the_last_good_answer() -> None:
    """`dns clear-cache` during an outage: the next lookup asks the resolver (which
    fails) and the delivery still gets the last good answer; when the resolver works,
    a cleared entry is replaced at once."""
    fake, clock = FakeResolver(), FakeClock()
    cache = stale_cache(fake, clock)
    good = await cache.lookup(MX, "ok.test")
    fake.fail("ok.test", DnsFailure.TIMEOUT)
    assert 1 == cache.clear()
    assert [] == cache.entries()
    assert good == await cache.lookup(MX, "ok.test")
    assert (2, 1) == (fake.call_count("ok.test", QueryType.MX), cache.stale_served)
    fake.heal("ok.test")
    fake.add_mx("ok.test", (5, "mx2.ok.test"), ttl_s=600)
    fake.add_host("mx2.ok.test", "192.0.2.2")
    assert 1 == cache.clear()
    new = await cache.lookup(MX, "ok.test")
    assert "mx2.ok.test" == new.exchangers[0].host
    assert 1 == cache.stale_served


async def test_without_serve_stale_a_failure_after_expiry_fails_the_lookup() -> None:
    fake, clock = FakeResolver(), FakeClock()
    cache = stale_cache(fake, clock, window=0)
    await cache.lookup(MX, "ok.test")
    fake.fail("ok.test", DnsFailure.TIMEOUT)
    cache.clear()
    with pytest.raises(DnsTemporaryError):
        await cache.lookup(MX, "ok.test")
