"""What `empathctl queue ...` shows, computed from the spool's live messages.

Pure functions over :class:`~empath.spool.model.MessageState` snapshots plus the
set of units in flight (the only source of ``in_progress``: it is never written
to disk).  Iteration follows the spool's order, oldest message first, and is
done in chunks so the daemon's event loop gets control back between them.

A list row is a compact JSON array (the wire form, rendered by the CLI):
``[id, domain, status, attempts, age_s, next_attempt_at | null, sender, rcpts]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Final

from empath.spool.model import MessageState, RcptStatus, RecipientState, UnitState, UnitStatus

LIST_CHUNK: Final = 1000  # rows per streamed frame
SCAN_CHUNK: Final = 20_000  # units looked at between yields to the event loop
TOP_DOMAINS: Final = 10
STATUSES: Final = tuple(s.value for s in UnitStatus)

Row = list[Any]


@dataclass(frozen=True, slots=True)
class ListFilter:
    status: str | None = None
    domain: str | None = None
    limit: int | None = None


def unit_status(msg_id: str, unit: UnitState, in_flight: Container[tuple[str, str]]) -> str:
    if (msg_id, unit.domain) in in_flight:
        return UnitStatus.IN_PROGRESS.value
    return unit.status.value


def row(msg: MessageState, unit: UnitState, status: str, now: float) -> Row:
    nxt = unit.next_attempt_at
    waiting = status in ("pending", "retry") and nxt > now
    return [
        msg.id,
        unit.domain,
        status,
        unit.attempts,
        round(max(0.0, now - msg.envelope.received_at), 3),
        nxt if waiting else None,
        msg.envelope.sender,
        len(unit.recipients),
    ]


def list_rows(
    messages: Iterable[MessageState],
    flt: ListFilter,
    now: float,
    in_flight: Container[tuple[str, str]],
) -> Iterator[list[Row]]:
    """Chunks of rows, oldest first; empty chunks mark a long scan (yield points)."""
    want_status = flt.status
    want_domain = flt.domain.lower() if flt.domain else None
    left = flt.limit if flt.limit is not None else -1
    chunk: list[Row] = []
    scanned = 0
    for msg in messages:
        for unit in msg.units:
            scanned += 1
            if want_domain is not None and unit.domain != want_domain:
                continue
            status = unit_status(msg.id, unit, in_flight)
            if want_status is not None and status != want_status:
                continue
            chunk.append(row(msg, unit, status, now))
            left -= 1
            if left == 0:
                yield chunk
                return
            if len(chunk) >= LIST_CHUNK:
                yield chunk
                chunk = []
        if scanned >= SCAN_CHUNK:
            scanned = 0
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(slots=True)
class QueueCounts:
    """Accumulated over a scan of the spool."""

    by_status: Counter[str]
    domains: Counter[str]  # non-terminal units per domain
    oldest_at: float | None = None
    oldest_id: str | None = None
    messages: int = 0


def new_counts() -> QueueCounts:
    return QueueCounts(Counter(dict.fromkeys(STATUSES, 0)), Counter())


def count_messages(
    counts: QueueCounts, messages: Iterable[MessageState], in_flight: Container[tuple[str, str]]
) -> None:
    """Add ``messages`` to ``counts`` (call once per chunk of the spool)."""
    by_status = counts.by_status
    domains = counts.domains
    for msg in messages:
        counts.messages += 1
        live = False
        for unit in msg.units:
            status = unit_status(msg.id, unit, in_flight)
            by_status[status] += 1
            if not unit.status.terminal:
                domains[unit.domain] += 1
                live = True
        if live:
            at = msg.envelope.received_at
            if counts.oldest_at is None or at < counts.oldest_at:
                counts.oldest_at = at
                counts.oldest_id = msg.id


def reopen(unit: UnitState, now: float) -> UnitState:
    """`queue retry` on a failed or expired unit: due now, failed recipients pending
    again, a fresh expiry window from ``now``; the attempt count is kept."""
    recipients = tuple(
        RecipientState(r.address, RcptStatus.PENDING, r.code, r.text)
        if r.status is RcptStatus.FAILED
        else r
        for r in unit.recipients
    )
    return replace(
        unit,
        recipients=recipients,
        status=UnitStatus.RETRY,
        next_attempt_at=now,
        finished_at=0.0,
        reopened_at=now,
    )


def view(msg: MessageState, in_flight: Container[tuple[str, str]], now: float) -> dict[str, Any]:
    """Everything `queue view` shows except the body (read separately)."""
    env = msg.envelope
    return {
        "id": msg.id,
        "sender": env.sender,
        "recipients": list(env.recipients),
        "received_at": env.received_at,
        "age_s": round(max(0.0, now - env.received_at), 3),
        "size": env.size,
        "peer": env.peer,
        "helo": env.helo,
        "is_dsn": env.is_dsn,
        "units": [
            {
                "domain": u.domain,
                "status": unit_status(msg.id, u, in_flight),
                "attempts": u.attempts,
                "next_attempt_at": None if u.status.terminal else (u.next_attempt_at or None),
                "last_error": u.last_error,
                "recipients": [
                    {"address": r.address, "status": r.status.value, "code": r.code, "text": r.text}
                    for r in u.recipients
                ],
                "history": [
                    {"at": a.at, "mx": a.mx, "code": a.code, "text": a.text} for a in u.history
                ],
            }
            for u in msg.units
        ],
    }


def split_preview(head: bytes, preview_bytes: int) -> tuple[str, str, bool]:
    """(headers, body preview, truncated) from the first bytes of a stored body."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        headers, body = head, b""
    else:
        headers, body = head[:end], head[end + 4 :]
    truncated = len(body) > preview_bytes
    return (
        headers.decode("utf-8", "replace"),
        body[:preview_bytes].decode("utf-8", "replace"),
        truncated,
    )
