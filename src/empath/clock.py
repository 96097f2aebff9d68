"""Clocks: every time-dependent decision and every wait takes a Clock, so tests run
in virtual time (``empath.testing.clock.FakeClock``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """A pending :meth:`Clock.call_later` callback."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Wall time for records and monotonic time for intervals, both in seconds; and
    the waits measured on the monotonic one."""

    def now(self) -> float:
        """Seconds since the epoch (wall clock): stored in records, shown to operators."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards: used for timers and rates."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds`` of this clock's time."""
        ...

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` on the event loop after ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock (waits on the running event loop)."""

    __slots__ = ()

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_later(seconds, callback)
