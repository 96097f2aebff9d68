"""SMTP AUTH metric families, read at scrape time (joins ``EmpathCollector``).

* ``empath_smtp_auth_attempts_total{mechanism,result}`` (counter): every AUTH
  exchange that got an answer; ``result`` is ``success``, ``failure`` (bad
  credentials), ``blocked`` (the client's address was blocked: 454) or ``busy``
  (too many checks waiting: 454);
* ``empath_smtp_auth_blocked_total{reason}`` (counter): refusals and slow-downs by
  the abuse limits: ``ip`` (an AUTH from a blocked address), ``login`` (a failure
  answered late because its login is under attack), ``overload``, ``quota`` (a
  message over the user's hourly quota).

Every series starts at 0 (on every daemon, so dashboards and alert rules find them;
without a submission listener they stay 0), so ``rate()`` and ``increase()`` see the
first event.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client.core import CounterMetricFamily, Metric

__all__ = ["AuthMetrics", "AuthStats"]

_MECHANISMS: Final = ("PLAIN", "LOGIN")
_RESULTS: Final = ("success", "failure", "blocked", "busy")
_REASONS: Final = ("ip", "login", "overload", "quota")


class AuthStats:
    """Counters for the metrics collector (plain ints; event-loop thread only)."""

    __slots__ = ("attempts", "blocked")

    def __init__(self) -> None:
        self.attempts: dict[tuple[str, str], int] = {}  # (mechanism, result) → n
        self.blocked: dict[str, int] = {}  # reason (ip | login | overload | quota) → n

    def attempt(self, mechanism: str, result: str) -> None:
        key = (mechanism, result)
        self.attempts[key] = self.attempts.get(key, 0) + 1

    def block(self, reason: str) -> None:
        self.blocked[reason] = self.blocked.get(reason, 0) + 1


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
