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
    """The real clock (waits on the running event loop).

    ``now`` and ``monotonic`` are the :mod:`time` module's own C functions, not methods
    that call them: the event loop asks the clock ~12 times per ingested message and
    ~22 per relayed one (session read stamps, spool and history stamps, the pool, the
    runner), and from compiled code a Python-level method cost 130 ns a call against
    66 ns for the C function (issue 20)."""

    __slots__ = ()

    now = staticmethod(time.time)
    monotonic = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, seconds: float, callback: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_later(seconds, callback)


class _Deadline:
    """``async with deadline(clock, s)``: :func:`asyncio.timeout` measured on a Clock."""

    __slots__ = ("_cancelling", "_clock", "_fired", "_seconds", "_task", "_timer")

    def __init__(self, clock: Clock, seconds: float) -> None:
        self._clock = clock
        self._seconds = seconds
        self._fired = False
        self._timer: Timer | None = None
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0

    def _expire(self) -> None:
        self._fired = True
        if self._task is not None:
            self._task.cancel()

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("deadline() needs a running task")
        self._task = task
        self._cancelling = task.cancelling()
        self._timer = self._clock.call_later(self._seconds, self._expire)

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if (
            self._fired
            and exc_type is asyncio.CancelledError
            and self._task is not None
            and self._task.uncancel() <= self._cancelling
        ):
            raise TimeoutError


def deadline(clock: Clock, seconds: float) -> _Deadline:
    """Cancel the block after ``seconds`` of ``clock``'s time and raise TimeoutError,
    as :func:`asyncio.timeout` does on the loop's own clock."""
    return _Deadline(clock, seconds)
