"""Metric families of the operator's controls (joins ``EmpathCollector`` as a source).

* ``empath_delivery_domain_suspended{domain}`` (gauge): 1 for each domain suspended
  with `empathctl queue suspend` (cluster-wide when clustered); no series otherwise;
* ``empath_delivery_circuit_breaker_transitions_total{state}`` (counter): breaker
  transitions by the state entered, operator resets (`breaker reset`) included.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from empath.queue.suspend import Suspensions


class OperatorMetrics:
    """A ``MetricsSource`` over the suspensions and the breaker transition counts."""

    def __init__(self, suspensions: Suspensions, transitions: Mapping[str, int]) -> None:
        self._suspensions = suspensions
        self._transitions = transitions

    def collect(self) -> Iterator[Metric]:
        suspended = GaugeMetricFamily(
            "empath_delivery_domain_suspended",
            "1 while deliveries to the domain are suspended by the operator",
            labels=["domain"],
        )
        for domain in sorted(self._suspensions.active()):
            suspended.add_metric([domain], 1)
        yield suspended
        transitions = CounterMetricFamily(
            "empath_delivery_circuit_breaker_transitions",
            "Circuit breaker transitions by the state entered (operator resets included)",
            labels=["state"],
        )
        for state, n in sorted(self._transitions.items()):
            transitions.add_metric([state], n)
        yield transitions
