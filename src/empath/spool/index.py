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

Decoded or brief (issue 20: RSS per queued unit).  A message is held either decoded
(a :class:`MessageState`: envelope, units, recipients, history) or as a
:class:`Brief`: what the queue's views read (received_at, sender; per unit its
domain, status, attempts, next attempt, recipient count, last error) plus where its
newest unit states are on disk.  ``get`` decodes a brief through the spool's
``decode`` (a read of its records); :meth:`MessageIndex.views` never does, so
`queue list`, the metrics, the runner's start and the janitor walk a large queue
without decoding it.  Recovery yields briefs only; the file spool chills a decoded
message to a brief once its newest state is durable and located and nothing of it
is due soon (fs.py), so what stays decoded is the work in hand.  A brief of a
one-unit message is one object: :class:`Brief` is its own first unit.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

from empath.spool.model import MessageState, UnitState, UnitStatus

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


def _waits(msg: MessageView) -> bool:
    """Whether a unit of ``msg`` waits for delivery (non-terminal and not held)."""
    return any(not u.status.terminal and u.status is not _HELD for u in msg.units)


class UnitView(Protocol):
    """What the queue's views read of a unit (a :class:`UnitState` or a brief)."""

    @property
    def domain(self) -> str: ...
    @property
    def status(self) -> UnitStatus: ...
    @property
    def attempts(self) -> int: ...
    @property
    def next_attempt_at(self) -> float: ...
    @property
    def last_error(self) -> str: ...
    @property
    def finished_at(self) -> float: ...
    @property
    def rcpt_count(self) -> int: ...


class EnvelopeView(Protocol):
    @property
    def sender(self) -> str: ...
    @property
    def received_at(self) -> float: ...


class MessageView(Protocol):
    """What the queue's views read of a message (a :class:`MessageState` or a brief)."""

    @property
    def id(self) -> str: ...
    @property
    def envelope(self) -> EnvelopeView: ...
    @property
    def units(self) -> Sequence[UnitView]: ...
    @property
    def finished(self) -> bool: ...


class UnitBrief:
    """A unit as a brief holds it (see the module doc)."""

    __slots__ = (
        "attempts",
        "domain",
        "finished_at",
        "last_error",
        "next_attempt_at",
        "rcpt_count",
        "status",
    )

    def __init__(
        self,
        domain: str,
        status: UnitStatus,
        attempts: int,
        next_attempt_at: float,
        last_error: str,
        finished_at: float,
        rcpt_count: int,
    ) -> None:
        self.domain = domain
        self.status = status
        self.attempts = attempts
        self.next_attempt_at = next_attempt_at
        self.last_error = last_error
        self.finished_at = finished_at
        self.rcpt_count = rcpt_count


class Brief(UnitBrief):
    """A message not decoded: its own first unit, the others in ``more``; ``state`` is
    where its newest STATE record's JSON is (:func:`pack_state`), 0 when its MSG record
    holds the newest units."""

    __slots__ = ("id", "more", "received_at", "sender", "state")

    def __init__(
        self,
        msg_id: str,
        received_at: float,
        sender: str,
        state: int,
        first: UnitBrief,
        more: tuple[UnitBrief, ...] = (),
    ) -> None:
        super().__init__(
            first.domain,
            first.status,
            first.attempts,
            first.next_attempt_at,
            first.last_error,
            first.finished_at,
            first.rcpt_count,
        )
        self.id = msg_id
        self.received_at = received_at
        self.sender = sender
        self.state = state
        self.more = more

    @property
    def envelope(self) -> Brief:
        return self

    @property
    def units(self) -> tuple[UnitBrief, ...]:
        return (self, *self.more) if self.more else (self,)

    @property
    def finished(self) -> bool:
        return self.status.terminal and all(u.status.terminal for u in self.more)


_STATE_BITS = 40


def pack_state(seg: int, offset: int, length: int) -> int:
    """A STATE record's JSON location (segment, absolute offset, bytes) as one int."""
    if not (0 <= offset < 1 << _STATE_BITS and 0 < length < 1 << 32):
        raise ValueError(f"spool state location out of range: {offset}+{length}")
    return (seg << _STATE_BITS | offset) << 32 | length


def unpack_state(packed: int) -> tuple[int, int, int]:
    length = packed & 0xFFFFFFFF
    packed >>= 32
    return packed >> _STATE_BITS, packed & ((1 << _STATE_BITS) - 1), length


_intern: Callable[[str], str] = sys.intern
_UNIT_STATUS = {s.value: s for s in UnitStatus}
_UNIT_STATUS[UnitStatus.IN_PROGRESS.value] = UnitStatus.PENDING  # a crash's: pending again


def _zero(value: float) -> float:
    return 0.0 if value == 0 else value  # one shared constant for the usual 0


def brief_from_json(msg_id: str, envelope: dict[str, Any], units: list[Any], state: int) -> Brief:
    """The brief of a record's JSON (recovery); raises KeyError/TypeError/ValueError on
    a shape it does not know."""
    try:
        return _brief_fast(msg_id, envelope, units, state)
    except (KeyError, TypeError, AttributeError):
        return _brief_checked(msg_id, envelope, units, state)


def _brief_fast(msg_id: str, envelope: dict[str, Any], units: list[Any], state: int) -> Brief:
    """The records this version writes: every field there, of its type (recovery's hot
    loop: ~1M calls for a large queue)."""
    statuses = _UNIT_STATUS
    intern = _intern
    out = []
    for u in units:
        last_error = u["last_error"]
        nxt = u["next_attempt_at"]
        fin = u["finished_at"]
        out.append(
            UnitBrief(
                intern(u["domain"]),
                statuses[u["status"]],
                u["attempts"],
                0.0 if nxt == 0 else nxt,
                intern(last_error) if last_error else "",
                0.0 if fin == 0 else fin,
                len(u["recipients"]),
            )
        )
    first = out[0] if out else None
    received_at = envelope["received_at"]
    sender = envelope["sender"]
    if first is None or type(received_at) is not float or type(sender) is not str:
        raise TypeError("not this version's shape")
    return Brief(msg_id, received_at, intern(sender), state, first, tuple(out[1:]))


def _brief_checked(msg_id: str, envelope: dict[str, Any], units: list[Any], state: int) -> Brief:
    out = []
    for u in units:
        last_error = u.get("last_error", "")
        out.append(
            UnitBrief(
                _intern(str(u["domain"])),
                _UNIT_STATUS[u.get("status", "pending")],
                int(u.get("attempts", 0)),
                _zero(float(u.get("next_attempt_at", 0.0))),
                _intern(last_error) if last_error else "",
                _zero(float(u.get("finished_at", 0.0))),
                len(u["recipients"]),
            )
        )
    if not out:
        raise ValueError("a message without units")
    sender = envelope["sender"]
    if type(sender) is not str:
        raise TypeError("sender is not a string")
    return Brief(
        msg_id, float(envelope["received_at"]), _intern(sender), state, out[0], tuple(out[1:])
    )


def _unit_brief(u: UnitState) -> UnitBrief:
    last_error = u.last_error
    return UnitBrief(
        u.domain,
        u.status,
        u.attempts,
        u.next_attempt_at,
        _intern(last_error) if last_error else "",
        u.finished_at,
        len(u.recipients),
    )


def brief_of(msg: MessageState, state: int) -> Brief:
    """The brief of a decoded message whose newest units are at ``state`` (0: its MSG)."""
    units = [_unit_brief(u) for u in msg.units]
    env = msg.envelope
    return Brief(msg.id, env.received_at, env.sender, state, units[0], tuple(units[1:]))


Held = MessageState | Brief


class MessageIndex:
    """Live messages by id (insertion order: oldest first) plus their counts."""

    __slots__ = (
        "_by_id",
        "_decode",
        "_domains",
        "_heap",
        "_hot",
        "_live",
        "_minutes",
        "_status",
    )

    def __init__(
        self,
        messages: Mapping[str, Held] | None = None,
        *,
        decode: Callable[[Brief], MessageState] | None = None,
    ) -> None:
        """``decode`` turns a brief into its message (the file spool reads its records);
        an index without one holds decoded messages only."""
        self._by_id: dict[str, Held] = {}
        self._decode = decode
        self._status: dict[UnitStatus, int] = dict.fromkeys(UnitStatus, 0)
        self._domains: dict[str, DomainCounts] = {}
        self._minutes: dict[int, int] = {}  # non-terminal units by arrival minute, all domains
        self._heap: list[tuple[float, str]] = []
        self._live = 0  # messages with a waiting unit (in the heap)
        self._hot = 0  # messages held decoded
        if messages:
            for msg_id, msg in messages.items():
                self[msg_id] = msg

    @classmethod
    def adopt(
        cls, briefs: dict[str, Brief], decode: Callable[[Brief], MessageState]
    ) -> MessageIndex:
        """An index of recovery's briefs (ids oldest first), taking ``briefs`` over
        rather than copying it: one pass for the counts, one heapify."""
        index = cls(decode=decode)
        index._by_id = briefs  # type: ignore[assignment]  # dict is invariant; only read as Held
        heap = index._heap
        count = index._count
        for msg_id, brief in briefs.items():
            if count(brief):
                heap.append((brief.received_at, msg_id))
        heapq.heapify(heap)
        index._live = len(heap)
        return index

    # -- the mapping ----------------------------------------------------------

    def __setitem__(self, msg_id: str, msg: Held) -> None:
        if type(msg) is Brief and self._decode is None:
            raise TypeError("this index cannot decode a brief")
        old = self._by_id.get(msg_id)
        self._by_id[msg_id] = msg
        if type(msg) is not Brief:
            self._hot += 1
        was_live = False
        if old is not None:
            was_live = self._forget(old)
        if self._count(msg):
            self._live += 1
            if not was_live:
                heapq.heappush(self._heap, (msg.envelope.received_at, msg_id))
                if len(self._heap) > 2 * self._live + _PRUNE_SLACK:
                    self._rebuild_heap()

    def chill(self, msg_id: str, msg: MessageState, state: int) -> bool:
        """Hold ``msg`` as a brief whose newest units are at ``state``, if it is still
        this message's newest snapshot (same object).  The counts do not change."""
        if self._decode is None or self._by_id.get(msg_id) is not msg:
            return False
        self._by_id[msg_id] = brief_of(msg, state)
        self._hot -= 1
        return True

    def pop(self, msg_id: str, default: MessageState | None = None) -> MessageState | None:
        old = self._by_id.pop(msg_id, None)
        if old is None:
            return default
        self._forget(old)
        return self._decoded(old)

    def forget(self, msg_id: str) -> bool:
        """``pop`` without decoding what it drops; whether it was there."""
        old = self._by_id.pop(msg_id, None)
        if old is None:
            return False
        self._forget(old)
        return True

    def _decoded(self, msg: Held) -> MessageState:
        if type(msg) is Brief:
            assert self._decode is not None
            return self._decode(msg)
        assert isinstance(msg, MessageState)
        return msg

    def __getitem__(self, msg_id: str) -> MessageState:
        return self._decoded(self._by_id[msg_id])

    def get(self, msg_id: str) -> MessageState | None:
        msg = self._by_id.get(msg_id)
        return None if msg is None else self._decoded(msg)

    def view(self, msg_id: str) -> MessageView | None:
        """The message as held, without decoding it."""
        return self._by_id.get(msg_id)

    def brief(self, msg_id: str) -> Brief | None:
        """The message's brief, None when it is held decoded (or not here)."""
        msg = self._by_id.get(msg_id)
        return msg if type(msg) is Brief else None

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def values(self) -> Iterator[MessageState]:
        """Every message decoded, oldest first: briefs are decoded one by one as the walk
        gets to them, as they are then (a message gone meanwhile is left out)."""
        return (m for _k, m in self.items())

    def items(self) -> Iterator[tuple[str, MessageState]]:
        by_id = self._by_id
        decoded = self._decoded
        for msg_id in list(by_id):
            msg = by_id.get(msg_id)
            if msg is not None:
                yield msg_id, decoded(msg)

    def views(self) -> list[MessageView]:
        """Every message as held, oldest first, none decoded (a snapshot list)."""
        return list(self._by_id.values())

    @property
    def hot(self) -> int:
        """Messages held decoded."""
        return self._hot

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

    def minutes(self) -> Mapping[int, int]:
        """Non-terminal units of every domain by their message's arrival minute (live)."""
        return self._minutes

    def domains(self) -> Mapping[str, DomainCounts]:
        """Every domain with a non-terminal unit and its counts (live: copy what you
        keep across an ``await``)."""
        return self._domains

    def oldest(self) -> MessageView | None:
        """The oldest (by ``received_at``, then id) message with a unit that waits for
        delivery: non-terminal and not held."""
        heap = self._heap
        while heap:
            msg = self._by_id.get(heap[0][1])
            if msg is not None and _waits(msg):
                return msg
            heapq.heappop(heap)
        return None

    def _count(self, msg: Held) -> bool:
        """Add ``msg``'s units to the counts; whether one of them waits (non-terminal,
        not held)."""
        status = self._status
        domains = self._domains
        slots = STATUS_SLOT
        minute = int(msg.envelope.received_at // 60)
        queued = 0
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
            queued += 1
            if st is not _HELD:
                waits = True
        if queued:
            everyone = self._minutes
            everyone[minute] = everyone.get(minute, 0) + queued
        return waits

    def _forget(self, msg: Held) -> bool:
        """Take ``msg``'s units out of the counts; whether one of them waited.  Its heap
        entry stays until it reaches the top or the heap is rebuilt."""
        if type(msg) is not Brief:
            self._hot -= 1
        status = self._status
        domains = self._domains
        slots = STATUS_SLOT
        minute = int(msg.envelope.received_at // 60)
        queued = 0
        waited = False
        for unit in msg.units:
            st = unit.status
            status[st] -= 1
            slot = slots.get(st)
            if slot is None:
                continue
            queued += 1
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
        if queued:
            everyone = self._minutes
            left = everyone[minute] - queued
            if left:
                everyone[minute] = left
            else:
                del everyone[minute]
        if waited:
            self._live -= 1
        return waited

    def _rebuild_heap(self) -> None:
        self._heap = [(m.envelope.received_at, mid) for mid, m in self._by_id.items() if _waits(m)]
        heapq.heapify(self._heap)
