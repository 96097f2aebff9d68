"""The outbound pool: its decision (reuse, open, wait) on its own, and the pool around
it with stand-in connections and a virtual clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import pytest

from empath.errors import TemporaryDeliveryError
from empath.testing.clock import FakeClock, FakeTimer
from empath.transport.outbound import OutboundConnection, PoolKey, TlsMode
from empath.transport.pool import ConnectionPool, Open, PoolSettings, Reuse, Wait, decide

KEY = PoolKey("mx.test", 25, TlsMode.NONE)


def test_the_newest_usable_idle_connection_is_reused_and_dead_ones_closed() -> None:
    assert Reuse(1, stale=(2,)) == decide([True, True, False], 3, 3, fresh=False)
    assert Reuse(0) == decide([True], 1, 1, fresh=False)


def test_a_new_connection_is_opened_below_the_cap_counting_dead_ones_as_gone() -> None:
    assert Open() == decide([], 0, 1, fresh=False)
    assert Open(stale=(0, 1)) == decide([False, False], 2, 2, fresh=False)
    assert Wait() == decide([], 2, 2, fresh=False)


def test_fresh_never_reuses() -> None:
    assert Open() == decide([True], 1, 2, fresh=True)
    assert Wait() == decide([True], 2, 2, fresh=True)


class FakeConn:
    """What the pool touches of an OutboundConnection."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.key = KEY
        self.usable = True
        self.reused = False
        self.last_used = 0.0
        self.closed = False
        self.quit_sent = False
        self.timer: FakeTimer | None = None

    def close(self) -> None:
        self.closed = True
        self.usable = False

    async def quit(self) -> None:
        self.quit_sent = True
        self.close()

    def set_idle_timer(self, handle: FakeTimer) -> None:
        self.cancel_idle_timer()
        self.timer = handle

    def cancel_idle_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None

    @property
    def idle_timer_armed(self) -> bool:
        return self.timer is not None


def pool_and_opener(
    clock: FakeClock, max_per_key: int = 1, idle_s: float = 10.0
) -> tuple[ConnectionPool, list[FakeConn], object]:
    pool = ConnectionPool(PoolSettings(max_per_key, idle_s), clock=clock)
    opened: list[FakeConn] = []

    async def opener() -> OutboundConnection:
        conn = FakeConn(len(opened))
        opened.append(conn)
        return cast(OutboundConnection, conn)

    return pool, opened, opener


async def test_a_connection_comes_back_idle_and_is_reused() -> None:
    pool, opened, opener = pool_and_opener(FakeClock(autojump=True))
    reused = []
    for _ in range(3):
        async with pool.connection(KEY, opener) as conn:  # type: ignore[arg-type]
            assert conn is cast(OutboundConnection, opened[0])
            reused.append(conn.reused)
    assert [False, True, True] == reused
    assert (1, 2, 1) == (pool.stats.opened, pool.stats.reused, pool.idle_count(KEY))


async def test_at_the_cap_a_request_waits_for_a_connection_to_come_back() -> None:
    clock = FakeClock(autojump=True)
    pool, opened, opener = pool_and_opener(clock)
    order: list[str] = []

    async def use(name: str, hold_s: float) -> None:
        async with pool.connection(KEY, opener) as conn:  # type: ignore[arg-type]
            order.append(f"{name} got {cast(FakeConn, conn).n}")
            await clock.sleep(hold_s)

    await asyncio.gather(use("a", 5), use("b", 0))
    assert ["a got 0", "b got 0"] == order  # b waited 5 virtual seconds for a's
    assert 1 == len(opened)


async def test_a_request_gives_up_after_its_wait_on_the_clock() -> None:
    clock = FakeClock(autojump=True)
    pool, _, opener = pool_and_opener(clock)
    async with pool.connection(KEY, opener):  # type: ignore[arg-type]
        start = clock.monotonic()
        with pytest.raises(TemporaryDeliveryError, match="busy"):
            async with pool.connection(KEY, opener, wait_s=30):  # type: ignore[arg-type]
                pass
        assert 30 == clock.monotonic() - start


async def test_an_opener_that_fails_gives_its_slot_back() -> None:
    pool, opened, opener = pool_and_opener(FakeClock(autojump=True))

    async def broken() -> OutboundConnection:
        raise TemporaryDeliveryError("connection refused")

    with pytest.raises(TemporaryDeliveryError, match="refused"):
        async with pool.connection(KEY, broken):
            pass
    assert 0 == pool.open_count(KEY)
    async with pool.connection(KEY, opener):  # type: ignore[arg-type]
        assert 1 == len(opened)


async def test_a_block_that_raises_closes_its_connection_and_a_dead_one_is_not_reused() -> None:
    pool, opened, opener = pool_and_opener(FakeClock(autojump=True), max_per_key=2)
    with pytest.raises(RuntimeError):
        async with pool.connection(KEY, opener):  # type: ignore[arg-type]
            raise RuntimeError("bug")
    assert opened[0].closed and 0 == pool.open_count(KEY)
    async with pool.connection(KEY, opener):  # type: ignore[arg-type]
        pass
    opened[1].usable = False  # died while idle
    async with pool.connection(KEY, opener) as conn:  # type: ignore[arg-type]
        assert conn is cast(OutboundConnection, opened[2])
    assert opened[1].closed and 1 == pool.open_count(KEY)


async def test_an_idle_connection_is_closed_politely_after_the_idle_timeout() -> None:
    clock = FakeClock(autojump=True)
    pool, opened, opener = pool_and_opener(clock, idle_s=10)
    async with pool.connection(KEY, opener):  # type: ignore[arg-type]
        pass
    await clock.sleep(11)
    await asyncio.sleep(0)  # the QUIT task
    assert opened[0].quit_sent and 0 == pool.idle_count(KEY) and 1 == pool.stats.closed_idle


async def test_a_connection_used_again_and_again_keeps_one_idle_timer() -> None:
    """Reuse does not re-arm the idle timer (it cost a timer per relayed message)."""
    armed: list[float] = []

    class CountingClock(FakeClock):
        def call_later(self, seconds: float, callback: Callable[[], object]) -> FakeTimer:
            armed.append(seconds)
            return super().call_later(seconds, callback)

    pool, opened, opener = pool_and_opener(CountingClock(autojump=True), idle_s=10)
    for _ in range(50):
        async with pool.connection(KEY, opener):  # type: ignore[arg-type]
            pass
    assert [10] == armed
    assert 1 == len(opened)


async def test_an_idle_connection_closes_a_full_timeout_after_its_last_use() -> None:
    clock = FakeClock(autojump=True)
    pool, opened, opener = pool_and_opener(clock, idle_s=10)

    async def use(hold_s: float = 0.0) -> None:
        async with pool.connection(KEY, opener):  # type: ignore[arg-type]
            await clock.sleep(hold_s)

    async def closed_after(seconds: float) -> bool:
        await clock.sleep(seconds)
        await asyncio.sleep(0)  # the QUIT task
        return opened[0].quit_sent

    await use()  # idle from t=0: the timer is due at t=10
    await clock.sleep(5)
    await use()  # used at t=5, idle again
    assert not await closed_after(9.5)  # t=14.5: the timer fired at 10, re-armed for 15
    await use(4)  # in use from 14.5 to 18.5, over the timer's 15: it waits for the return
    assert not await closed_after(9.5)  # t=28: idle for 9.5 s
    assert await closed_after(1)  # t=29: idle for 10.5 s
    assert 0 == pool.idle_count(KEY) and 1 == pool.stats.closed_idle


async def test_a_fresh_request_opens_a_new_connection_even_with_one_idle() -> None:
    """After a pooled session turned out dead, the retry must not get another pooled one
    (the old attempt code could, and then called it 'not reused')."""
    pool, opened, opener = pool_and_opener(FakeClock(autojump=True), max_per_key=2)
    async with pool.connection(KEY, opener):  # type: ignore[arg-type]
        pass
    async with pool.connection(KEY, opener, fresh=True) as conn:  # type: ignore[arg-type]
        assert conn is cast(OutboundConnection, opened[1]) and not conn.reused
    assert (2, 0) == (pool.stats.opened, pool.stats.reused)
