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

from prometheus_client.core import Metric

from empath.modules.host import ModuleStats
from empath.observability.metrics import counter_family, histogram_family

__all__ = ["ModuleMetrics"]


class ModuleMetrics:
    """A ``MetricsSource`` over the daemon's :class:`ModuleStats` (kept across reloads)."""

    def __init__(self, stats: ModuleStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        yield counter_family(
            "empath_module_calls",
            "Calls into modules and milters by hook and result",
            ("module", "hook", "result"),
            stats.calls,
        )
        yield histogram_family(
            "empath_module_duration_seconds",
            "Duration of each call into a module or milter",
            [
                ((("module", module), ("hook", hook)), hist.snapshot())
                for (module, hook), hist in sorted(stats.durations.items())
            ],
        )
        yield counter_family(
            "empath_milter_errors",
            "Milter connections that failed, by kind (connect, timeout, closed, protocol)",
            ("milter", "kind"),
            stats.milter_errors,
        )
        yield counter_family(
            "empath_module_events_dropped",
            "Delivery events dropped because the module's queue was full",
            ("module",),
            {(module,): n for module, n in stats.dropped.items()},
        )
