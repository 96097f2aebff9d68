"""Retry schedule: when a temporarily failed unit is tried again, and when we give up.

Theory of operation
-------------------
After a unit's attempt fails temporarily, the runner asks :meth:`RetryPolicy.decide`
with the number of attempts made so far (including the one that just failed), the
message's acceptance time and the current wall-clock time.  The answer is either
:class:`Retry` (``at`` is the wall-clock ``next_attempt_at`` to store in the spool) or
:class:`GiveUp` with the reason the unit ends (``"max_attempts"`` -> failed,
``"expired"`` -> expired).  Permanent failures never reach this module: they are
never retried (DESIGN §4).

The delay before attempt *n + 1* after *n* attempts is (DESIGN §4)::

    delay = min(base * 2^(n-1), max) ± jitter      jitter ~ U(-f, +f) * delay

with *f* the jitter factor; the result is never negative.  Jitter spreads the
retries of a burst of units that failed together (e.g. a remote outage) so they do
not all return at the same instant.

Expiry is judged after an attempt, so every unit gets an attempt at or before its
deadline: a retry that would fall after ``received_at + expiration_s`` is clipped
to the deadline, and a failure at or after the deadline gives up as ``"expired"``.
``max_attempts`` is checked first: a unit whose last allowed attempt just failed is
``"max_attempts"`` even if it is also past its deadline.

Pure: no clock is read here; the caller passes ``now`` (wall clock, seconds since
the epoch) and may inject a seeded :class:`random.Random` for reproducible tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final, Literal

_MAX_EXPONENT: Final = 62  # 2**62 * any sane base is far beyond any max delay

GiveUpReason = Literal["max_attempts", "expired"]


@dataclass(frozen=True, slots=True)
class Retry:
    """Try the unit again at wall-clock time ``at`` (seconds since the epoch)."""

    at: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop retrying: ``"max_attempts"`` (unit failed) or ``"expired"`` (unit expired)."""

    reason: GiveUpReason


RetryDecision = Retry | GiveUp


class RetryPolicy:
    """The retry schedule of DESIGN §4 (``delivery.max_attempts``, ``*_retry_delay_secs``,
    ``retry_jitter_factor``, ``message_expiration_secs``)."""

    __slots__ = (
        "_rng",
        "base_delay_s",
        "expiration_s",
        "jitter_factor",
        "max_attempts",
        "max_delay_s",
    )

    def __init__(
        self,
        base_delay_s: float,
        max_delay_s: float,
        jitter_factor: float,
        max_attempts: int,
        expiration_s: float,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if base_delay_s < 0 or max_delay_s < 0:
            raise ValueError("retry delays must not be negative")
        if not 0.0 <= jitter_factor <= 1.0:
            raise ValueError("retry_jitter_factor must be within [0, 1]")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if expiration_s <= 0:
            raise ValueError("message_expiration_secs must be positive")
        self.base_delay_s = float(base_delay_s)
        self.max_delay_s = float(max_delay_s)
        self.jitter_factor = float(jitter_factor)
        self.max_attempts = int(max_attempts)
        self.expiration_s = float(expiration_s)
        self._rng = rng if rng is not None else random.Random()

    def base_delay_for(self, attempt_n: int) -> float:
        """The un-jittered delay after ``attempt_n`` attempts: min(base * 2^(n-1), max)."""
        if attempt_n < 1:
            raise ValueError("attempt numbers start at 1")
        exponent = min(attempt_n - 1, _MAX_EXPONENT)
        return min(self.base_delay_s * float(1 << exponent), self.max_delay_s)

    def delay_for(self, attempt_n: int) -> float:
        """The jittered delay in seconds after ``attempt_n`` attempts (never negative)."""
        delay = self.base_delay_for(attempt_n)
        if self.jitter_factor:
            delay += delay * self.jitter_factor * self._rng.uniform(-1.0, 1.0)
        return max(0.0, delay)

    def deadline(self, received_at: float) -> float:
        """Wall-clock time after which a message accepted at ``received_at`` has expired."""
        return received_at + self.expiration_s

    def is_expired(self, received_at: float, now: float) -> bool:
        """True once ``message_expiration_secs`` have passed since acceptance."""
        return now >= received_at + self.expiration_s

    def decide(
        self, unit_attempts_after_this_one: int, first_received_at: float, now: float
    ) -> RetryDecision:
        """What to do after a temporary failure; attempts count includes the failed one."""
        if unit_attempts_after_this_one >= self.max_attempts:
            return GiveUp("max_attempts")
        deadline = self.deadline(first_received_at)
        if now >= deadline:
            return GiveUp("expired")
        at = now + self.delay_for(max(1, unit_attempts_after_this_one))
        return Retry(min(at, deadline))
