"""How often a throttled domain is logged: ``Rate limit exceeded`` without a flood.

Theory of operation
-------------------
Every unit that waits for a rate-limit token is counted in
``empath_delivery_rate_limited_total{domain}`` (exact) and reported by the
scheduler.  A log line per unit would write a line per message of a backlog --
100,000 lines for a 100,000-message backlog to one slow domain -- so the runner
asks :class:`DeferralLog` first.  A domain's first deferral is logged at once (the
runbook's ``|= "Rate limit exceeded" | json | fields_domain="$DOMAIN"`` finds the
domain as soon as it is throttled); after that at most one line per ``interval_s``
per domain, carrying how many units were deferred since the previous line
(``deferred``).  Counts held back when the domain stops being throttled are not
logged; the metric has them.

Memory is one small record per domain logged within the last interval (older
records are dropped once there are more than ``max_domains``).  Pure: the clock is
injected, nothing is written here.
"""

from __future__ import annotations

from typing import Final

from empath.clock import Clock

RATE_LOG_INTERVAL_S: Final = 10.0  # one "Rate limit exceeded" line per domain at most this often
_MAX_DOMAINS: Final = 10_000


class DeferralLog:
    """Per-domain log budget; see the module docstring."""

    __slots__ = ("_clock", "_domains", "_interval_s", "_max_domains")

    def __init__(
        self,
        clock: Clock,
        interval_s: float = RATE_LOG_INTERVAL_S,
        max_domains: int = _MAX_DOMAINS,
    ) -> None:
        self._clock = clock
        self._interval_s = interval_s
        self._max_domains = max_domains
        self._domains: dict[str, list[float]] = {}  # domain -> [last logged (mono), held]

    def note(self, domain: str, count: int = 1) -> int:
        """``count`` units of ``domain`` were deferred now.  Returns how many to report in
        a line written now (the held ones included), or 0: stay quiet."""
        now = self._clock.monotonic()
        rec = self._domains.get(domain)
        if rec is not None and now - rec[0] < self._interval_s:
            rec[1] += count
            return 0
        held = 0 if rec is None else int(rec[1])
        if rec is None and len(self._domains) >= self._max_domains:
            self._forget_quiet(now)
        self._domains[domain] = [now, 0.0]
        return held + count

    def _forget_quiet(self, now: float) -> None:
        """Drop domains whose interval has passed (a new deferral logs them at once)."""
        quiet = [d for d, rec in self._domains.items() if now - rec[0] >= self._interval_s]
        for d in quiet:
            del self._domains[d]

    def __len__(self) -> int:
        return len(self._domains)
