"""What `empathctl queue ...` shows, computed from the spool's live messages.

Pure functions over :class:`~empath.spool.model.MessageState` snapshots plus the
set of units in flight (the only source of ``in_progress``: it is never written
to disk).  Iteration follows the spool's order, oldest message first, and is
done in chunks so the daemon's event loop gets control back between them.

A list row is a compact JSON array (the wire form, rendered by the CLI):
``[id, domain, status, attempts, age_s, next_attempt_at | null, sender, rcpts,
last_error]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from empath.spool.index import MessageIndex, MessageView
from empath.spool.model import MessageState, RcptStatus, RecipientState, UnitState, UnitStatus

LIST_CHUNK: Final = 1000  # rows per streamed frame
SCAN_CHUNK: Final = 20_000  # units looked at between yields to the event loop
TOP_DOMAINS: Final = 10
STATUSES: Final = tuple(s.value for s in UnitStatus)
_TERMINAL: Final = frozenset(s for s in UnitStatus if s.terminal)

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


def list_rows(
    messages: Iterable[MessageView],
    flt: ListFilter,
    now: float,
    in_flight: Container[tuple[str, str]],
) -> Iterator[list[Row]]:
    """Chunks of rows, oldest first; empty chunks mark a long scan (yield points).

    The loop is written flat (no helper calls per unit): it is what a full
    ``queue list`` of a large queue costs the daemon's event loop.
    """
    want_status = flt.status
    want_domain = flt.domain.lower() if flt.domain else None
    left = flt.limit if flt.limit is not None else -1
    busy = bool(in_flight)
    in_progress = UnitStatus.IN_PROGRESS
    waiting = (UnitStatus.PENDING, UnitStatus.RETRY)
    chunk: list[Row] = []
    scanned = 0
    for msg in messages:
        mid = msg.id
        env = msg.envelope
        for unit in msg.units:
            scanned += 1
            domain = unit.domain
            if want_domain is not None and domain != want_domain:
                continue
            status = unit.status
            if busy and (mid, domain) in in_flight:
                status = in_progress
            if want_status is not None and status != want_status:
                continue
            nxt = unit.next_attempt_at
            chunk.append(
                [
                    mid,
                    domain,
                    status,
                    unit.attempts,
                    round(now - env.received_at, 3),
                    nxt if nxt > now and status in waiting else None,
                    env.sender,
                    unit.rcpt_count,
                    unit.last_error,
                ]
            )
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


def count_messages(counts: QueueCounts, messages: Sequence[MessageView]) -> None:
    """Add a chunk of the spool (oldest first) to ``counts``: the full recount that
    :func:`index_counts` must always equal (tests hold them side by side)."""
    units = [u for m in messages for u in m.units]
    for status, n in Counter([u.status for u in units]).items():
        counts.by_status[status.value] += n
    counts.domains.update([u.domain for u in units if u.status not in _TERMINAL])
    counts.messages += len(messages)
    for msg in messages:
        if any(
            u.status not in _TERMINAL and u.status is not UnitStatus.HELD for u in msg.units
        ) and (
            counts.oldest_at is None
            or (msg.envelope.received_at, msg.id) < (counts.oldest_at, counts.oldest_id or "")
        ):
            counts.oldest_at = msg.envelope.received_at
            counts.oldest_id = msg.id


def index_counts(index: MessageIndex) -> QueueCounts:
    """The counts the spool's index keeps as units change state: O(statuses + domains)."""
    by_status = Counter({s.value: n for s, n in index.status_counts().items()})
    oldest = index.oldest()
    return QueueCounts(
        by_status,
        Counter(dict(index.top_domains(TOP_DOMAINS))),
        None if oldest is None else oldest.envelope.received_at,
        None if oldest is None else oldest.id,
        len(index),
    )


def count_in_flight(
    counts: QueueCounts,
    in_flight: Iterable[tuple[str, str]],
    get: Callable[[str], MessageView | None],
) -> None:
    """Move the (few) units in flight from their stored status to ``in_progress``."""
    for mid, domain in in_flight:
        msg = get(mid)
        unit = next((u for u in msg.units if u.domain == domain), None) if msg else None
        if unit is not None and not unit.status.terminal:
            counts.by_status[unit.status.value] -= 1
            counts.by_status[UnitStatus.IN_PROGRESS.value] += 1


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
        "auth_user": env.auth_user,  # DESIGN §13: the SMTP AUTH user, None when anonymous
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
