"""DKIM metric families, read at scrape time (joins ``EmpathCollector`` as a source).

* ``empath_dkim_signatures_total{domain,algorithm,result}`` (counter): signatures made
  (``ok``), failed (``error``: the message got 451) and not made because the message
  already had one with the same ``d=``/``s=`` (``skipped``); ``domain`` is capped by
  ``metrics.max_domain_cardinality`` like every domain label;
* ``empath_dkim_sign_duration_seconds`` (histogram): signing one message with all its
  selectors, including the hand-over to the signing thread;
* ``empath_dkim_key_published{domain,selector,algorithm}`` (gauge): 1 when the last DNS
  check found the selector's public key published and matching, 0 when not; one
  series per selector that signs now and was checked (alert DkimKeyNotPublished).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric

from empath.observability.metrics import counter_family, histogram_family

if TYPE_CHECKING:
    from empath.dkim.service import DkimService


class DkimMetrics:
    """A ``MetricsSource`` over the DKIM service."""

    def __init__(self, service: DkimService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        stats = self._service.signer.stats
        yield counter_family(
            "empath_dkim_signatures",
            "DKIM signatures at acceptance by signing domain, algorithm and result",
            ("domain", "algorithm", "result"),
            stats.signatures,
        )
        yield histogram_family(
            "empath_dkim_sign_duration_seconds",
            "Time to DKIM-sign one message with all its selectors",
            [((), stats.duration.snapshot())],
        )
        published = GaugeMetricFamily(
            "empath_dkim_key_published",
            "1 when the selector's DNS record matches its private key at the last check",
            labels=("domain", "selector", "algorithm"),
        )
        for domain, selector, algorithm, value in self._service.published_gauges():
            published.add_metric((domain, selector, algorithm), value)
        yield published
