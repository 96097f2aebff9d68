"""Operator views over the queue: unit filters, "why is it waiting", the per-domain summary.

Pure functions over :class:`~empath.spool.model.MessageState` snapshots and a
:class:`WaitContext` (what the scheduler and the policy know right now), so they
are tested without a daemon:

* :class:`UnitFilter` / :func:`select` — the units `queue hold|release|delete|bounce`
  act on (``--domain``, ``--sender``, ``--status``, ``--older-than``);
* :func:`waiting_for` — every reason a queued unit is not being attempted now
  (hold, suspension, retry time, open breaker, rate limit, connection cap);
* :func:`attempt_counts` — for `queue retry`/`process-now`: of the units made due,
  how many can really start now and how many stay waiting, by reason;
* :func:`shapes` / :func:`summary_rows` — Postfix's qshape / KumoMTA's queue-summary:
  per destination the units by status and age bucket (from the spool index's counts,
  not a walk of the queue) with the domain's limits, throughput and blocks.
"""

from __future__ import annotations

import bisect
import heapq
import math
import time
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from empath.policy.breaker import BreakerInfo, BreakerState
from empath.policy.ratelimit import RateLimit
from empath.queue.scheduler import (
    Block,
    DeferBreaker,
    DeferRateLimit,
    Suspended,
    WaitForConnection,
)
from empath.queue.suspend import Suspension
from empath.spool.index import STATUS_SLOT, DomainCounts, MessageView, UnitView
from empath.spool.model import UnitState, UnitStatus

# qshape's buckets (minutes): 0-5, 5-10, 10-20, ..., 640-1280, 1280+
AGE_BUCKETS_MIN: Final = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
AGE_LABELS: Final = (*(f"{m}m" for m in AGE_BUCKETS_MIN), "older")
_BUCKET_S: Final = tuple(m * 60.0 for m in AGE_BUCKETS_MIN)
_WAITING: Final = frozenset({UnitStatus.PENDING, UnitStatus.RETRY})
SUMMARY_STATUSES: Final = ("pending", "retry", "in_progress", "held", "failed", "expired")


# --- filters -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnitFilter:
    """Which units a bulk command acts on; every given criterion must hold."""

    domain: str | None = None
    sender: str | None = None  # exact (case-insensitive), "@domain" for a domain, "<>" null
    status: str | None = None
    older_than_s: float | None = None

    @property
    def empty(self) -> bool:
        return (
            self.domain is None
            and self.sender is None
            and self.status is None
            and self.older_than_s is None
        )

    def describe(self) -> str:
        parts = []
        if self.domain is not None:
            parts.append(f"domain {self.domain}")
        if self.sender is not None:
            parts.append(f"sender {self.sender}")
        if self.status is not None:
            parts.append(f"status {self.status}")
        if self.older_than_s is not None:
            parts.append(f"older than {self.older_than_s:g}s")
        return ", ".join(parts) or "every unit"


def sender_matches(pattern: str, sender: str) -> bool:
    pattern = pattern.lower()
    sender = sender.lower()
    if pattern in ("<>", ""):
        return sender == ""
    if pattern.startswith("@"):
        return sender.endswith(pattern)
    return sender == pattern.strip("<>")


def select(
    messages: Iterable[MessageView],
    flt: UnitFilter,
    now: float,
    in_flight: Container[tuple[str, str]],
) -> Iterator[tuple[MessageView, list[str]]]:
    """(message, domains of its units that match), oldest message first."""
    domain = flt.domain.lower() if flt.domain else None
    for msg in messages:
        env = msg.envelope
        if flt.sender is not None and not sender_matches(flt.sender, env.sender):
            continue
        if flt.older_than_s is not None and now - env.received_at < flt.older_than_s:
            continue
        hits = []
        for unit in msg.units:
            if domain is not None and unit.domain != domain:
                continue
            if flt.status is not None:
                status = unit.status.value
                if (msg.id, unit.domain) in in_flight:
                    status = UnitStatus.IN_PROGRESS.value
                if status != flt.status:
                    continue
            hits.append(unit.domain)
        if hits:
            yield msg, hits


# --- why is it waiting ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaitContext:
    """What the scheduler and the policy know now, for :func:`waiting_for`."""

    now: float  # wall clock
    mono: float  # monotonic, the clock of breaker and line times
    in_flight: Container[tuple[str, str]]
    suspensions: Mapping[str, Suspension]
    breakers: Mapping[str, BreakerInfo]
    blocked: Callable[[str], Block | None]
    limit_for: Callable[[str], RateLimit]
    tokens: Callable[[str], float | None]  # None: not known here (cluster)
    connections: Callable[[str], int]
    max_connections: Callable[[str], int]

    def wall(self, mono: float) -> float:
        return self.now + (mono - self.mono)


@dataclass(frozen=True, slots=True)
class Reason:
    """One thing that keeps a unit from being attempted now."""

    kind: str  # held | in_flight | suspended | retry_time | breaker | rate_limit | connections
    text: str
    until: float | None = None  # wall clock, when known
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "until": self.until, **self.fields}


_stamps: dict[int, str] = {}


def _stamp(at: float | None) -> str:
    """UTC to the second (memoised: a summary formats thousands of nearby times)."""
    if at is None or math.isinf(at):
        return "until resumed"
    key = int(at)
    text = _stamps.get(key)
    if text is None:
        if len(_stamps) > 4096:
            _stamps.clear()
        text = _stamps[key] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(key))
    return text


def domain_reasons(domain: str, ctx: WaitContext) -> list[Reason]:
    """What holds every due unit of ``domain`` now (suspension, breaker, line)."""
    out: list[Reason] = []
    s = ctx.suspensions.get(domain)
    if s is not None and s.active(ctx.now):
        until = None if math.isinf(s.until) else s.until
        text = f"domain suspended {_stamp(s.until) if until is None else 'until ' + _stamp(until)}"
        if s.reason:
            text += f" ({s.reason})"
        out.append(Reason("suspended", text, until, {"reason": s.reason}))
    info = ctx.breakers.get(domain)
    if info is not None and info.state is BreakerState.OPEN and info.open_until is not None:
        until = ctx.wall(info.open_until)
        out.append(Reason("breaker", f"circuit breaker open until {_stamp(until)}", until))
    elif info is not None and info.state is BreakerState.HALF_OPEN:
        out.append(Reason("breaker", "circuit breaker half-open: one probe at a time"))
    block = ctx.blocked(domain)
    if isinstance(block, DeferRateLimit):
        until = ctx.wall(block.until)
        lim = ctx.limit_for(domain)
        tokens = ctx.tokens(domain)
        text = (
            f"rate limit {lim.messages_per_second:g}/s (burst {lim.burst_size}): "
            f"next token at {_stamp(until)}"
        )
        if tokens is not None:
            text += f", {tokens:.2f} token(s) now"
        out.append(Reason("rate_limit", text, until, {"tokens": tokens}))
    elif isinstance(block, WaitForConnection):
        n = ctx.connections(domain)
        out.append(
            Reason(
                "connections",
                f"connection cap: {n} of max_connections {block.max_connections} in use",
                None,
                {"in_use": n, "max_connections": block.max_connections},
            )
        )
    elif isinstance(block, DeferBreaker) and not any(r.kind == "breaker" for r in out):
        out.append(Reason("breaker", f"circuit breaker {block.state.value}"))
    elif isinstance(block, Suspended) and not any(r.kind == "suspended" for r in out):
        out.append(Reason("suspended", "domain suspended"))
    return out


def waiting_for(
    msg_id: str, unit: UnitState, ctx: WaitContext, domain_level: list[Reason] | None = None
) -> list[Reason]:
    """Every reason ``unit`` is not being attempted now; [] when it is due and free to
    start (or in flight, or finished)."""
    if unit.status.terminal:
        return []
    if (msg_id, unit.domain) in ctx.in_flight:
        return [Reason("in_flight", "being attempted now")]
    out: list[Reason] = []
    if unit.status is UnitStatus.HELD:
        out.append(Reason("held", "held by the operator (empathctl queue release)"))
    elif unit.next_attempt_at > ctx.now:
        at = unit.next_attempt_at
        out.append(Reason("retry_time", f"next retry at {_stamp(at)}", at))
    out += domain_reasons(unit.domain, ctx) if domain_level is None else domain_level
    return out


def attempt_counts(
    units: Iterable[tuple[str, UnitView]], ctx: WaitContext, free_slots: int
) -> tuple[int, dict[str, int]]:
    """For units about to be made due (`queue retry`, `process-now`): how many can start
    now, and how many stay waiting by reason (held, suspended, breaker, rate_limit,
    connections, max_concurrent_deliveries)."""
    by_domain: dict[str, int] = {}
    stay: Counter[str] = Counter()
    for msg_id, unit in units:
        if unit.status.terminal or (msg_id, unit.domain) in ctx.in_flight:
            continue
        if unit.status is UnitStatus.HELD:
            stay["held"] += 1
            continue
        by_domain[unit.domain] = by_domain.get(unit.domain, 0) + 1
    now_total = 0
    for domain, count in by_domain.items():
        n = count
        reasons = domain_reasons(domain, ctx)
        kinds = {r.kind for r in reasons}
        blocking = next((k for k in ("suspended", "breaker") if k in kinds), None)
        if blocking == "breaker" and ctx.breakers[domain].state is BreakerState.HALF_OPEN:
            stay["breaker"] += n - 1
            n = 1
        elif blocking is not None:
            stay[blocking] += n
            continue
        free_conn = max(0, ctx.max_connections(domain) - ctx.connections(domain))
        lim = ctx.limit_for(domain)
        tokens = ctx.tokens(domain)
        cap = n
        if not lim.unlimited and tokens is not None:
            cap = min(cap, int(tokens + 1e-9))
            stay["rate_limit"] += n - cap
        take = min(cap, free_conn)
        stay["connections"] += cap - take
        now_total += take
    if now_total > free_slots:
        stay["max_concurrent_deliveries"] += now_total - free_slots
        now_total = free_slots
    return now_total, {k: v for k, v in stay.items() if v}


# --- queue summary -------------------------------------------------------------------

# A domain's shape is a flat list of counts, built from the spool index's per-domain
# counts (no walk of the queue: O(domains), plus the arrival minutes of the rows shown):
# [total, pending, retry, in_progress, held, age bucket 0, ..., age bucket n]
_AGES_AT: Final = 5
_SHAPE_LEN: Final = _AGES_AT + len(AGE_LABELS)
_IN_PROGRESS_AT: Final = 1 + STATUS_SLOT[UnitStatus.IN_PROGRESS]
Shape = list[int]


def age_bucket(age_s: float) -> int:
    """Index into :data:`AGE_LABELS` of an age in seconds."""
    return bisect.bisect_right(_BUCKET_S, age_s)


def _shape(counts: DomainCounts, now: float) -> Shape:
    """A domain's shape; a message's age is taken from the start of the minute it
    arrived in (at most 59 s more than its own)."""
    out = [counts.units, *counts.by_status, *([0] * len(AGE_LABELS))]
    right = bisect.bisect_right
    buckets = _BUCKET_S
    for minute, n in counts.by_minute.items():
        out[_AGES_AT + right(buckets, now - minute * 60.0)] += n
    return out


@dataclass(frozen=True, slots=True)
class Shapes:
    """What `queue summary` shows: the ranked domains' shapes and the totals."""

    ranked: list[tuple[str, Shape]]  # most queued units first (ties by name)
    total: Shape  # over every domain
    domain_count: int


def shapes(
    domains: Mapping[str, DomainCounts],
    now: float,
    in_flight: Iterable[tuple[str, str]],
    get: Callable[[str], MessageView | None],
    limit: int | None,
    *,
    status_counts: Mapping[UnitStatus, int],
    minutes: Mapping[int, int],
) -> Shapes:
    """The ``limit`` domains with most queued units (all with None) and the totals, from
    the spool index's counts (``status_counts`` and ``minutes``: every domain's units by
    stored status and by arrival minute); units in flight move from their stored status
    to in_progress."""
    if limit is None:
        top = sorted(domains.items(), key=lambda kv: (-kv[1].units, kv[0]))
    else:
        top = heapq.nsmallest(limit, domains.items(), key=lambda kv: (-kv[1].units, kv[0]))
    ranked = [(d, _shape(c, now)) for d, c in top]
    total = [0] * _SHAPE_LEN
    for status, at in STATUS_SLOT.items():
        total[1 + at] = status_counts.get(status, 0)
    total[0] = sum(total[1:_AGES_AT])
    right = bisect.bisect_right
    buckets = _BUCKET_S
    for minute, n in minutes.items():
        total[_AGES_AT + right(buckets, now - minute * 60.0)] += n
    shown = dict(ranked)
    for msg_id, domain in in_flight:
        msg = get(msg_id)
        unit = next((u for u in msg.units if u.domain == domain), None) if msg else None
        slot = None if unit is None else STATUS_SLOT.get(unit.status)
        if slot is None or 1 + slot == _IN_PROGRESS_AT:
            continue
        for row in (total, shown.get(domain)):
            if row is not None:
                row[1 + slot] -= 1
                row[_IN_PROGRESS_AT] += 1
    return Shapes(ranked, total, len(domains))


def shown(
    ranked: list[tuple[str, Shape]],
    queued: Container[str],
    suspended: Iterable[str],
    limit: int | None,
) -> list[tuple[str, Shape]]:
    """The summary's domains: ``ranked``, then suspended domains with nothing queued
    (not in ``queued``), at most ``limit`` in all."""
    out = list(ranked)
    empty = [0] * _SHAPE_LEN
    out += [(d, empty) for d in sorted(suspended) if d not in queued]
    return out if limit is None else out[:limit]


def summary_rows(
    ranked: Iterable[tuple[str, Shape]],
    ctx: WaitContext,
    delivered_last_min: Mapping[str, int],
) -> list[dict[str, Any]]:
    """The summary's rows of these domains, in order."""
    rows = []
    closed = BreakerState.CLOSED.value
    for domain, d in ranked:
        lim = ctx.limit_for(domain)
        reasons = domain_reasons(domain, ctx)
        kinds = {r.kind for r in reasons}
        info = ctx.breakers.get(domain)
        rows.append(
            {
                "domain": domain,
                "total": d[0],
                "by_status": {
                    "pending": d[1],
                    "retry": d[2],
                    "in_progress": d[3],
                    "held": d[4],
                },
                "ages": d[_AGES_AT:],
                "rate_per_s": None if lim.unlimited else lim.messages_per_second,
                "burst": None if lim.unlimited else lim.burst_size,
                "max_connections": ctx.max_connections(domain),
                "connections": ctx.connections(domain),
                "delivered_last_min": delivered_last_min.get(domain, 0),
                "throttled": "rate_limit" in kinds,
                "suspended": "suspended" in kinds,
                "breaker": info.state.value if info else closed,
                "waiting_for": [r.text for r in reasons],
            }
        )
    return rows
