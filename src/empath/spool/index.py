"""The spool's in-memory index of live messages, with its counts kept as it changes.

Every change of a live message's unit states goes through :class:`MessageIndex`
(commit, update, remove, recovery), so it keeps what `empathctl queue stats` and
`queue summary` show without rescanning the queue: units per stored status; per
domain, its non-terminal units by status and by the minute their message arrived
(:class:`DomainCounts`, qshape's picture in O(domains)); and the oldest message with a
unit that waits for delivery (held units do not wait: the operator keeps them, so they
neither age the queue's oldest nor raise OldestMessageAgeHigh).  Each change costs a few
dictionary operations per unit of the old and the new snapshot; the oldest message
comes from a heap pruned lazily (entries of messages that finished, went or are all
held are dropped when they reach the top, and the heap is rebuilt when stale entries
outnumber the live ones).
"""

from __future__ import annotations

import heapq
from collections.abc import ItemsView, Iterator, Mapping, ValuesView
from typing import Final

from empath.spool.model import MessageState, UnitStatus

_PRUNE_SLACK = 1024  # stale heap entries tolerated beyond the live ones
_HELD: Final = UnitStatus.HELD
# where each non-terminal status is counted in DomainCounts.by_status
STATUS_SLOT: Final = {
    UnitStatus.PENDING: 0,
    UnitStatus.RETRY: 1,
    UnitStatus.IN_PROGRESS: 2,  # never stored; the caller moves units in flight here
    UnitStatus.HELD: 3,
}


class DomainCounts:
    """One domain's non-terminal units: how many, by status (:data:`STATUS_SLOT`) and by
    the wall-clock minute their message arrived (``received_at // 60``)."""

    __slots__ = ("by_minute", "by_status", "units")

    def __init__(self) -> None:
        self.units = 0
        self.by_status = [0, 0, 0, 0]
        self.by_minute: dict[int, int] = {}

    def copy(self) -> DomainCounts:
        new = DomainCounts()
        new.units = self.units
        new.by_status = list(self.by_status)
        new.by_minute = dict(self.by_minute)
        return new


def _waits(msg: MessageState) -> bool:
    """Whether a unit of ``msg`` waits for delivery (non-terminal and not held)."""
    return any(not u.status.terminal and u.status is not _HELD for u in msg.units)


class MessageIndex:
    """Live messages by id (insertion order: oldest first) plus their counts."""

    __slots__ = ("_by_id", "_domains", "_heap", "_live", "_status")

    def __init__(self, messages: Mapping[str, MessageState] | None = None) -> None:
        self._by_id: dict[str, MessageState] = {}
        self._status: dict[UnitStatus, int] = dict.fromkeys(UnitStatus, 0)
        self._domains: dict[str, DomainCounts] = {}
        self._heap: list[tuple[float, str]] = []
        self._live = 0  # messages with a waiting unit (in the heap)
        if messages:
            for msg_id, msg in messages.items():
                self[msg_id] = msg

    # -- the mapping ----------------------------------------------------------

    def __setitem__(self, msg_id: str, msg: MessageState) -> None:
        old = self._by_id.get(msg_id)
        self._by_id[msg_id] = msg
        was_live = False
        if old is not None:
            was_live = self._forget(old)
        if self._count(msg):
            self._live += 1
            if not was_live:
                heapq.heappush(self._heap, (msg.envelope.received_at, msg_id))
                if len(self._heap) > 2 * self._live + _PRUNE_SLACK:
                    self._rebuild_heap()

    def pop(self, msg_id: str, default: MessageState | None = None) -> MessageState | None:
        old = self._by_id.pop(msg_id, None)
        if old is None:
            return default
        self._forget(old)
        return old

    def __getitem__(self, msg_id: str) -> MessageState:
        return self._by_id[msg_id]

    def get(self, msg_id: str) -> MessageState | None:
        return self._by_id.get(msg_id)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def values(self) -> ValuesView[MessageState]:
        return self._by_id.values()

    def items(self) -> ItemsView[str, MessageState]:
        return self._by_id.items()

    # -- the counts -----------------------------------------------------------

    def status_counts(self) -> dict[UnitStatus, int]:
        """Units per stored status (``in_progress`` is the caller's: never stored)."""
        return dict(self._status)

    def top_domains(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` domains with the most non-terminal units, most first (ties by name)."""
        best = heapq.nsmallest(n, self._domains.items(), key=lambda kv: (-kv[1].units, kv[0]))
        return [(d, c.units) for d, c in best]

    def domain_counts(self) -> dict[str, int]:
        return {d: c.units for d, c in self._domains.items()}

    def domains(self) -> Mapping[str, DomainCounts]:
        """Every domain with a non-terminal unit and its counts (live: copy what you
        keep across an ``await``)."""
        return self._domains

    def oldest(self) -> MessageState | None:
        """The oldest (by ``received_at``, then id) message with a unit that waits for
        delivery: non-terminal and not held."""
        heap = self._heap
        while heap:
            msg = self._by_id.get(heap[0][1])
            if msg is not None and _waits(msg):
                return msg
            heapq.heappop(heap)
        return None

    def _count(self, msg: MessageState) -> bool:
        """Add ``msg``'s units to the counts; whether one of them waits (non-terminal,
        not held)."""
        status = self._status
        domains = self._domains
        slots = STATUS_SLOT
        minute = int(msg.envelope.received_at // 60)
        waits = False
        for unit in msg.units:
            st = unit.status
            status[st] += 1
            slot = slots.get(st)
            if slot is None:
                continue  # terminal
            row = domains.get(unit.domain)
            if row is None:
                row = domains[unit.domain] = DomainCounts()
            row.units += 1
            row.by_status[slot] += 1
            ages = row.by_minute
            ages[minute] = ages.get(minute, 0) + 1
            if st is not _HELD:
                waits = True
        return waits

    def _forget(self, msg: MessageState) -> bool:
        """Take ``msg``'s units out of the counts; whether one of them waited.  Its heap
        entry stays until it reaches the top or the heap is rebuilt."""
        status = self._status
        domains = self._domains
        slots = STATUS_SLOT
        minute = int(msg.envelope.received_at // 60)
        waited = False
        for unit in msg.units:
            st = unit.status
            status[st] -= 1
            slot = slots.get(st)
            if slot is None:
                continue
            if st is not _HELD:
                waited = True
            row = domains[unit.domain]
            row.units -= 1
            if not row.units:
                del domains[unit.domain]
                continue
            row.by_status[slot] -= 1
            ages = row.by_minute
            left = ages[minute] - 1
            if left:
                ages[minute] = left
            else:
                del ages[minute]
        if waited:
            self._live -= 1
        return waited

    def _rebuild_heap(self) -> None:
        self._heap = [(m.envelope.received_at, mid) for mid, m in self._by_id.items() if _waits(m)]
        heapq.heapify(self._heap)
