"""Virtual time for tests: a :class:`~empath.clock.Clock` that only moves when told.

``advance(s)`` moves both clocks and fires, in deadline order, every
``call_later`` callback and wakes every ``sleep`` that falls due (time stands at
each one's deadline while it fires).  Woken coroutines run when the event loop
next gets control: ``await clock.run_for(s)`` advances and then lets the loop run
until nothing is ready, so a loop such as ``while True: await clock.sleep(60);
work()`` does its work once per virtual minute without any real waiting.

``FakeClock(autojump=True)`` moves itself, as trio's ``MockClock(autojump_threshold=0)``
does: whenever the event loop has nothing ready to run (every task is waiting) and a
virtual timer is pending, time jumps to the earliest deadline.  A test then just
awaits - ``await clock.sleep(3600)`` returns at once, a timeout measured on the clock
fires as soon as nothing else can happen first - and never sleeps in real time.  While
the loop waits on real I/O or a thread, it counts as idle too, so a clock-measured
timeout around such a wait fires at once: use it for logic driven by time, not to
wait for a socket.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable


class FakeTimer:
    """A pending virtual callback."""

    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], object]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A clock that only moves when a test says so (virtual time)."""

    __slots__ = ("_autojump", "_jumper", "_mono", "_seq", "_timers", "_wall")

    def __init__(
        self,
        start_wall: float = 1_700_000_000.0,
        start_mono: float = 1000.0,
        *,
        autojump: bool = False,
    ) -> None:
        self._wall = start_wall
        self._mono = start_mono
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._seq = itertools.count()
        self._autojump = autojump
        self._jumper: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<FakeClock monotonic={self._mono:g} pending={self.pending()}>"

    def now(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def call_later(self, seconds: float, callback: Callable[[], object]) -> FakeTimer:
        timer = FakeTimer(self._mono + max(0.0, seconds), callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._seq), timer))
        if self._autojump and (self._jumper is None or self._jumper.done()):
            self._jumper = asyncio.get_running_loop().create_task(self._jump())
        return timer

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        timer = self.call_later(seconds, wake)
        try:
            await future
        finally:
            timer.cancel()

    def pending(self) -> int:
        """Callbacks and sleeps still waiting."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a FakeClock never goes backwards")
        end = self._mono + seconds
        while self._timers and self._timers[0][0] <= end:
            deadline, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._step(deadline - self._mono)
            timer.callback()
        self._step(end - self._mono)

    async def run_for(self, seconds: float, step: float | None = None) -> None:
        """Advance ``seconds`` (in ``step``-sized moves, default one move), letting the
        event loop run everything that became ready after each."""
        remaining = seconds
        while True:
            move = remaining if step is None else min(step, remaining)
            self.advance(move)
            remaining -= move
            await settle()
            if remaining <= 0:
                return

    def next_deadline(self) -> float | None:
        """The monotonic time of the earliest pending timer, if any."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    async def _jump(self) -> None:
        """The autojump task: while timers are pending, wait until the loop has nothing
        else to run (three turns in a row), then advance to the earliest deadline."""
        loop = asyncio.get_running_loop()
        idle = 0
        while self.next_deadline() is not None:
            await asyncio.sleep(0)
            if getattr(loop, "_ready", None):  # another callback is runnable
                idle = 0
                continue
            idle += 1
            due = self.next_deadline()
            if idle >= 3 and due is not None:
                idle = 0
                self.advance(max(0.0, due - self._mono))

    def _step(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds


async def settle(rounds: int = 20) -> None:
    """Let the running loop run what is ready (woken sleeps, their follow-ups)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
