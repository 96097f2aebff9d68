"""The shared policy state's scripts and local view against a real redis-server (no daemons):
several :class:`SharedPolicyState` objects in one process play the nodes."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from empath.cluster.backend import RedisBackend
from empath.cluster.state import SharedPolicyState, batch_size, scaled
from empath.policy.breaker import Admit, BreakerSettings, BreakerState, BreakerTransition, Deny
from empath.policy.ratelimit import GRANTED, RateLimit, Wait
from empath.policy.state import PolicySettings
from empath.testing.settings import breaker_settings
from tests.helpers import free_port
from tests.redis_server import RedisServer

T = TypeVar("T")
UNLIMITED = RateLimit(math.inf, 1)


def run(coro: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro()

    return asyncio.run(main())


def node(
    url: str,
    name: str,
    *,
    rate: RateLimit = UNLIMITED,
    breaker: BreakerSettings | None = None,
    transitions: list[BreakerTransition] | None = None,
) -> SharedPolicyState:
    state = SharedPolicyState(
        RedisBackend(url, "t:", 0.5),
        node_id=name,
        instance=name,
        settings=PolicySettings(breaker or breaker_settings(), rate, {}),
        lease_s=1.0,
        on_transition=None if transitions is None else transitions.append,
    )
    state.set_waker(lambda _d: None)
    return state


async def shut(*states: SharedPolicyState) -> None:
    for s in states:
        await s.close()
        await s.backend.close()


async def settle(*states: SharedPolicyState) -> None:
    """Let every ask that is out finish."""
    for _ in range(100):
        await asyncio.sleep(0.005)
        if not any(s.asks_out for s in states):
            return
    raise AssertionError("asks still out after 0.5 s")


def test_gcra_grants_the_burst_then_one_token_per_interval(redis_server: RedisServer) -> None:
    """A fresh bucket gives burst tokens; then none, with the wait of one interval."""

    async def go() -> None:
        b = RedisBackend(redis_server.url, "t:", 0.5)
        try:
            assert (3, 0.0) == await b.take_tokens("d.test", 10.0, 3, 5)
            got, wait_s = await b.take_tokens("d.test", 10.0, 3, 1)
            assert 0 == got
            assert 0.05 < wait_s <= 0.1
            await asyncio.sleep(wait_s + 0.01)
            assert 1 == (await b.take_tokens("d.test", 10.0, 3, 5))[0]
        finally:
            await b.close()

    run(go)


def test_tokens_summed_over_three_nodes_respect_the_rate(redis_server: RedisServer) -> None:
    """Three nodes asking as fast as they can get burst + rate x elapsed tokens, no more."""
    rate = RateLimit(50.0, 5)

    async def go() -> None:
        nodes = [node(redis_server.url, f"n{i}", rate=rate) for i in range(3)]
        granted = 0
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            for n in nodes:
                if n.try_acquire_connection("d.test", 100):
                    if n.acquire_token("d.test") is GRANTED:
                        granted += 1
                    n.release_connection("d.test")
            await asyncio.sleep(0.002)
        elapsed = time.monotonic() - started
        await settle(*nodes)
        assert granted <= rate.burst_size + rate.messages_per_second * elapsed + 1
        assert granted >= 0.5 * rate.messages_per_second * elapsed  # and it does flow
        await shut(*nodes)

    run(go)


def test_connection_leases_cap_the_cluster_and_expire_after_a_crash(
    redis_server: RedisServer,
) -> None:
    """max_connections 2 over three nodes; a node that stops renewing loses its leases."""

    async def go() -> None:
        a, b, c = (node(redis_server.url, n) for n in "abc")

        async def take(n: SharedPolicyState) -> bool:
            if n.try_acquire_connection("m.test", 2):
                return True
            await settle(a, b, c)  # the ask for a lease comes back
            return n.try_acquire_connection("m.test", 2)

        assert await take(a)
        assert await take(b)
        assert not await take(c)  # refused by Redis: 2 leases taken
        assert ":2" == redis_server.command("ZCARD", "t:conn:m.test")
        # a "dies" (never renews or releases): its lease expires after lease_s (1 s);
        # b lives on and renews its lease (the node loop's job) half-way
        await asyncio.sleep(0.6)
        await b.backend.renew_slots(b.held_leases(), b.lease_s)
        await asyncio.sleep(0.5)
        assert await take(c)
        assert not await take(c)  # b's renewed lease still counts
        await shut(a, b, c)

    run(go)


def test_a_refused_lease_marks_the_domain_contended_for_its_holders(
    redis_server: RedisServer,
) -> None:
    """Holders reuse their leases until another node is refused one; then old ones go back."""

    async def go() -> None:
        a, b = node(redis_server.url, "a"), node(redis_server.url, "b")
        assert not a.try_acquire_connection("c.test", 1)
        await settle(a, b)
        assert a.try_acquire_connection("c.test", 1)
        _, contended = await a.backend.read_breakers(["c.test"])
        assert set() == contended
        assert not b.try_acquire_connection("c.test", 1)
        await settle(a, b)
        assert not b.try_acquire_connection("c.test", 1)  # refused: a holds the only one
        _, contended = await a.backend.read_breakers(["c.test"])
        assert {"c.test"} == contended
        await shut(a, b)

    run(go)


def test_a_trip_is_shared_and_exactly_one_node_probes(redis_server: RedisServer) -> None:
    """Failures from two nodes trip the breaker once; of three nodes one gets the probe."""
    settings = breaker_settings(failure_threshold=3, failure_window_s=60, timeout_s=0.3)
    seen: list[BreakerTransition] = []

    async def go() -> None:
        nodes = [node(redis_server.url, f"n{i}", breaker=settings, transitions=seen)
                 for i in range(3)]  # fmt: skip
        a, b, c = nodes
        for n in (a, b, a):
            assert isinstance(n.breaker_allow("b.test"), Admit)
            n.breaker_failure("b.test", 0)
            await settle(*nodes)
        assert [(BreakerState.CLOSED, BreakerState.OPEN)] == [(t.old, t.new) for t in seen]
        records, _ = await c.backend.read_breakers()
        c.apply_breakers(records, time.monotonic())
        assert isinstance(c.breaker_allow("b.test"), Deny)  # c never failed, c is stopped
        await asyncio.sleep(0.35)
        for n in nodes:
            n.apply_breakers((await n.backend.read_breakers())[0], time.monotonic())
            assert isinstance(n.breaker_allow("b.test"), Deny)  # asks for the probe
        await settle(*nodes)
        decisions = [n.breaker_allow("b.test") for n in nodes]
        probes = [d for d in decisions if isinstance(d, Admit) and d.probe]
        assert 1 == len(probes)
        assert 1 == sum(1 for t in seen if t.new is BreakerState.HALF_OPEN)
        prober = nodes[decisions.index(probes[0])]
        prober.breaker_success("b.test", probes[0].probe)
        await settle(*nodes)
        assert BreakerState.CLOSED is seen[-1].new
        assert "" == redis_server.command("HGET", "t:breakers", "b.test").lstrip("$-1")
        await shut(*nodes)

    run(go)


def test_a_dead_nodes_probe_claim_lapses_within_a_lease(redis_server: RedisServer) -> None:
    """Issue 14 #5: node A claims the Half-Open probe and dies (no outcome, no renewal):
    node B probes about one lease (1 s here) later, not after probe_timeout_s (15 min).
    While A lives, its loop renews the claim and B keeps waiting."""
    settings = breaker_settings(failure_threshold=1, failure_window_s=60, timeout_s=0.2)

    async def go() -> None:
        a, b = node(redis_server.url, "a", breaker=settings), node(redis_server.url, "b")
        b.view.breakers.settings = settings
        assert isinstance(a.breaker_allow("p.test"), Admit)
        a.breaker_failure("p.test", 0)
        await settle(a, b)
        await asyncio.sleep(0.25)
        for n in (a, b):
            n.apply_breakers((await n.backend.read_breakers())[0], time.monotonic())
        assert isinstance(a.breaker_allow("p.test"), Deny)  # A asks for the probe
        await settle(a, b)
        probe = a.breaker_allow("p.test")
        assert isinstance(probe, Admit) and probe.probe  # A's probe is out
        assert {"p.test"} == set(a.held_probes())
        # A lives for 2.5 leases, renewing like its node loop does: B must wait.
        for _ in range(10):
            await a.backend.renew_probes(a.held_probes(), a.lease_s)
            await asyncio.sleep(0.25)
            b.apply_breakers((await b.backend.read_breakers())[0], time.monotonic())
            assert isinstance(b.breaker_allow("p.test"), Deny)
            await settle(b)
        # A dies (SIGKILL: nothing renews, nothing reports).  B gets the probe within
        # about a lease.
        died = time.monotonic()
        got = None
        while got is None and time.monotonic() - died < 3.0:
            await asyncio.sleep(0.05)
            b.apply_breakers((await b.backend.read_breakers())[0], time.monotonic())
            d = b.breaker_allow("p.test")
            await settle(b)
            if isinstance(d, Admit) and d.probe:
                got = time.monotonic() - died
        assert got is not None, "B never got the probe"
        assert got < a.lease_s + 0.5
        await shut(a, b)

    run(go)


def test_unreachable_redis_falls_back_to_limits_divided_by_the_node_count() -> None:
    """No Redis: the first ask fails, the node falls back to rate/N and max_connections/N."""
    rate = RateLimit(30.0, 9)

    async def go() -> None:
        n = node(f"redis://127.0.0.1:{free_port()}/0", "lonely", rate=rate)
        n.node_count = 3
        assert not n.try_acquire_connection("f.test", 4)
        await settle(n)
        assert n.fallback
        assert n.try_acquire_connection("f.test", 4)  # 4 // 3 = 1 local slot
        assert not n.try_acquire_connection("f.test", 4)
        tokens = 0
        while n.acquire_token("f.test") is GRANTED:
            tokens += 1
        assert 3 == tokens  # burst 9 / 3 nodes
        assert isinstance(n.acquire_token("f.test"), Wait)
        n.leave_fallback()
        assert not n.fallback
        await shut(n)

    run(go)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (RateLimit(5.0, 5), 1),
        (RateLimit(100.0, 200), 10),
        (RateLimit(100_000.0, 100_000), 64),
        (RateLimit(1000.0, 3), 3),
    ],
)
def test_batch_size(limit: RateLimit, expected: int) -> None:
    """At most a tenth of a second's worth of tokens, the burst, and 64; at least 1."""
    assert expected == batch_size(limit)


def test_scaled_divides_rate_and_burst() -> None:
    assert RateLimit(2.5, 2) == scaled(RateLimit(10.0, 8), 4)
    assert RateLimit(10.0, 1) == scaled(RateLimit(20.0, 1), 2)
    assert UNLIMITED == scaled(UNLIMITED, 3)
