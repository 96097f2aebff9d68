"""An in-memory spool for unit tests: the :class:`~empath.spool.store.Spool` contract without disk.

Theory of operation: bodies are kept as byte chunks, the index is an ordered
dict (commit order is acceptance order, oldest first).  ``commit``, ``update``
and ``remove`` yield to the event loop once, like the real store waiting for its
group flush, so tests see the same interleavings.  Nothing is durable, but
``open()`` on an already-open spool behaves like a restart's recovery:
units left ``in_progress`` become ``pending`` again.

Test hooks: :meth:`MemorySpool.fail_next_commit` / :meth:`fail_next_update`
make the next call raise the given exception (e.g. ``SpoolFullError()``) and
keep nothing, exactly as a failed flush of the file store would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from empath.clock import Clock, SystemClock
from empath.errors import SpoolError
from empath.ids import new_ulid
from empath.spool.index import MessageIndex
from empath.spool.model import Envelope, MessageState, UnitState, UnitStatus
from empath.spool.store import BodyWriter, IndexedMessages, RecoveryReport, SpoolUsage

__all__ = ["MemoryBodyWriter", "MemorySpool", "requeue_in_progress"]


def requeue_in_progress(units: tuple[UnitState, ...]) -> tuple[UnitState, ...]:
    """Units that were being delivered at a crash are pending again (DESIGN §3 recovery)."""
    for unit in units:
        if unit.status is UnitStatus.IN_PROGRESS:
            break
    else:
        return units
    return tuple(
        replace(u, status=UnitStatus.PENDING) if u.status is UnitStatus.IN_PROGRESS else u
        for u in units
    )


class MemoryBodyWriter:
    """Collects body chunks in memory."""

    __slots__ = ("_aborted", "_chunks", "_committed", "_id", "_size")

    def __init__(self, msg_id: str) -> None:
        self._id = msg_id
        self._chunks: list[bytes] = []
        self._size = 0
        self._aborted = False
        self._committed = False

    @property
    def id(self) -> str:
        return self._id

    @property
    def size(self) -> int:
        return self._size

    @property
    def aborted(self) -> bool:
        return self._aborted

    def write(self, data: bytes) -> None:
        if self._aborted or self._committed or not data:
            return
        self._chunks.append(bytes(data))
        self._size += len(data)

    def abort(self) -> None:
        self._aborted = True
        self._chunks.clear()

    def _take(self) -> bytes:
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._committed = True
        return body


class MemorySpool(IndexedMessages):
    """Spool backend that keeps everything in process memory (tests, ``--dry-run`` tools)."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._index = MessageIndex()
        self._bodies: dict[str, bytes] = {}
        self._fail_commit: BaseException | None = None
        self._fail_update: BaseException | None = None
        self._open = False
        self.commits = 0  # successful commits (for tests)
        self.updates = 0  # successful updates

    # --- test hooks -----------------------------------------------------------

    def fail_next_commit(self, exc: BaseException) -> None:
        """Make the next ``commit`` raise ``exc`` and store nothing."""
        self._fail_commit = exc

    def fail_next_update(self, exc: BaseException) -> None:
        """Make the next ``update`` raise ``exc`` (the index keeps the new state, as on disk)."""
        self._fail_update = exc

    # --- lifecycle ------------------------------------------------------------

    async def open(self) -> RecoveryReport:
        started = time.monotonic()
        for msg_id, msg in list(self._index.items()):
            units = requeue_in_progress(msg.units)
            if units is not msg.units:
                self._index[msg_id] = replace(msg, units=units)
        self._open = True
        return RecoveryReport(
            messages=len(self._index),
            records=len(self._index),
            quarantined=0,
            missing=0,
            seconds=time.monotonic() - started,
        )

    async def close(self) -> None:
        self._open = False

    async def compact(self, *, include_active: bool = False) -> int:
        """Nothing to reclaim in memory (removed messages are gone at once)."""
        return 0

    def under_pressure(self) -> bool:
        return False

    # --- writing --------------------------------------------------------------

    def begin(self) -> MemoryBodyWriter:
        return MemoryBodyWriter(new_ulid())

    async def commit(
        self, body: BodyWriter, envelope: Envelope, units: tuple[UnitState, ...]
    ) -> MessageState:
        if not isinstance(body, MemoryBodyWriter):
            raise TypeError("MemorySpool.commit needs a writer from MemorySpool.begin()")
        await asyncio.sleep(0)
        if self._fail_commit is not None:
            exc, self._fail_commit = self._fail_commit, None
            body.abort()
            raise exc
        if body.aborted:
            raise SpoolError("message body was aborted")
        if body.id in self._index:
            raise SpoolError(f"message {body.id} is already committed")
        data = body._take()
        if envelope.size != len(data):
            envelope = replace(envelope, size=len(data))
        msg = MessageState(id=body.id, envelope=envelope, units=tuple(units))
        self._bodies[msg.id] = data
        self._index[msg.id] = msg
        self.commits += 1
        return msg

    def start_commit(
        self, body: BodyWriter, envelope: Envelope, units: tuple[UnitState, ...]
    ) -> asyncio.Future[MessageState]:
        # Request-scoped, owned by the caller (as in FileSpool.start_commit).
        return asyncio.ensure_future(self.commit(body, envelope, units))

    async def update(
        self, msg_id: str, units: tuple[UnitState, ...], *, durable: bool = True
    ) -> MessageState:
        msg = self.get(msg_id)
        new = replace(msg, units=tuple(units))
        self._index[msg_id] = new
        if durable:
            await asyncio.sleep(0)
        if self._fail_update is not None:
            exc, self._fail_update = self._fail_update, None
            raise exc
        self.updates += 1
        return new

    async def remove(self, msg_id: str, *, durable: bool = True) -> None:
        self.get(msg_id)
        if durable:
            await asyncio.sleep(0)
        self._index.pop(msg_id, None)
        self._bodies.pop(msg_id, None)

    # --- reading --------------------------------------------------------------

    async def read_body(self, msg_id: str) -> bytes:
        self.get(msg_id)
        return self._bodies[msg_id]

    async def iter_body(self, msg_id: str, chunk_bytes: int = 65536) -> AsyncIterator[bytes]:
        body = await self.read_body(msg_id)
        view = memoryview(body)
        for start in range(0, len(body), chunk_bytes):
            yield bytes(view[start : start + chunk_bytes])

    def usage(self) -> SpoolUsage:
        size = sum(len(b) for b in self._bodies.values())
        return SpoolUsage(free_bytes=1 << 40, total_bytes=1 << 40, size_bytes=size)
