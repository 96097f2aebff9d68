"""The module metric families (DESIGN §14), read from :class:`ModuleStats` at scrape time.

* ``empath_module_calls_total{module,hook,result}``: every call into a module or
  milter; ``result`` is continue, accept, reject, tempfail, changes, discard,
  timeout or error (the last two are the failures ``on_error`` answered);
* ``empath_module_duration_seconds{module,hook}``: how long each call took;
* ``empath_milter_errors_total{milter,kind}``: milter connections that failed
  (``connect``, ``timeout``, ``closed``, ``protocol``);
* ``empath_module_events_dropped_total{module}``: delivery events dropped because
  the module's queue was full.

Label values come from the config (module names), so they are escaped.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from empath.modules.host import ModuleStats
from empath.observability.metrics import histogram_family

__all__ = ["ModuleMetrics"]


class ModuleMetrics:
    """A ``MetricsSource`` over the daemon's :class:`ModuleStats` (kept across reloads)."""

    def __init__(self, stats: ModuleStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        calls = CounterMetricFamily(
            "empath_module_calls",
            "Calls into modules and milters by hook and result",
            labels=("module", "hook", "result"),
        )
        for (module, hook, result), n in sorted(stats.calls.items()):
            calls.add_metric((module, hook, result), n)
        yield calls
        yield histogram_family(
            "empath_module_duration_seconds",
            "Duration of each call into a module or milter",
            [
                ((("module", module), ("hook", hook)), hist.snapshot())
                for (module, hook), hist in sorted(stats.durations.items())
            ],
        )
        errors = CounterMetricFamily(
            "empath_milter_errors",
            "Milter connections that failed, by kind (connect, timeout, closed, protocol)",
            labels=("milter", "kind"),
        )
        for (milter, kind), n in sorted(stats.milter_errors.items()):
            errors.add_metric((milter, kind), n)
        yield errors
        dropped = CounterMetricFamily(
            "empath_module_events_dropped",
            "Delivery events dropped because the module's queue was full",
            labels=("module",),
        )
        for module, n in sorted(stats.dropped.items()):
            dropped.add_metric((module,), n)
        yield dropped
