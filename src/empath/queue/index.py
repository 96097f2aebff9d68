"""Due-time ordered index of delivery units (DESIGN §4: never rescan the queue for work).

Theory of operation
-------------------
A binary heap of ``(due_at, seq, key)`` entries plus a dict ``key -> entry`` naming
each key's one live entry (the same tuple object as in the heap, so a queued key costs
one tuple, not two; an entry is live when the dict holds an equal one, compared by value
because mypyc, which compiles this module, unboxes fixed-length tuples, so identity
would not survive it; ``seq`` is unique, so equal means the same schedule).
Rescheduling or removing a key only updates the dict; the old heap entry becomes
stale and is discarded when it reaches the top (lazy deletion).  ``seq`` is a global
counter, so entries with equal due times pop in scheduling order and keys are never
compared.  When stale entries outnumber live ones the heap is rebuilt, which bounds
memory at O(live).

Costs: ``schedule``/``remove``/``__contains__`` O(1) amortised (+ O(log n) push),
``pop_due``/``pop_one`` O(log n) per key returned, ``next_due`` amortised O(1),
``count_due`` O(keys due);
``make_all_due`` O(n log n) (an operator action).

The index is generic over the key type: the scheduler uses :class:`UnitKey`
keys ordered by wall-clock ``next_attempt_at`` and string (domain) keys ordered
by monotonic wake-up times.  The index never reads a clock: ``now`` is passed in.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Any, Final, Generic, NamedTuple, TypeVar

_COMPACT_MIN: Final = 1024  # don't bother rebuilding tiny heaps


class UnitKey(NamedTuple):
    """One (message, recipient domain) delivery unit."""

    message_id: str
    domain: str


K = TypeVar("K", bound=Hashable)

# An entry is ``(due_at, seq, key)``, typed as a variable-length tuple on purpose: mypyc,
# which compiles this module, holds a fixed-length tuple unboxed and boxes it anew for the
# heap and again for the dict (two tuples and two floats per key, 300 bytes instead of 176).
_Entry = tuple[Any, ...]


class DueIndex(Generic[K]):
    """Keys ordered by due time; pop the due ones earliest first."""

    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._live: dict[K, _Entry] = {}
        self._seq = itertools.count()

    def schedule(self, key: K, due_at: float) -> None:
        """Make ``key`` due at ``due_at`` (replacing any earlier schedule of it)."""
        entry: _Entry = (due_at, next(self._seq), key)
        self._live[key] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > _COMPACT_MIN and len(self._heap) > 2 * len(self._live):
            self._compact()

    def remove(self, key: K) -> bool:
        """Forget ``key``; True if it was scheduled."""
        return self._live.pop(key, None) is not None

    def due_at(self, key: K) -> float | None:
        entry = self._live.get(key)
        if entry is None:
            return None
        due: float = entry[0]
        return due

    def pop_one(self, now: float) -> K | None:
        """Remove and return the earliest key due at or before ``now``, if any."""
        heap = self._heap
        live = self._live
        while heap:
            entry = heap[0]
            key: K = entry[2]
            if live.get(key) != entry:
                heapq.heappop(heap)  # stale
                continue
            if entry[0] > now:
                return None
            heapq.heappop(heap)
            del live[key]
            return key
        return None

    def pop_due(self, now: float, limit: int) -> list[K]:
        """Remove and return up to ``limit`` keys due at or before ``now``, earliest first."""
        out: list[K] = []
        while len(out) < limit:
            key = self.pop_one(now)
            if key is None:
                break
            out.append(key)
        return out

    def next_due(self) -> float | None:
        """The earliest due time, or None when empty."""
        heap = self._heap
        live = self._live
        while heap:
            entry = heap[0]
            if live.get(entry[2]) == entry:
                due: float = entry[0]
                return due
            heapq.heappop(heap)
        return None

    def count_due(self, now: float, limit: int) -> int:
        """How many keys are due at or before ``now``, counting up to ``limit``.

        Walks only the heap entries due by ``now`` (a subtree whose root is later is
        skipped whole), so it costs O(due entries), not O(len), and stops at ``limit``."""
        heap = self._heap
        live = self._live
        count = 0
        stack = [0] if heap else []
        while stack and count < limit:
            i = stack.pop()
            entry = heap[i]
            if entry[0] > now:
                continue
            if live.get(entry[2]) == entry:
                count += 1
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(heap):
                    stack.append(child)
        return count

    def make_all_due(self, now: float) -> int:
        """Make every key due at ``now`` at the latest (``queue process-now``).

        Keys keep their relative order.  Returns how many keys were moved earlier.
        """
        future = sorted(entry for entry in self._live.values() if entry[0] > now)
        for _due, _seq, key in future:
            self._live[key] = (now, next(self._seq), key)
        self._compact()
        return len(future)

    def _compact(self) -> None:
        self._heap = list(self._live.values())
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def __bool__(self) -> bool:
        return bool(self._live)
