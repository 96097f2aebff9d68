"""The delivery runner's wake-up timer (queue/runner.py ``_arm_timer``): under load a tick
runs for every message, and the timer stays armed across them instead of being moved each
time; a unit due sooner than the armed timer still gets its own, earlier one; the
heartbeat ticks go on once the timer has fired."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from empath.app import App
from empath.config.model import Config, SpoolConfig
from empath.queue.index import UnitKey
from empath.testing.clock import FakeClock, FakeTimer, settle


class CountingClock(FakeClock):
    """A FakeClock noting the delay of every timer it arms."""

    def __init__(self) -> None:
        super().__init__()
        self.armed: list[float] = []

    def call_later(self, seconds: float, callback: Callable[[], object]) -> FakeTimer:
        self.armed.append(seconds)
        return super().call_later(seconds, callback)


def runner_app(tmp_path: Path) -> tuple[App, CountingClock]:
    clock = CountingClock()
    config = Config(hostname="mx.test", spool=SpoolConfig(type="Memory", path=str(tmp_path)))
    return App(config, clock=clock), clock


async def test_ticks_in_a_row_keep_the_armed_timer(tmp_path: Path) -> None:
    app, clock = runner_app(tmp_path)
    await app.spool.open()
    app.runner.start()
    await settle()
    armed = len(clock.armed)
    for _ in range(100):
        app.runner._tick()  # what every delivered message does
    assert armed == len(clock.armed)
    await app.runner.drain(timeout_s=1)


async def test_a_unit_due_before_the_armed_timer_runs_on_time(tmp_path: Path) -> None:
    app, clock = runner_app(tmp_path)
    await app.spool.open()
    app.runner.start()
    await settle()  # the heartbeat timer is armed (1 s)
    key = UnitKey("01JZZZZZZZZZZZZZZZZZZZZZZZ", "x.test")
    app.runner.scheduler.add(key, clock.now() + 0.3)
    app.runner._tick()
    assert 0.3 == round(clock.armed[-1], 6)
    await clock.run_for(0.29)
    assert 1 == app.runner.scheduler.stats().scheduled
    await clock.run_for(0.02)
    await settle()
    assert 0 == app.runner.scheduler.stats().scheduled  # dispatched (the message is gone)
    await app.runner.drain(timeout_s=1)


async def test_the_heartbeat_goes_on_after_the_timer_fires(tmp_path: Path) -> None:
    app, clock = runner_app(tmp_path)
    await app.spool.open()
    app.runner.start()
    await settle()
    ticks = app.runner.scheduler.heartbeat().ticks
    await clock.run_for(5.0, step=0.5)
    assert ticks + 5 <= app.runner.scheduler.heartbeat().ticks
    await app.runner.drain(timeout_s=1)
