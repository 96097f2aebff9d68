"""OTLP/HTTP push of the same metrics ``/metrics`` serves (``metrics.endpoint``).

Every ``push_interval_secs`` the event loop takes one snapshot from the Prometheus
registry (the collector reads the components' counters on the loop, as for a scrape,
so no other thread ever touches them), converts it to OpenTelemetry's metric data
model, and hands it to the OpenTelemetry SDK's OTLP/HTTP exporter on a worker thread:
the HTTP request, its retries and its timeout never run on the loop.  While a push is
still in flight the next one is skipped, so a slow collector costs at most one thread.

Names are the Prometheus sample names (``empath_delivery_attempts_total``,
``empath_delivery_queue_age_seconds``, ...): counters become cumulative monotonic
sums, gauges gauges, histograms explicit-bucket histograms, labels attributes.

A collector that is down costs one WARN line when pushes start failing and one INFO
line when they succeed again, nothing per push, and never mail: the exporter's own
per-failure log records are silenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric as PromMetric

import empath
from empath.clock import Clock
from empath.logs import get_logger
from empath.supervisor import Spawn
from empath.textsafe import redact_url

log = get_logger("health", __name__)

CUMULATIVE = AggregationTemporality.CUMULATIVE


def _attrs(labels: dict[str, str], drop: str = "") -> dict[str, Any]:
    return {k: v for k, v in labels.items() if k != drop}


def _histogram(family: PromMetric, start_ns: int, now_ns: int) -> Metric:
    groups: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for s in family.samples:
        key = tuple(sorted(_attrs(s.labels, "le").items()))
        g = groups.setdefault(key, {"buckets": [], "count": 0, "sum": 0.0})
        if s.name.endswith("_bucket"):
            g["buckets"].append((float(s.labels["le"]), int(s.value)))
        elif s.name.endswith("_count"):
            g["count"] = int(s.value)
        elif s.name.endswith("_sum"):
            g["sum"] = float(s.value)
    points = []
    for key, g in groups.items():
        cumulative = sorted(g["buckets"])
        bounds = [b for b, _ in cumulative if b != float("inf")]
        counts = []
        previous = 0
        for _, n in cumulative:
            counts.append(n - previous)
            previous = n
        points.append(
            HistogramDataPoint(
                attributes=dict(key),
                start_time_unix_nano=start_ns,
                time_unix_nano=now_ns,
                count=g["count"],
                sum=g["sum"],
                bucket_counts=counts,
                explicit_bounds=bounds,
                min=0.0,
                max=0.0,
            )
        )
    return Metric(family.name, family.documentation, "s", Histogram(points, CUMULATIVE))


def to_otlp(families: Iterable[PromMetric], start_ns: int, now_ns: int) -> list[Metric]:
    """Prometheus metric families → OpenTelemetry metrics (see the module docstring)."""
    out: list[Metric] = []
    for family in families:
        if family.type == "histogram":
            out.append(_histogram(family, start_ns, now_ns))
            continue
        by_name: dict[str, list[NumberDataPoint]] = {}
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            by_name.setdefault(s.name, []).append(
                NumberDataPoint(
                    attributes=_attrs(s.labels),
                    start_time_unix_nano=start_ns,
                    time_unix_nano=now_ns,
                    value=float(s.value),
                )
            )
        if family.type == "counter":
            for name, points in by_name.items():
                out.append(Metric(name, family.documentation, None, Sum(points, CUMULATIVE, True)))
        else:
            names = by_name or {family.name: []}
            for name, points in names.items():
                out.append(Metric(name, family.documentation, None, Gauge(points)))
    return out


class OtlpPusher:
    """Pushes snapshots of ``registry`` to ``endpoint``; see the module docstring."""

    def __init__(
        self,
        registry: CollectorRegistry,
        endpoint: str,
        interval_s: float,
        *,
        service_instance: str,
        clock: Clock,
        exporter: OTLPMetricExporter | None = None,
    ) -> None:
        """``clock`` times the push interval (virtual in tests)."""
        self._registry = registry
        self._clock = clock
        self.endpoint = endpoint
        self.interval_s = interval_s
        timeout_s = max(1.0, min(10.0, interval_s))
        self._exporter = exporter or OTLPMetricExporter(endpoint=endpoint, timeout=timeout_s)
        self._timeout_ms = timeout_s * 1000
        self._resource = Resource.create(
            {"service.name": "empath", "service.instance.id": service_instance}
        )
        self._scope = InstrumentationScope("empath", empath.__version__)
        self._start_ns = time.time_ns()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="empath-otlp")
        self._in_flight: asyncio.Future[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        self.failing = False
        self.pushes = 0
        self.failures = 0
        # The exporter logs every failed request itself; one line per outage is ours.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL + 1)

    def start(self, spawn: Spawn) -> None:
        """Start the push loop under the daemon's supervisor."""
        self._task = spawn(self._loop(), name="empath-otlp", essential=True)
        log.info(
            "OTLP metrics push enabled",
            endpoint=redact_url(self.endpoint),
            interval_s=self.interval_s,
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A push the loop was awaiting was cancelled with it (its thread runs on, alone);
        # one started by push_once() elsewhere gets a moment to finish.
        if self._in_flight is not None and not self._in_flight.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._in_flight), 2.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> MetricsData:
        """One snapshot (on the event loop: the collector reads live state)."""
        metrics = to_otlp(self._registry.collect(), self._start_ns, time.time_ns())
        return MetricsData(
            [ResourceMetrics(self._resource, [ScopeMetrics(self._scope, metrics, "")], "")]
        )

    def _export(self, data: MetricsData) -> bool:
        try:
            result = self._exporter.export(data, timeout_millis=self._timeout_ms)
        except Exception:
            return False
        return result is MetricExportResult.SUCCESS

    async def push_once(self) -> bool | None:
        """Push a snapshot; None when the previous push is still running."""
        if self._in_flight is not None and not self._in_flight.done():
            return None
        loop = asyncio.get_running_loop()
        data = self.snapshot()
        self._in_flight = loop.run_in_executor(self._pool, self._export, data)
        ok = await self._in_flight
        self.pushes += 1
        if ok and self.failing:
            self.failing = False
            log.info("OTLP metrics push recovered", endpoint=redact_url(self.endpoint))
        elif not ok:
            self.failures += 1
            if not self.failing:
                self.failing = True
                log.warn(
                    "OTLP metrics push failing; retrying every interval",
                    endpoint=self.endpoint,
                    interval_s=self.interval_s,
                )
        return ok

    async def _loop(self) -> None:
        while True:
            await self._clock.sleep(self.interval_s)
            try:
                await self.push_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("OTLP metrics push crashed")
