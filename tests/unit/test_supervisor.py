"""Structured concurrency and virtual time: the supervisor owns every background task;
the janitor, the compactor and the pool's idle timers wait on the injected clock."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from empath.app import App
from empath.config.model import Config, SpoolConfig
from empath.supervisor import Supervisor
from empath.testing.clock import FakeClock, settle


async def test_a_crashing_essential_task_is_logged_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    crashed: list[tuple[str, str]] = []

    async def boom() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("disk on fire")

    async def main() -> None:
        sup = Supervisor(on_crash=lambda name, exc: crashed.append((name, str(exc))))
        sup.spawn(boom(), name="empath-janitor", essential=True)
        sup.spawn(boom(), name="empath-delivery-x")
        await settle()
        assert 0 == len(sup)
        assert 2 == sup.crashes

    with caplog.at_level(logging.ERROR, logger="empath.supervisor"):
        await main()
    assert [("empath-janitor", "disk on fire")] == crashed  # the delivery: logged only
    lines = [r for r in caplog.records if r.getMessage() == "Background task crashed"]
    assert 2 == len(lines)
    fields = [r.__dict__["empath_fields"] for r in lines]
    assert {"empath-janitor", "empath-delivery-x"} == {f["task"] for f in fields}
    assert all("RuntimeError: disk on fire" in f["traceback"] for f in fields)


async def test_shutdown_is_one_call_that_cancels_and_awaits_everything() -> None:
    clock = FakeClock()
    stopped: list[str] = []

    async def forever(name: str) -> None:
        try:
            await clock.sleep(3600)
        finally:
            stopped.append(name)

    async def main() -> None:
        sup = Supervisor(on_crash=lambda name, exc: pytest.fail(f"{name} reported as a crash"))
        for name in ("a", "b", "c"):
            sup.spawn(forever(name), name=name, essential=True)
        await settle()
        assert ["a", "b", "c"] == sup.names()
        await sup.shutdown()
        assert 0 == len(sup)
        assert 0 == sup.crashes

    await main()
    assert ["a", "b", "c"] == sorted(stopped)


def test_fake_clock_fires_timers_in_deadline_order_at_their_deadline() -> None:
    clock = FakeClock()
    seen: list[tuple[str, float]] = []
    start = clock.monotonic()
    clock.call_later(5, lambda: seen.append(("b", clock.monotonic() - start)))
    clock.call_later(2, lambda: seen.append(("a", clock.monotonic() - start)))
    cancelled = clock.call_later(3, lambda: seen.append(("x", 0.0)))
    cancelled.cancel()
    clock.advance(4)
    assert [("a", 2.0)] == seen
    clock.advance(10)
    assert [("a", 2.0), ("b", 5.0)] == seen
    assert 14.0 == clock.monotonic() - start
    assert 0 == clock.pending()


def app_on_fake_clock(tmp_path: Path) -> tuple[App, FakeClock]:
    clock = FakeClock()
    config = Config(hostname="mx.test", spool=SpoolConfig(type="Memory", path=str(tmp_path)))
    return App(config, clock=clock), clock


async def test_the_compactor_runs_every_interval_in_virtual_time(tmp_path: Path) -> None:
    app, clock = app_on_fake_clock(tmp_path)
    calls: list[float] = []

    async def compact(*, include_active: bool = False) -> int:
        calls.append(clock.monotonic())
        return 0

    async def main() -> None:
        app.spool.compact = compact  # type: ignore[method-assign]
        app.supervisor.spawn(app._compact_loop(), name="empath-compactor", essential=True)
        await settle()
        await clock.run_for(89.0, step=1.0)
        assert 2 == len(calls)  # at 30 and 60 s
        await clock.run_for(1.0)
        await app.supervisor.shutdown()

    start = clock.monotonic()
    await main()
    assert [30.0, 60.0, 90.0] == [c - start for c in calls]


async def test_the_janitor_sweeps_every_minute_in_virtual_time(tmp_path: Path) -> None:
    app, clock = app_on_fake_clock(tmp_path)
    sweeps: list[float] = []

    async def purge() -> int:
        sweeps.append(clock.monotonic())
        return 0

    async def main() -> None:
        await app.spool.open()
        app.runner.purge_expired_failures = purge  # type: ignore[method-assign]
        app.runner.start()
        assert "empath-janitor" in app.supervisor.names()
        await settle()
        await clock.run_for(179.0, step=1.0)
        assert 2 == len(sweeps)
        await clock.run_for(1.0)
        assert 3 == len(sweeps)
        await app.runner.drain(timeout_s=1)
        await app.supervisor.shutdown()
        await app.spool.close()

    start = clock.monotonic()
    await main()
    assert [60.0, 120.0, 180.0] == [s - start for s in sweeps]
