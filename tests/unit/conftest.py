"""Unit tests run in virtual time: a real wait longer than a few milliseconds fails the
test that made it (``time.sleep`` and ``asyncio.sleep``, whoever calls them: the test,
the code under test or a thread it started).  Time that has to pass goes through a
:class:`~empath.testing.clock.FakeClock` (``autojump=True`` moves it whenever the loop
is idle)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

REAL_WAIT_LIMIT_S = 0.005

_real_time_sleep = time.sleep
_real_asyncio_sleep = asyncio.sleep


class RealWaits:
    """Every real wait over the limit seen during one test."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._lock = threading.Lock()

    def note(self, how: str, seconds: float) -> None:
        if seconds > REAL_WAIT_LIMIT_S:
            with self._lock:
                self.seen.append(f"{how}({seconds:g})")


@pytest.fixture(autouse=True)
def no_real_waits(monkeypatch: pytest.MonkeyPatch) -> Iterator[RealWaits]:
    waits = RealWaits()

    def sleep(seconds: float) -> None:
        waits.note("time.sleep", seconds)
        _real_time_sleep(seconds)

    async def asleep(delay: float, result: object = None) -> object:
        waits.note("asyncio.sleep", delay)
        return await _real_asyncio_sleep(delay, result)

    monkeypatch.setattr(time, "sleep", sleep)
    monkeypatch.setattr(asyncio, "sleep", asleep)
    yield waits
    assert [] == waits.seen, "a unit test waited in real time: use a FakeClock"
