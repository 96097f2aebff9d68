"""The spool interface every backend implements (file log for production, memory for tests).

Contract (DESIGN §3):
- ``begin()`` starts a message body.  ``BodyWriter.write`` is synchronous and cheap
  (called from the SMTP transport's ``data_received``); it never raises: a write
  error (ENOSPC, EIO) is remembered and surfaces at ``commit``.  Bodies larger than
  a small threshold must be spilled to disk as they arrive, never held whole.
- ``commit()`` returns only when the body, envelope and initial unit states are
  durable (fsync'd; for new files also the directory).  Concurrent commits share
  flushes (group commit) and fsync never runs on the event loop thread.
  ``SpoolFullError`` (ENOSPC/EDQUOT) → the session answers ``452 4.3.1``; any
  other ``SpoolError`` → ``451 4.3.0``.  A failed commit leaves nothing that
  recovery would resurrect.
- ``update()`` persists a new snapshot of a message's unit states.  With
  ``durable=True`` it returns after the snapshot is flushed (group-committed with
  everything else); ``durable=False`` queues it for the next flush and returns at
  once (used for ``in_progress`` marks, which recovery treats as pending anyway).
- ``remove()`` durably forgets a message; its space becomes reclaimable.  With
  ``durable=False`` (a delivered message, DESIGN §3 "What a relayed message writes")
  the message leaves the index at once and its tombstone rides with the next flush:
  a crash before that delivers it again (a duplicate), never loses anything.
- ``compact()`` reclaims that space (the app calls it periodically, and at once
  while ``under_pressure()``); a removal succeeds on a full disk too.
- The in-memory index (``get``/``messages``) reflects every committed/updated
  state immediately, and after ``open()`` everything recovered from disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from empath.errors import UnknownMessageError
from empath.spool.index import MessageIndex, MessageView
from empath.spool.model import Envelope, MessageState, UnitState

# A log segment's size: FileSpool's default and the config's (spool.segment_bytes).
SEGMENT_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What ``open()`` found on disk."""

    messages: int  # live messages restored
    records: int  # records read
    quarantined: int  # corrupt/torn regions moved to <spool>/corrupt/
    missing: int  # messages whose body vanished behind our back (dropped, logged)
    seconds: float
    deferred: int = 0  # damaged regions left in place: their quarantine copy failed (disk full)


@dataclass(frozen=True, slots=True)
class SpoolUsage:
    free_bytes: int  # free space on the spool filesystem (for non-root)
    total_bytes: int  # filesystem size
    size_bytes: int  # bytes used by the spool's own files
    reclaimable_bytes: int = 0  # of those, held by dead records (compaction frees them)
    reserve_bytes: int = 0  # preallocated for deletions on a full disk
    reserve_released: bool = False  # it is in use: new mail is refused (452) for now
    preformatted_bytes: int = 0  # of size_bytes, zeros written ahead for new records


class BodyWriter(Protocol):
    """An in-progress message body.  Feed it bytes, then commit or abort."""

    @property
    def id(self) -> str:
        """The ULID this message will be committed under."""
        ...

    @property
    def size(self) -> int:
        """Bytes written so far."""
        ...

    def write(self, data: bytes) -> None:
        """Append body bytes.  Never raises; errors surface at commit."""
        ...

    def abort(self) -> None:
        """Discard the body (client aborted, message rejected).  Idempotent."""
        ...


class Spool(Protocol):
    async def open(self) -> RecoveryReport:
        """Create/recover the spool.  Torn or corrupt records are quarantined, never fatal."""
        ...

    async def close(self) -> None:
        """Flush everything pending and release files."""
        ...

    def begin(self) -> BodyWriter:
        """Start a new message body with a fresh ULID."""
        ...

    async def commit(
        self, body: BodyWriter, envelope: Envelope, units: tuple[UnitState, ...]
    ) -> MessageState:
        """Make body + envelope + units durable, then index them.  See module doc."""
        ...

    def start_commit(
        self, body: BodyWriter, envelope: Envelope, units: tuple[UnitState, ...]
    ) -> asyncio.Future[MessageState]:
        """``commit`` as a future (may raise at once for a body that cannot be committed);
        the SMTP session uses it to avoid a Task per message."""
        ...

    async def update(
        self, msg_id: str, units: tuple[UnitState, ...], *, durable: bool = True
    ) -> MessageState:
        """Persist a new snapshot of the unit states of a live message."""
        ...

    async def remove(self, msg_id: str, *, durable: bool = True) -> None:
        """Delete a message (all units terminal, or `queue delete`); durably unless
        ``durable=False`` (see the module doc)."""
        ...

    def get(self, msg_id: str) -> MessageState:
        """The live message with this id; raises UnknownMessageError."""
        ...

    def messages(self) -> Iterator[MessageState]:
        """Every live message, oldest first (decoded one by one: an operator's walk)."""
        ...

    def views(self) -> list[MessageView]:
        """Every live message as the index holds it, oldest first, none decoded: what
        walks of the whole queue read (spool/index.py)."""
        ...

    def __len__(self) -> int:
        """Number of live messages."""
        ...

    @property
    def index(self) -> MessageIndex:
        """The live index with the queue's counts, kept as messages change."""
        ...

    async def read_body(self, msg_id: str) -> bytes:
        """The whole stored body (as it will be sent: CRLF lines, not dot-stuffed)."""
        ...

    def iter_body(self, msg_id: str, chunk_bytes: int = 65536) -> AsyncIterator[bytes]:
        """The stored body in chunks, without loading it whole."""
        ...

    def usage(self) -> SpoolUsage:
        """Filesystem and spool sizes (for health and metrics)."""
        ...

    async def compact(self, *, include_active: bool = False) -> int:
        """Reclaim space held by finished messages (called periodically by the app);
        the bytes freed, 0 when there is nothing to do (always, for a memory spool).
        ``include_active``: also the segment being appended to (an operator's request;
        done without asking when space is short)."""
        ...

    def under_pressure(self) -> bool:
        """Space is short: the app runs ``compact()`` now rather than at its interval."""
        ...


class IndexedMessages:
    """The read side both spools share: live messages by id in ``_index``, which
    keeps the queue's counts as messages change (see :mod:`empath.spool.index`)."""

    _index: MessageIndex

    def get(self, msg_id: str) -> MessageState:
        try:
            return self._index[msg_id]
        except KeyError:
            raise UnknownMessageError(f"no such message: {msg_id}") from None

    def messages(self) -> Iterator[MessageState]:
        return self._index.values()

    def views(self) -> list[MessageView]:
        return self._index.views()

    def __len__(self) -> int:
        return len(self._index)

    @property
    def index(self) -> MessageIndex:
        """The live index and its counts (read-only use: units per status, top
        domains, the oldest live message)."""
        return self._index

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._index
