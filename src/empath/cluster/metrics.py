"""The cluster's metric families, read at scrape time (joins ``EmpathCollector``).

* ``empath_cluster_redis_up`` (gauge): 1 while this node reaches Redis;
* ``empath_cluster_fallback`` (gauge): 1 while this node runs on local limits
  (0 on a node without ``cluster``, as is ``empath_cluster_nodes`` 1);
* ``empath_cluster_fallback_entries_total`` (counter): times it fell back;
* ``empath_cluster_nodes`` (gauge): live nodes as of the last heartbeat;
* ``empath_cluster_redis_roundtrip_seconds`` (histogram): every Redis call;
* ``empath_cluster_redis_errors_total`` (counter): calls that failed or timed out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from empath.observability.metrics import histogram_family

if TYPE_CHECKING:  # no Redis client import on a node without `cluster`
    from empath.cluster.node import ClusterNode


class StandaloneMetrics:
    """Without ``cluster``: a cluster of one node that is never in fallback (so the
    ClusterFallbackMode rule and dashboards have a series on every node)."""

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "empath_cluster_fallback",
            "1 while this node runs on local limits (Redis unreachable)",
            value=0,
        )
        yield GaugeMetricFamily(
            "empath_cluster_nodes", "Live cluster nodes at the last heartbeat", value=1
        )


class ClusterMetrics:
    """A ``MetricsSource`` over one node's cluster state."""

    def __init__(self, node: ClusterNode) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        node = self._node
        state = node.state
        stats = node.backend.stats
        up = node.redis_up and not state.fallback
        yield GaugeMetricFamily(
            "empath_cluster_redis_up", "1 while this node reaches Redis", value=1 if up else 0
        )
        yield GaugeMetricFamily(
            "empath_cluster_fallback",
            "1 while this node runs on local limits (Redis unreachable)",
            value=1 if state.fallback else 0,
        )
        yield CounterMetricFamily(
            "empath_cluster_fallback_entries",
            "Times this node fell back to local limits",
            value=state.fallback_entries,
        )
        yield GaugeMetricFamily(
            "empath_cluster_nodes",
            "Live cluster nodes at the last heartbeat",
            value=state.node_count,
        )
        yield histogram_family(
            "empath_cluster_redis_roundtrip_seconds",
            "Round trip of each Redis call of the shared policy state",
            [((), stats.rtt.snapshot())],
        )
        yield CounterMetricFamily(
            "empath_cluster_redis_errors",
            "Redis calls that failed or timed out",
            value=stats.errors,
        )
