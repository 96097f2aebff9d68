"""Group commit: one thread owns the active segment, writes queued records in batches, syncs once.

(Just over 600 lines: batching, failure handling and rotation all move the one active
segment and its descriptor, and are read together.)

Theory of operation.  Coroutines on the event loop build record payloads and
:meth:`LogWriter.submit` them as :class:`Entry` objects (with a future when the
caller waits for durability).  The writer thread sleeps until something is
queued, takes *everything* queued, frames the records with the active
segment's seed, writes them with one ``pwrite`` at the segment's end, calls
``fdatasync`` once and then hands the whole batch back to the loop with a single
``call_soon_threadsafe`` - the loop resolves the futures and updates its index.
While one batch syncs, the next one accumulates, so N concurrent commits cost
far fewer than N syncs.  fsync never runs on the event loop thread.

Failure: if the write or sync fails, the segment is truncated back to its
pre-batch size (and synced) so recovery cannot resurrect a record whose caller
was told it failed.  If even that fails, the writer remembers the segment as
"poisoned" at that offset and, before the next batch, retries the truncation
or rotates to a new segment whose SEGMENT record says where the previous one's
valid data ends (recovery discards everything after it).

Rotation: once the active segment reaches ``segment_bytes`` the next batch goes
to a new file (created, header written, synced, directory synced).  A ROTATE entry
(compaction under space pressure, space.py) closes the active segment early.

Pre-formatted segments (preformat.py, DESIGN §3): with ``spares`` the new file is a spare
written full of zeros beforehand, so batches overwrite blocks in place (no journal
commit per batch); the next batch's offset is ``Segment.size`` in memory, the file is
larger.  The writer rotates to a ready spare early when the active segment has no
pre-formatted room left, cuts a closed segment's unused zero tail off, and asks for the
next spare once the active segment is half full.  A failed batch is cut off by
truncation as before (the rest of that segment is then appended, until a spare is
ready).

A full disk (space.py): a batch that fails with ENOSPC/EDQUOT releases the spool's
reserve and is written again without its new messages (COMMIT entries), which
fail; while the reserve is out, COMMIT entries fail at once unless the reserve
can be restored first.  Tombstones, states and compaction never wait for space
that new mail took.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from empath.spool import codec
from empath.spool.codec import RecordType
from empath.spool.commit_delay import CommitDelay
from empath.spool.model import MessageState
from empath.spool.space import Reserve

_FULL = (errno.ENOSPC, errno.EDQUOT)
LAZY_FLUSH_S = 0.05  # lazy tombstones are gathered this long into one record (submit)
LAZY_MAX = 1024  # ... or until this many are waiting


class EntryKind(enum.Enum):
    COMMIT = "commit"  # a new message
    COPY = "copy"  # compaction moving a live message forward
    STATE = "state"
    DEL = "del"
    ROTATE = "rotate"  # no record: close the active segment, start the next one


_STATE, _DEL = EntryKind.STATE, EntryKind.DEL  # batches that sync the history first


@dataclass(slots=True, init=False, eq=False)
class Entry:
    """One record waiting for the writer; ``seg``/``offset`` are filled in when written."""

    kind: EntryKind
    msg_id: str
    payload: bytes
    future: asyncio.Future[Any] | None = None
    body_rel: int = 0  # offset of the inline body within the payload
    body_bytes: int = 0
    spilled: bool = False
    message: MessageState | None = None  # COMMIT: what to index once durable
    from_seg: int = -1  # COPY: the segment being compacted
    more_ids: tuple[str, ...] = ()  # DEL: the other messages one tombstone record forgets
    seg: int = -1
    offset: int = -1  # of the record header
    record_bytes: int = 0

    # written out (init=False): compiled, it runs natively (smtp/events.py)
    def __init__(
        self,
        kind: EntryKind,
        msg_id: str,
        payload: bytes,
        future: asyncio.Future[Any] | None = None,
        body_rel: int = 0,
        body_bytes: int = 0,
        spilled: bool = False,
        message: MessageState | None = None,
        from_seg: int = -1,
        more_ids: tuple[str, ...] = (),
        seg: int = -1,
        offset: int = -1,
        record_bytes: int = 0,
    ) -> None:
        self.kind = kind
        self.msg_id = msg_id
        self.payload = payload
        self.future = future
        self.body_rel = body_rel
        self.body_bytes = body_bytes
        self.spilled = spilled
        self.message = message
        self.from_seg = from_seg
        self.more_ids = more_ids
        self.seg = seg
        self.offset = offset
        self.record_bytes = record_bytes

    @property
    def rtype(self) -> RecordType:
        return _RTYPE[self.kind]

    @property
    def ids(self) -> tuple[str, ...]:
        """Every message the entry is about (several for a gathered tombstone)."""
        return (self.msg_id, *self.more_ids)


def gathered_tombstone(entries: list[Entry]) -> Entry:
    """One DEL entry (one record) forgetting every message of the lazy ``entries``."""
    ids = [msg_id for entry in entries for msg_id in entry.ids]
    first, more = ids[0], tuple(ids[1:])
    return Entry(EntryKind.DEL, first, codec.del_payload(first, more), more_ids=more)


_RTYPE = {
    EntryKind.COMMIT: RecordType.MSG,
    EntryKind.COPY: RecordType.MSG,
    EntryKind.STATE: RecordType.STATE,
    EntryKind.DEL: RecordType.DEL,
}
Outcome = tuple[list[Entry], OSError | None]


@dataclass(slots=True, eq=False)
class Segment:
    """A log segment file and what the index knows about it."""

    seq: int
    seed: int
    path: Path
    size: int  # valid bytes (the writer appends here)
    read_fd: int
    refs: set[str] = field(default_factory=set)  # live messages whose MSG record is here
    live_bytes: int = 0  # bytes of those MSG records

    @property
    def name(self) -> str:
        return self.path.name


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - pwrite raises on errors
            raise OSError("short write")
        view = view[n:]
        offset += n


BatchCallback = Callable[[list[Entry], OSError | None], None]


class Spares(Protocol):
    """Where pre-formatted segments come from (preformat.Preformatter)."""

    def ready(self) -> bool: ...

    def request(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def spare_bytes(self) -> int: ...

    def open_segment(
        self, seq: int, prev_end: int, now: float
    ) -> tuple[Segment, int, int] | None: ...


class LogWriter:
    """The group-commit thread.  ``segments`` is shared with the loop under ``segments_lock``."""

    def __init__(
        self,
        log_dir: Path,
        segments: dict[int, Segment],
        segments_lock: threading.Lock,
        active: Segment,
        *,
        segment_bytes: int,
        fdatasync: Callable[[int], None],
        clock_now: Callable[[], float],
        reserve: Reserve | None = None,
        commit_delay: CommitDelay | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        spares: Spares | None = None,
    ) -> None:
        self._log_dir = log_dir
        self._segments = segments
        self._segments_lock = segments_lock
        self.active = active
        # With the real fdatasync, the write fd is opened O_DSYNC: each batch is one
        # pwrite that returns once the data is durable (the same guarantee as
        # pwrite + fdatasync), so the writer thread gives up and re-takes the GIL once
        # per batch instead of twice.  An injected fdatasync (tests counting or failing
        # syncs) keeps the explicit call.
        self._dsync = fdatasync is os.fdatasync
        self._write_fd = open_for_append(active.path, self._dsync)
        self._spares = spares  # None: segments are created empty and appended to
        # the next spare is asked for once the active segment is this full: well before
        # the rotation that takes it, and not right after one (a short run then writes
        # no spare at all; a long one writes one per segment either way)
        self._ask_at = segment_bytes // 2 if spares is not None else 1 << 62
        # where the active file's written bytes end: past ``active.size`` are zeros a
        # batch overwrites (a pre-formatted segment), else a batch appends
        self._file_end = os.fstat(self._write_fd).st_size
        self._segment_bytes = segment_bytes
        self._fdatasync = fdatasync
        self._now = clock_now
        self._reserve = reserve
        self._delay = commit_delay  # None: write every batch as soon as it is taken
        self._monotonic = monotonic
        # The loop hands lists of entries over through a C-level queue: ``put`` wakes the
        # thread without running Python code on either side (threading.Condition's
        # waiter bookkeeping ran under the GIL on both threads, once per batch).  A None
        # is the stop mark.  ``_submit_lock`` makes the stopping check and the put one
        # step, so nothing is queued behind the mark.
        self._inbox: queue.SimpleQueue[list[Entry] | None] = queue.SimpleQueue()
        self._submit_lock = threading.Lock()
        self._stopping = False
        self._poisoned_at: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._staged: list[Entry] = []  # submitted on the loop, not yet handed over
        self._flush_scheduled = False
        self._lazy: list[Entry] = []  # lazy tombstones being gathered (submit)
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._on_batch: BatchCallback | None = None
        # (not "_thread": mypyc would spell that __thread in C)
        self._worker: threading.Thread | None = None
        # called in this thread before a group with a state change or a tombstone is
        # written: the message history's sync (journal.py), so that an event is
        # durable no later than the spool change recorded after it
        self.before_state: Callable[[], None] | None = None
        self.batches = 0
        self.records = 0
        self.holds = 0  # batches held open for more (commit delay)
        self._last_taken = 0  # records of the previous cycle (commit delay)

    def start(self, loop: asyncio.AbstractEventLoop, on_batch: BatchCallback) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._on_batch = on_batch
        self._worker = threading.Thread(target=self._run, name="empath-spool-writer", daemon=True)
        self._worker.start()

    def submit(self, entry: Entry, *, lazy: bool = False) -> None:
        """Queue an entry.  On the loop thread, entries made in one loop iteration are
        handed to the writer thread together at the end of it: one wake-up of the
        thread (and one GIL hand-over) per iteration instead of one per record, which
        profiling showed as the dominant cost of ingest (futex storms).

        A ``lazy`` entry is a tombstone nobody waits for (a delivered message, DESIGN
        §3 "What a relayed message writes").  Lazy tombstones are gathered for
        :data:`LAZY_FLUSH_S` (or until :data:`LAZY_MAX` wait) and written as *one* DEL
        record forgetting them all, in a batch of their own or with whatever is queued
        then.  They never ride with new mail as they used to: a batch holding a
        tombstone first syncs the message history (``before_state``), and riding along
        made nearly every ingest batch pay that second fdatasync.  Now the history is
        synced ~20 times a second under any load, and the 250 of new mail never waits
        for it."""
        if self._stopping:
            raise RuntimeError("spool writer is stopped")
        loop = self._loop
        if loop is None or self._loop_thread != threading.get_ident():
            self.submit_many([entry])
            return
        if lazy:
            assert entry.kind is EntryKind.DEL and entry.future is None
            self._lazy.append(entry)
            if len(self._lazy) >= LAZY_MAX:
                self._flush_lazy()
            elif self._lazy_timer is None:
                self._lazy_timer = loop.call_later(LAZY_FLUSH_S, self._flush_lazy)
            return
        self._staged.append(entry)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush_staged)

    def _flush_staged(self) -> None:
        self._flush_scheduled = False
        if self._staged and not self._stopping:
            staged, self._staged = self._staged, []
            self.submit_many(staged)

    def _flush_lazy(self) -> None:
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if self._lazy and not self._stopping:
            lazy, self._lazy = self._lazy, []
            self.submit_many([gathered_tombstone(lazy)])

    def submit_many(self, entries: list[Entry]) -> None:
        """Queue ``entries`` for the thread (it reads the list, never changes it)."""
        with self._submit_lock:
            if self._stopping:
                raise RuntimeError("spool writer is stopped")
            self._inbox.put(entries)

    def stop(self) -> None:
        """Drain the queue, stop the thread and close the write fd (blocking: run in a thread)."""
        with self._submit_lock:
            if not self._stopping:
                if self._staged:
                    self._inbox.put(self._staged)
                    self._staged = []
                if self._lazy:
                    self._inbox.put([gathered_tombstone(self._lazy)])
                    self._lazy = []
                self._stopping = True
                self._inbox.put(None)
        if self._worker is not None:
            self._worker.join()
        if self._spares is not None:
            self._spares.stop()
        with contextlib.suppress(OSError):
            os.close(self._write_fd)

    @property
    def preformatted_bytes(self) -> int:
        """Zero bytes written ahead: the active segment's unused tail and the spare."""
        spare = 0 if self._spares is None else self._spares.spare_bytes
        return max(0, self._file_end - self.active.size) + spare

    # --- the thread -------------------------------------------------------------

    def _run(self) -> None:
        inbox = self._inbox
        loop = self._loop
        on_batch = self._on_batch
        assert loop is not None and on_batch is not None
        stop = False
        while not stop:
            first = inbox.get()  # blocks without the GIL
            batch: list[Entry] = []  # a new list: callers may still read theirs
            if first is None:
                stop = True
            else:
                batch += first
            while not inbox.empty():  # take everything queued meanwhile
                more = inbox.get_nowait()
                if more is None:
                    stop = True
                else:
                    batch += more
            if not batch:
                continue
            delay = self._delay
            if delay is None:
                outcomes = self._process(batch)
            else:
                stop = self._hold(delay, batch, stop)
                started = self._monotonic()
                outcomes = self._process(batch)
                delay.wrote(self._monotonic() - started)
            self.batches += 1
            try:
                for entries, error in outcomes:
                    loop.call_soon_threadsafe(on_batch, entries, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _hold(self, delay: CommitDelay, batch: list[Entry], stop: bool) -> bool:
        """Add to ``batch`` what arrives while ``delay`` says to wait (commit_delay.py);
        whether the stop mark came."""
        inbox, clock = self._inbox, self._monotonic
        now = clock()
        delay.taken(now, self._last_taken)
        hold = 0.0 if stop else delay.hold_s(len(batch))
        if hold > 0.0:
            self.holds += 1
        deadline = now + hold
        while hold > 0.0:
            try:
                more = inbox.get(timeout=hold)  # waits without the GIL
            except queue.Empty:
                break
            if more is None:
                stop = True
                break
            batch += more
            if len(batch) >= delay.target:
                break
            hold = deadline - clock()
        self._last_taken = len(batch)
        return stop

    def _process(self, batch: list[Entry]) -> list[Outcome]:
        """Write a batch, rotating where a ROTATE entry stands; what succeeded and failed."""
        outcomes: list[Outcome] = []
        group: list[Entry] = []
        for entry in batch:
            if entry.kind is EntryKind.ROTATE:
                if group:
                    outcomes += self._write_group(group)
                    group = []
                outcomes.append(([entry], self._rotate_now()))
            else:
                group.append(entry)
        if group:
            outcomes += self._write_group(group)
        return outcomes

    def _write_group(self, entries: list[Entry]) -> list[Outcome]:
        reserve = self._reserve
        if reserve is not None and not reserve.held:
            commits = [e for e in entries if e.kind is EntryKind.COMMIT]
            if commits and not reserve.restore():
                # Space is short and kept for deletions and compaction: no new mail.
                full = OSError(errno.ENOSPC, "No space left on device (spool reserve in use)")
                others = [e for e in entries if e.kind is not EntryKind.COMMIT]
                return [(commits, full), *(self._write_group(others) if others else [])]
        hook = self.before_state
        if hook is not None and any(e.kind is _STATE or e.kind is _DEL for e in entries):
            hook()
        try:
            self._write_batch(entries)
        except OSError as exc:
            if exc.errno not in _FULL or reserve is None:
                return [(entries, exc)]
            others = [e for e in entries if e.kind is not EntryKind.COMMIT]
            if not others or not reserve.release():
                return [(entries, exc)]
            commits = [e for e in entries if e.kind is EntryKind.COMMIT]
            outcomes: list[Outcome] = [(commits, exc)] if commits else []
            try:
                self._write_batch(others)
            except OSError as again:
                return [*outcomes, (others, again)]
            return [*outcomes, (others, None)]
        return [(entries, None)]

    def _rotate_now(self) -> OSError | None:
        """A ROTATE entry: start the next segment (using the reserve on a full disk)."""
        try:
            if self._poisoned_at is not None:
                self._heal()
            self._rotate(self.active.size)
        except OSError as exc:
            if exc.errno not in _FULL or self._reserve is None or not self._reserve.release():
                return exc
            try:
                self._rotate(self.active.size)
            except OSError as again:
                return again
        return None

    def _write_batch(self, batch: list[Entry]) -> None:
        if self._poisoned_at is not None:
            self._heal()
        elif self.active.size >= self._segment_bytes:
            self._rotate(self.active.size)
        elif (
            self.active.size >= self._file_end and self._spares is not None and self._spares.ready()
        ):  # no pre-formatted room here: go to the spare
            self._rotate_to_spare(self.active.size)
        seg = self.active
        start = offset = seg.size
        frames: list[bytes] = []
        for entry in batch:
            record = codec.frame(entry.rtype, entry.payload, seg.seed)
            entry.seg = seg.seq
            entry.offset = offset
            entry.record_bytes = len(record)
            offset += len(record)
            frames.append(record)
        try:
            write_all(self._write_fd, b"".join(frames), start)
            if not self._dsync:
                self._fdatasync(self._write_fd)
        except OSError:
            self._undo(start)
            raise
        seg.size = offset
        self._file_end = max(self._file_end, offset)
        if offset >= self._ask_at:
            self._ask_at = 1 << 62
            if self._spares is not None:
                self._spares.request()
        self.records += len(batch)

    def _undo(self, start: int) -> None:
        """Cut a failed batch off the segment; remember the segment as poisoned if we cannot."""
        try:
            os.ftruncate(self._write_fd, start)
            self._fdatasync(self._write_fd)
        except OSError:
            self._poisoned_at = start
        else:
            self._file_end = start  # a pre-formatted tail went with it: appended from here

    def _heal(self) -> None:
        assert self._poisoned_at is not None
        start = self._poisoned_at
        try:
            os.ftruncate(self._write_fd, start)
            self._fdatasync(self._write_fd)
        except OSError:
            self._rotate(start)  # raises if the disk is still unusable
        else:
            self._file_end = start
        self._poisoned_at = None

    def _rotate(self, prev_end: int) -> None:
        """Start a new segment; its header says where the old one's valid data ends."""
        if self._rotate_to_spare(prev_end):
            return
        new, fd = _new_segment(self._log_dir, self.active.seq + 1, prev_end, self._now())
        try:
            write_fd = open_for_append(new.path, self._dsync)
        finally:
            os.close(fd)
        self._install(new, write_fd, new.size, prev_end)

    def _rotate_to_spare(self, prev_end: int) -> bool:
        """Make the ready pre-formatted spare the active segment; False if there is none
        (or it failed: preformat.py logs it and the caller goes on as without one)."""
        spares = self._spares
        if spares is None:
            return False
        made = spares.open_segment(self.active.seq + 1, prev_end, self._now())
        if made is None:
            return False
        new, write_fd, file_end = made
        self._install(new, write_fd, file_end, prev_end)
        return True

    def _install(self, new: Segment, write_fd: int, file_end: int, prev_end: int) -> None:
        old_fd, old_end = self._write_fd, self._file_end
        self._write_fd = write_fd
        self._file_end = file_end
        with self._segments_lock:
            self._segments[new.seq] = new
            self.active = new
        self._poisoned_at = None
        if old_end > prev_end:
            # The closed segment's unused zeros go back to the filesystem (not synced:
            # after a crash recovery reads them as its end, or cuts them by prev_end).
            with contextlib.suppress(OSError):
                os.ftruncate(old_fd, prev_end)
        with contextlib.suppress(OSError):
            os.close(old_fd)
        if self._spares is not None:
            self._ask_at = self._segment_bytes // 2


def open_for_append(path: Path, dsync: bool) -> int:
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_DSYNC if dsync else 0)
    return os.open(path, flags)


def _new_segment(log_dir: Path, seq: int, prev_end: int | None, now: float) -> tuple[Segment, int]:
    """Create a segment file with its SEGMENT header, synced with its directory.

    Returns the segment (with its read fd) and an open write fd.
    """
    seed = int.from_bytes(os.urandom(4), "little")
    path = log_dir / codec.segment_name(seq, seed)
    header = codec.frame(RecordType.SEGMENT, codec.segment_payload(seq, prev_end, now), seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, header, 0)
        os.fsync(fd)
        fsync_dir(log_dir)
        read_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return Segment(seq=seq, seed=seed, path=path, size=len(header), read_fd=read_fd), fd


def create_segment(log_dir: Path, seq: int, prev_end: int | None, now: float) -> Segment:
    """Create a fresh, synced segment with its header (used at open when none is usable)."""
    seg, fd = _new_segment(log_dir, seq, prev_end, now)
    os.close(fd)
    return seg
