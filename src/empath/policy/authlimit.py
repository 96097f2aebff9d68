"""Brute-force limits and per-user quotas of SMTP AUTH (DESIGN §13); pure, clock-injected.

Theory of operation
-------------------
Failed AUTH attempts are counted in sliding windows of ``window_s``, one window per
client IP key (an IPv4 address, or the /64 of an IPv6 one: a customer's allocation is
one client) and one per login name.

* **IP**: the failure that brings an IP to ``max_failures_per_ip`` blocks it for
  ``block_s``; while blocked its AUTH gets ``454 4.7.0`` at once, and no password
  is checked (no hash is computed for it either).
* **Login**: past ``max_failures_per_login`` failures (from anywhere) in the
  window, each further failure is answered only after ``delay_s`` times the excess
  (at most ``max_delay_s``).  The login is never locked: the right password is
  answered at once, so its owner still gets in while a botnet spread over many
  addresses guesses slowly.  The price: a distributed attack that stays under the
  per-IP limit on each address keeps guessing, at one guess per delay per
  connection; the per-IP block and the argon2 cost bound what that buys.

A success records the login's last login time (for ``empathctl user list``); it
does not clear failures, so an attacker cannot reset the window by interleaving a
known password of another account (counts are per login, and per IP).

:class:`MessageQuota` is the per-user hourly message quota: a sliding window of
the last hour's admitted MAIL commands, checked and recorded at MAIL.

Memory is bounded: each key's window is 60 counting buckets at most, and there are
at most ``MAX_KEYS`` keys per window (the oldest key is forgotten first).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_KEYS",
    "AuthLimitSettings",
    "AuthLimiter",
    "FailureVerdict",
    "LoginStatus",
    "MessageQuota",
]

MAX_KEYS: Final = 100_000
_HOUR_S: Final = 3600.0


@dataclass(frozen=True, slots=True)
class AuthLimitSettings:
    window_s: float = 600.0
    max_failures_per_ip: int = 10
    block_s: float = 900.0
    max_failures_per_login: int = 5
    delay_s: float = 1.0
    max_delay_s: float = 10.0


@dataclass(frozen=True, slots=True)
class FailureVerdict:
    delay_s: float  # wait this long before answering 535
    ip_blocked: bool  # this failure blocked the IP (log and count it once)
    login_slowed: bool  # the login is past its limit


@dataclass(frozen=True, slots=True)
class LoginStatus:
    failures: int  # in the window
    slowed: bool
    last_login: float | None  # wall-clock seconds of the last success


class _Windows:
    """Failure counts per key in a sliding window, bounded in keys and per key.

    Each key keeps ``[bucket, count]`` pairs, a bucket being 1/60 of the window, so a
    key costs at most 61 pairs however many failures it has (a login under attack
    from a botnet sees thousands).  A bucket counts until it has left the window
    entirely: a failure is remembered for between one window and one window plus a
    sixtieth."""

    __slots__ = ("_bucket_s", "_keys", "_window_s")

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._bucket_s = window_s / 60
        self._keys: dict[str, deque[list[int]]] = {}

    def count(self, key: str, now: float) -> int:
        q = self._keys.get(key)
        if q is None:
            return 0
        # buckets that ended at or before the window's edge are gone
        first = math.floor((now - self._window_s) / self._bucket_s)
        while q and q[0][0] < first:
            q.popleft()
        if not q:
            del self._keys[key]
            return 0
        return sum(c for _, c in q)

    def add(self, key: str, now: float) -> int:
        q = self._keys.get(key)
        if q is None:
            if len(self._keys) >= MAX_KEYS:
                del self._keys[next(iter(self._keys))]
            q = self._keys[key] = deque()
        bucket = math.floor(now / self._bucket_s)
        if q and q[-1][0] == bucket:
            q[-1][1] += 1
        else:
            q.append([bucket, 1])
        return self.count(key, now)

    def forget(self, key: str) -> bool:
        return self._keys.pop(key, None) is not None


class AuthLimiter:
    """See module doc.  ``now`` is the monotonic clock; ``wall`` (for last-login
    times shown to people) the wall clock."""

    __slots__ = ("_blocked", "_ip", "_last_login", "_login", "settings")

    def __init__(self, settings: AuthLimitSettings) -> None:
        self.settings = settings
        self._ip = _Windows(settings.window_s)
        self._login = _Windows(settings.window_s)
        self._blocked: dict[str, float] = {}  # ip key → blocked until (monotonic)
        self._last_login: dict[str, float] = {}

    def blocked(self, ip_key: str, now: float) -> bool:
        until = self._blocked.get(ip_key)
        if until is None:
            return False
        if now >= until:
            del self._blocked[ip_key]
            return False
        return True

    def block(self, ip_key: str, now: float, seconds: float) -> None:
        """Block an address for ``seconds`` (a block another cluster node decided)."""
        if len(self._blocked) >= MAX_KEYS and ip_key not in self._blocked:
            del self._blocked[next(iter(self._blocked))]
        self._blocked[ip_key] = max(self._blocked.get(ip_key, 0.0), now + seconds)
        self._ip.forget(ip_key)

    def lift(self, ip_key: str) -> None:
        """End an address's block (another cluster node lifted it)."""
        self._blocked.pop(ip_key, None)

    def failed(self, ip_key: str, login: str, now: float) -> FailureVerdict:
        s = self.settings
        ip_failures = self._ip.add(ip_key, now)
        ip_blocked = False
        if ip_failures >= s.max_failures_per_ip and not self.blocked(ip_key, now):
            if len(self._blocked) >= MAX_KEYS:
                del self._blocked[next(iter(self._blocked))]
            self._blocked[ip_key] = now + s.block_s
            self._ip.forget(ip_key)  # counted afresh once the block ends
            ip_blocked = True
        excess = self._login.add(login.lower(), now) - s.max_failures_per_login
        delay = min(s.max_delay_s, excess * s.delay_s) if excess > 0 else 0.0
        return FailureVerdict(delay, ip_blocked, excess > 0)

    def succeeded(self, login: str, wall: float) -> None:
        if len(self._last_login) >= MAX_KEYS and login not in self._last_login:
            del self._last_login[next(iter(self._last_login))]
        self._last_login[login.lower()] = wall

    def login_status(self, login: str, now: float) -> LoginStatus:
        key = login.lower()
        failures = self._login.count(key, now)
        return LoginStatus(
            failures, failures > self.settings.max_failures_per_login, self._last_login.get(key)
        )

    def blocked_ips(self, now: float) -> dict[str, float]:
        """IP key → seconds left."""
        return {k: until - now for k, until in list(self._blocked.items()) if self.blocked(k, now)}

    def unblock(self, key: str) -> bool:
        """Lift a block on an IP key, or forget a login's failures; True if anything was."""
        hit = self._blocked.pop(key, None) is not None
        hit = self._ip.forget(key) or hit
        return self._login.forget(key.lower()) or hit


class MessageQuota:
    """Messages per user per sliding hour (DESIGN §13 per-user quotas)."""

    __slots__ = ("_window",)

    def __init__(self) -> None:
        self._window = _Windows(_HOUR_S)

    def admit(self, user: str, per_hour: int, now: float, others: int = 0) -> bool:
        """Record one message for ``user`` unless ``per_hour`` are already in the window,
        counting ``others`` sent elsewhere (other cluster nodes); 0 means unlimited."""
        if per_hour <= 0:
            return True
        if self._window.count(user, now) + others >= per_hour:
            return False
        self._window.add(user, now)
        return True

    def count(self, user: str, now: float) -> int:
        return self._window.count(user, now)
