"""Virtual time: FakeClock's autojump, and deadlines measured on a Clock.  (These tests
are ``async def``: tests/conftest.py runs them in a fresh event loop.)"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from empath.clock import SystemClock, deadline
from empath.testing.clock import FakeClock
from tests.unit.conftest import RealWaits


async def test_an_autojump_clock_lets_an_hour_pass_at_once() -> None:
    clock = FakeClock(autojump=True)
    start, real = clock.monotonic(), time.monotonic()
    await clock.sleep(3600)
    assert 3600 == clock.monotonic() - start
    assert time.monotonic() - real < 1.0  # and the conftest guard saw no real wait


async def test_autojump_wakes_sleepers_in_deadline_order_and_waits_for_runnable_work() -> None:
    clock = FakeClock(autojump=True)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, s: float) -> None:
        await clock.sleep(s)
        woke.append((name, clock.monotonic() - 1000.0))

    async def busy() -> None:  # runnable work first: time must not move under it
        for _ in range(50):
            await asyncio.sleep(0)
        woke.append(("busy", clock.monotonic() - 1000.0))

    await asyncio.gather(sleeper("late", 30), sleeper("early", 5), busy())
    assert [("busy", 0.0), ("early", 5.0), ("late", 30.0)] == woke


async def test_a_clock_deadline_fires_in_virtual_time() -> None:
    clock = FakeClock(autojump=True)
    with pytest.raises(TimeoutError):
        async with deadline(clock, 10):
            await clock.sleep(60)
    assert 10 == clock.monotonic() - 1000.0


async def test_a_deadline_that_is_not_reached_changes_nothing() -> None:
    clock = FakeClock(autojump=True)
    async with deadline(clock, 10):
        await clock.sleep(3)
    await clock.sleep(20)  # the cancelled timer does not fire later
    assert 23 == clock.monotonic() - 1000.0


async def test_an_outer_cancel_inside_a_deadline_stays_a_cancel() -> None:
    clock = FakeClock()

    async def guarded() -> None:
        async with deadline(clock, 10):
            await asyncio.Event().wait()

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 0 == clock.pending()


def test_a_manual_clock_never_moves_by_itself() -> None:
    async def go() -> float:
        clock = FakeClock()
        sleeper = asyncio.create_task(clock.sleep(5))
        for _ in range(100):
            await asyncio.sleep(0)
        assert not sleeper.done()
        await clock.run_for(5)
        assert sleeper.done()
        return clock.monotonic()

    assert 1005.0 == asyncio.run(go())


def test_the_unit_suite_notices_a_real_wait(no_real_waits: RealWaits) -> None:
    """tests/unit/conftest.py's guard: a real sleep over the limit, made anywhere (here
    by a thread), is recorded and would fail the test at teardown."""
    worker = threading.Thread(target=time.sleep, args=(0.02,))
    worker.start()
    worker.join()
    asyncio.run(asyncio.sleep(0.001))  # under the limit: fine
    assert ["time.sleep(0.02)"] == no_real_waits.seen
    no_real_waits.seen.clear()  # this test made it on purpose


def test_the_system_clock_is_the_time_modules_own_functions() -> None:
    """No Python frame per call: the loop asks the clock ~12 times per ingested message
    and ~22 per relayed one (a method calling them cost twice as much, compiled)."""
    clock = SystemClock()
    assert (time.time, time.monotonic) == (clock.now, clock.monotonic)
    before = time.monotonic()
    assert before <= clock.monotonic() <= time.monotonic()
    assert abs(time.time() - clock.now()) < 1.0
