"""What a node's local view asks of Redis (one Lua script call each, cluster/backend.py),
and the breaker records Redis answers the node's loop with.

Plain data, made by the pure views (cluster/view.py, cluster/breakers.py) and sent by
the asker (cluster/asker.py), which hands each answer back to the view.  ``epoch`` is
the view's count of returns from fallback when the ask was made: an ask of an older
epoch that fails does not send the node back into fallback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TakeTokens:
    domain: str
    rate: float  # messages per second
    burst: int
    batch: int
    epoch: int


@dataclass(frozen=True, slots=True)
class AcquireSlots:
    domain: str
    max_connections: int
    lease_s: float
    members: tuple[str, ...]
    epoch: int


@dataclass(frozen=True, slots=True)
class ReleaseSlots:
    domain: str
    members: tuple[str, ...]
    epoch: int


@dataclass(frozen=True, slots=True)
class ClaimProbe:
    domain: str
    token: str
    lease_s: float
    epoch: int


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    domain: str
    token: str
    success: bool
    success_threshold: int
    epoch: int


@dataclass(frozen=True, slots=True)
class CountFailure:
    domain: str
    member: str
    token: str  # the probe this failure ends, or ""
    threshold: int
    window_s: float
    open_s: float
    epoch: int


Ask = TakeTokens | AcquireSlots | ReleaseSlots | ClaimProbe | ProbeOutcome | CountFailure


@dataclass(frozen=True, slots=True)
class BreakerRecord:
    """One non-Closed breaker as Redis holds it; times relative to Redis's now."""

    half_open: bool  # "half" in Redis (or Open past its end, which the next claim turns)
    open_left_s: float  # > 0 while Open
    probe_left_s: float  # > 0 while some node's probe is out


__all__ = [
    "AcquireSlots",
    "Ask",
    "BreakerRecord",
    "ClaimProbe",
    "CountFailure",
    "ProbeOutcome",
    "ReleaseSlots",
    "TakeTokens",
]
