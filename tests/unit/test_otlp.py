"""OtlpPusher: exports run off the event loop, overlapping pushes are skipped, and the
Prometheus families convert to OpenTelemetry's data model with the same names and values."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from opentelemetry.sdk.metrics.export import Gauge, Histogram, MetricExportResult, Sum
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from empath.clock import SystemClock
from empath.observability.otlp import OtlpPusher, to_otlp
from empath.testing.clock import FakeClock, settle


class Families:
    def collect(self) -> Any:
        c = CounterMetricFamily("empath_x", "x", labels=["domain"])
        c.add_metric(["a.test"], 3)
        yield c
        yield GaugeMetricFamily("empath_g", "g", value=0.5)
        h = HistogramMetricFamily("empath_h_seconds", "h", labels=["query_type"])
        h.add_metric(["MX"], [("0.1", 1.0), ("1.0", 3.0), ("+Inf", 4.0)], 2.5)
        yield h


def test_families_convert_with_prometheus_names_and_values() -> None:
    metrics = {m.name: m for m in to_otlp(Families().collect(), 1, 2)}
    assert {"empath_x_total", "empath_g", "empath_h_seconds"} == metrics.keys()
    x = metrics["empath_x_total"].data
    assert isinstance(x, Sum) and x.is_monotonic
    assert ({"domain": "a.test"}, 3.0) == (dict(x.data_points[0].attributes or {}),
                                           x.data_points[0].value)  # fmt: skip
    g = metrics["empath_g"].data
    assert isinstance(g, Gauge) and 0.5 == g.data_points[0].value
    h = metrics["empath_h_seconds"].data
    assert isinstance(h, Histogram)
    (p,) = h.data_points
    assert ([0.1, 1.0], [1, 2, 1], 4, 2.5) == (list(p.explicit_bounds), list(p.bucket_counts),
                                               p.count, p.sum)  # fmt: skip


class BlockingExporter:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def export(self, data: Any, timeout_millis: float = 0) -> MetricExportResult:
        self.calls += 1
        self.release.wait(10)
        return MetricExportResult.SUCCESS


def test_a_slow_collector_never_blocks_the_loop_and_pushes_do_not_pile_up() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())
    exporter = BlockingExporter()

    async def go() -> None:
        pusher = OtlpPusher(
            registry, "http://127.0.0.1:9/v1/metrics", 15.0, service_instance="t",
            clock=SystemClock(), exporter=exporter,  # type: ignore[arg-type]
        )  # fmt: skip
        first = asyncio.create_task(pusher.push_once())
        ticks = 0
        for _ in range(20):  # the loop keeps running while the export blocks its thread
            await asyncio.sleep(0)
            ticks += 1
        assert 20 == ticks
        assert not first.done()
        assert await pusher.push_once() is None  # skipped: one push at a time
        exporter.release.set()
        assert await first is True
        assert 1 == exporter.calls
        await pusher.close()

    asyncio.run(go())


class CountingExporter:
    def __init__(self) -> None:
        self.calls = 0

    def export(self, data: Any, timeout_millis: float = 0) -> MetricExportResult:
        self.calls += 1
        return MetricExportResult.SUCCESS


def test_the_push_loop_runs_once_per_interval_in_virtual_time() -> None:
    """The loop waits on the injected clock: no push before the interval, one per
    interval after it, without any real waiting."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())
    exporter = CountingExporter()
    clock = FakeClock()

    async def calls_reach(n: int) -> None:
        for _ in range(500_000):  # the export runs on a thread: poll the loop, bounded
            if exporter.calls >= n:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"{exporter.calls} pushes, expected {n}")

    async def go() -> None:
        pusher = OtlpPusher(
            registry, "http://127.0.0.1:9/v1/metrics", 15.0, service_instance="t",
            clock=clock, exporter=exporter,  # type: ignore[arg-type]
        )  # fmt: skip
        pusher.start(lambda coro, *, name, essential=False: asyncio.create_task(coro, name=name))
        await settle()  # the loop is waiting on the clock
        await clock.run_for(14.0)
        assert 0 == exporter.calls
        await clock.run_for(1.0)
        await calls_reach(1)
        await clock.run_for(15.0)
        await calls_reach(2)
        assert 2 == exporter.calls
        await pusher.close()

    asyncio.run(go())
