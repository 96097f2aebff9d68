"""The spool's in-memory index of live messages, with its counts kept as it changes.

Every change of a live message's unit states goes through :class:`MessageIndex`
(commit, update, remove, recovery), so it keeps what `empathctl queue stats` shows
without rescanning the queue: units per stored status, non-terminal units per
domain, and the oldest message with a non-terminal unit.  Each change costs a few
dictionary operations per unit of the old and the new snapshot; the oldest message
comes from a heap pruned lazily (entries of messages that finished or went are
dropped when they reach the top, and the heap is rebuilt when stale entries
outnumber the live ones).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import ItemsView, Iterator, Mapping, ValuesView

from empath.spool.model import MessageState, UnitStatus

_PRUNE_SLACK = 1024  # stale heap entries tolerated beyond the live ones


class MessageIndex:
    """Live messages by id (insertion order: oldest first) plus their counts."""

    __slots__ = ("_by_id", "_domains", "_heap", "_live", "_status")

    def __init__(self, messages: Mapping[str, MessageState] | None = None) -> None:
        self._by_id: dict[str, MessageState] = {}
        self._status: dict[UnitStatus, int] = dict.fromkeys(UnitStatus, 0)
        self._domains: Counter[str] = Counter()
        self._heap: list[tuple[float, str]] = []
        self._live = 0  # messages with a non-terminal unit
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
        """The ``n`` domains with the most non-terminal units, most first."""
        return self._domains.most_common(n)

    def domain_counts(self) -> dict[str, int]:
        return dict(self._domains)

    def oldest(self) -> MessageState | None:
        """The oldest (by ``received_at``, then id) message with a non-terminal unit."""
        heap = self._heap
        while heap:
            msg = self._by_id.get(heap[0][1])
            if msg is not None and not msg.finished:
                return msg
            heapq.heappop(heap)
        return None

    def _count(self, msg: MessageState) -> bool:
        """Add ``msg``'s units to the counts; whether it has a non-terminal one."""
        status = self._status
        domains = self._domains
        live = False
        for unit in msg.units:
            st = unit.status
            status[st] += 1
            if not st.terminal:
                domains[unit.domain] += 1
                live = True
        return live

    def _forget(self, msg: MessageState) -> bool:
        """Take ``msg``'s units out of the counts; whether it was live.  Its heap entry
        stays until it reaches the top or the heap is rebuilt."""
        status = self._status
        domains = self._domains
        live = False
        for unit in msg.units:
            st = unit.status
            status[st] -= 1
            if not st.terminal:
                live = True
                left = domains[unit.domain] - 1
                if left:
                    domains[unit.domain] = left
                else:
                    del domains[unit.domain]
        if live:
            self._live -= 1
        return live

    def _rebuild_heap(self) -> None:
        self._heap = [
            (m.envelope.received_at, mid) for mid, m in self._by_id.items() if not m.finished
        ]
        heapq.heapify(self._heap)
