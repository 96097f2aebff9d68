"""SMTP AUTH metric families, read at scrape time (joins ``EmpathCollector``).

* ``empath_smtp_auth_attempts_total{mechanism,result}`` (counter): every AUTH
  exchange that got an answer; ``result`` is ``success``, ``failure`` (bad
  credentials), ``blocked`` (the client's address was blocked: 454) or ``busy``
  (too many checks waiting: 454);
* ``empath_smtp_auth_blocked_total{reason}`` (counter): refusals and slow-downs by
  the abuse limits: ``ip`` (an AUTH from a blocked address), ``login`` (a failure
  answered late because its login is under attack), ``overload``, ``quota`` (a
  message over the user's hourly quota).

Every series starts at 0 on a daemon with a submission listener, so ``rate()`` and
``increase()`` see the first event.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client.core import CounterMetricFamily, Metric

from empath.submission.authenticator import AuthStats

__all__ = ["AuthMetrics"]

_MECHANISMS: Final = ("PLAIN", "LOGIN")
_RESULTS: Final = ("success", "failure", "blocked", "busy")
_REASONS: Final = ("ip", "login", "overload", "quota")


class AuthMetrics:
    """A ``MetricsSource`` over the authenticators' shared :class:`AuthStats`."""

    def __init__(self, stats: AuthStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        attempts = CounterMetricFamily(
            "empath_smtp_auth_attempts",
            "SMTP AUTH exchanges answered, by mechanism and result",
            labels=["mechanism", "result"],
        )
        seen = {(m, r): 0 for m in _MECHANISMS for r in _RESULTS}
        seen.update(self._stats.attempts)
        for (mechanism, result), n in sorted(seen.items()):
            attempts.add_metric([mechanism, result], n)
        yield attempts
        blocked = CounterMetricFamily(
            "empath_smtp_auth_blocked",
            "SMTP AUTH refusals and slow-downs by the abuse limits, by reason",
            labels=["reason"],
        )
        reasons = dict.fromkeys(_REASONS, 0)
        reasons.update(self._stats.blocked)
        for reason, n in sorted(reasons.items()):
            blocked.add_metric([reason], n)
        yield blocked
