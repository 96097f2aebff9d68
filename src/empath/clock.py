"""Clocks: every time-dependent decision takes a Clock so tests run in virtual time."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Wall time for records and monotonic time for intervals, both in seconds."""

    def now(self) -> float:
        """Seconds since the epoch (wall clock): stored in records, shown to operators."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards: used for timers and rates."""
        ...


class SystemClock:
    """The real clock."""

    __slots__ = ()

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that only moves when a test says so (virtual time)."""

    __slots__ = ("_mono", "_wall")

    def __init__(self, start_wall: float = 1_700_000_000.0, start_mono: float = 1000.0) -> None:
        self._wall = start_wall
        self._mono = start_mono

    def now(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a FakeClock never goes backwards")
        self._wall += seconds
        self._mono += seconds
