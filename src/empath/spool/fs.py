"""The embedded production spool: a segmented, checksummed, group-committed append-only log.

Why this module is (just) over 600 lines: open/recover, commit, state updates, briefs'
decoding and compaction all move the same segment and index state.

Layout under the spool path::

    log/<seq>-<seed>.seg   the log (see codec.py for the record format)
    bodies/<ULID>          bodies larger than ``spill_bytes``, spilled as they arrive
    corrupt/               quarantined regions (recovery.py)
    lock                   flock'd while a process has the spool open

Theory of operation.  Why a log: on the project's machine creating a file costs
0.5-0.9 ms of kernel CPU, an fsync'd append to an open file ~0.13 ms, and one
fsync can cover many appends.  So an ordinary message costs *no* file creation:
its envelope, initial units and body go into one MSG record appended to the
active segment by the writer thread (writer.py), which syncs once per batch of
concurrently committing sessions.  Delivery progress is a STATE record (a full
snapshot of the units, newest wins), a finished message a DEL tombstone.

The index (id -> MessageState and body location) lives in memory and is rebuilt
by scanning the log at ``open()`` (recovery.py).  It reflects commits once they
are durable and updates as soon as they are made (their records are queued in
call order, so the log converges to the same newest state).

Bodies (body.py): the :class:`FileBodyWriter` buffers up to ``spill_bytes`` in memory; a
body that grows past that is written (unsynced) to ``bodies/<id>`` as it
arrives, in chunks of at most ``FLUSH_BYTES`` buffered.  At commit a spilled
body is fsync'd and its directory fsync'd (in a thread) before its MSG record is
queued.  Spill files are unlinked once the DEL record is durable.

Space: segments rotate at ``segment_bytes``.  :meth:`FileSpool.compact` (called
periodically by the app, compaction.py) takes the OLDEST closed segment when most
of it is dead - or when it blocks a newer, mostly dead one - copies its still-live
messages forward (MSG with body and current units) and deletes the file.
Deleting oldest-first guarantees a tombstone never outlives the record it kills.
When space is short the active segment is rotated and compacted too, and a
preallocated ``reserve`` file keeps deletions writable on a full disk (space.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

from empath.clock import Clock, SystemClock
from empath.errors import SpoolError, UnknownMessageError
from empath.ids import new_ulid
from empath.logs import get_logger
from empath.spool import codec
from empath.spool.body import BodyState, FileBodyWriter, map_os_error
from empath.spool.commit_delay import CommitDelay
from empath.spool.compaction import Compaction
from empath.spool.index import Brief, MessageIndex, pack_state, unpack_state
from empath.spool.memory import requeue_in_progress
from empath.spool.model import Envelope, MessageState, UnitState, UnitStatus
from empath.spool.preformat import Preformatter, remove_spares
from empath.spool.recovery import BodyLocation, packed_seg, recover
from empath.spool.space import Reserve, may_preformat, reserve_size
from empath.spool.store import (
    SEGMENT_BYTES,
    BodyWriter,
    IndexedMessages,
    RecoveryReport,
    SpoolUsage,
)
from empath.spool.writer import Entry, EntryKind, LogWriter, Segment, create_segment, fsync_dir
from empath.supervisor import Track, untracked

__all__ = ["FileBodyWriter", "FileSpool", "map_os_error"]

# What stays decoded (spool/index.py): a message whose newest state is durable is held as
# a brief unless a unit of it is due within CHILL_AFTER_S (the runner will read it soon),
# and always once more than HOT_LIMIT messages are held decoded (a queue built by ingest
# for a domain that takes nothing).
CHILL_AFTER_S = 60.0
HOT_LIMIT = 10_000

log = get_logger("spool", __name__)


class FileSpool(IndexedMessages, Compaction):
    """The production :class:`~empath.spool.store.Spool` (see the module doc)."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock | None = None,
        segment_bytes: int = SEGMENT_BYTES,
        spill_bytes: int = 256 * 1024,
        compact_live_ratio: float = 0.5,
        progress_every: int = 100_000,
        fdatasync: Callable[[int], None] = os.fdatasync,
        track: Track = untracked,
        commit_delay_us: int = 0,
        preformat: bool = False,
    ) -> None:
        """``track`` starts the commits of spilled bodies (the daemon's supervisor keeps
        them; the SMTP session that asked awaits each).  ``commit_delay_us`` > 0: the
        writer may hold a small batch open that long for more (commit_delay.py).
        ``preformat``: new segments are pre-formatted spares (preformat.py; the daemon's
        ``spool.preformat``, on by default; off here for tools and tests)."""
        self._commit_delay_us = commit_delay_us
        self._preformat = preformat
        self._spares: Preformatter | None = None
        self._track = track
        self.path = Path(path)
        self._clock = clock or SystemClock()
        self._segment_bytes = segment_bytes
        self._spill_bytes = spill_bytes
        self._compact_live_ratio = compact_live_ratio
        self._progress_every = progress_every
        self._fdatasync = fdatasync
        self._log_dir = self.path / "log"
        self._bodies_dir = self.path / "bodies"
        self._index = MessageIndex(decode=self._decode)
        self._locs: dict[str, int] = {}  # packed BodyLocation per live message
        self._segments: dict[int, Segment] = {}
        self._segments_lock = threading.Lock()
        self._writer: LogWriter | None = None
        self._lock_fd: int | None = None
        self._removing: set[str] = set()
        self._spill_total = 0
        self._compact_lock = asyncio.Lock()
        self._closing = False
        self._reserve = Reserve(self.path / "reserve")
        self._reserve_was_held = True
        self._before_state: Callable[[], None] | None = None
        self.last_recovery: RecoveryReport | None = None

    def sync_before_state(self, hook: Callable[[], None]) -> None:
        """Have the writer thread call ``hook`` before each batch holding a state change
        or a tombstone (the message history's fdatasync: journal.py)."""
        self._before_state = hook
        if self._writer is not None:
            self._writer.before_state = hook

    def __repr__(self) -> str:
        writer = self._writer
        if writer is None:
            return f"<FileSpool {str(self.path)!r} closed messages={len(self._index)}>"
        with self._segments_lock:
            segments = len(self._segments)
            log_bytes = sum(seg.size for seg in self._segments.values())
        return (
            f"<FileSpool {str(self.path)!r} open messages={len(self._index)} "
            f"segments={segments} active={writer.active.name} log_bytes={log_bytes} "
            f"spilled_bytes={self._spill_total} batches={writer.batches} "
            f"records_written={writer.records}>"
        )

    # --- lifecycle --------------------------------------------------------------

    async def open(self) -> RecoveryReport:
        if self._writer is not None:
            raise SpoolError("spool is already open")
        started = time.monotonic()
        try:
            report, dropped = await asyncio.to_thread(self._open_blocking)
        except OSError as exc:
            raise map_os_error(exc, f"opening the spool at {self.path}") from exc
        assert self._writer is not None
        self._writer.start(asyncio.get_running_loop(), self._on_batch)
        if self._spares is not None:
            self._spares.request()  # in its own thread: start-up does not wait for it
        for msg_id in dropped:  # tombstone them so they are reported only once
            self._writer.submit(Entry(EntryKind.DEL, msg_id, codec.del_payload(msg_id)))
        self.last_recovery = replace(report, seconds=time.monotonic() - started)
        return self.last_recovery

    def _open_blocking(self) -> tuple[RecoveryReport, list[str]]:
        self._make_dirs()
        lock_fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise SpoolError(f"{self.path} is in use by another process") from None
        self._lock_fd = lock_fd
        try:
            rec = recover(self.path, progress_every=self._progress_every)
            self._locs, self._segments = rec.locations, rec.segments
            self._index = MessageIndex.adopt(rec.index, self._decode)
            self._spill_total = rec.spill_bytes
            st = os.statvfs(self.path)
            size = reserve_size(st.f_blocks * st.f_frsize)
            if not self._reserve.restore(size) and self._drop_dead_segments():
                self._reserve.restore(size)
            spares = self._spares = None
            if self._preformat:
                spares = Preformatter(
                    self._log_dir, self._segment_bytes, room=self._room, fdatasync=self._fdatasync
                )
                spares.adopt()
                self._spares = spares
            else:
                remove_spares(self._log_dir)
            self._writer = LogWriter(
                self._log_dir,
                self._segments,
                self._segments_lock,
                self._active_segment(),
                segment_bytes=self._segment_bytes,
                fdatasync=self._fdatasync,
                clock_now=self._clock.now,
                reserve=self._reserve,
                commit_delay=(
                    CommitDelay(max_hold_s=self._commit_delay_us / 1e6)
                    if self._commit_delay_us > 0
                    else None
                ),
                spares=spares,
            )
            self._writer.before_state = self._before_state
        except BaseException:
            for seg in self._segments.values():
                with contextlib.suppress(OSError):
                    os.close(seg.read_fd)
            self._segments = {}
            self._release_lock()
            raise
        report = RecoveryReport(
            messages=len(self._index),
            records=rec.records,
            quarantined=rec.quarantined,
            missing=len(rec.dropped),
            seconds=0.0,
            deferred=rec.deferred,
        )
        return report, rec.dropped

    def _room(self, size: int) -> bool:
        """Whether a spare of ``size`` bytes may be made now (space.may_preformat)."""
        st = os.statvfs(self.path)
        return may_preformat(
            st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, size, self._reserve.held
        )

    def _make_dirs(self) -> None:
        """Create what is missing of the spool's directories; each new entry is made
        durable by syncing its parent (the spool directory's parent the first time)."""
        for sub in (self.path, self._log_dir, self._bodies_dir, self.path / "corrupt"):
            missing: list[Path] = []
            at = sub
            while not at.is_dir():
                missing.append(at)
                at = at.parent
            for new in reversed(missing):
                new.mkdir(mode=0o700 if new.is_relative_to(self.path) else 0o777, exist_ok=True)
                fsync_dir(new.parent)

    def _active_segment(self) -> Segment:
        """The segment to append to: the newest, unless it is full or was never written."""
        seq = max(self._segments, default=0) + 1
        while self._segments and self._segments[max(self._segments)].size == 0:
            # A crash while creating it (an empty file, or a torn header that recovery
            # cut off): it holds no record.  Drop it and carry on as if it had never been
            # created; a replacement declares the end of the real predecessor - never the
            # dropped file's size, 0, which would make the next recovery discard that
            # whole predecessor (issue 7, defect 2).
            empty = self._segments[max(self._segments)]
            assert not empty.refs
            self._drop_segment_file(empty)
            seq = empty.seq
        active = self._segments[max(self._segments)] if self._segments else None
        if active is None or active.size >= self._segment_bytes:
            prev_end = active.size if active else None
            try:
                new = create_segment(self._log_dir, seq, prev_end, self._clock.now())
            except OSError as exc:
                if active is None or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # A full disk must not stop start-up: go on with the full segment; the
                # writer retries the rotation before its next batch (which fails, 452,
                # until there is space again).
                log.warn(
                    "Spool filesystem full: no new segment yet",
                    segment=active.name,
                    error=exc.strerror,
                )
                return active
            self._segments[new.seq] = active = new
        return active

    def _drop_dead_segments(self) -> bool:
        """Start-up on a full disk with the reserve given up (a stop before compaction
        could reclaim): delete the oldest segments that hold no live message - the
        only way to get space back without writing.  Oldest first and contiguous, so no
        tombstone outlives its record; if every segment goes, the next is a fresh one."""
        dropped = False
        for seq in sorted(self._segments):
            seg = self._segments[seq]
            if seg.refs:
                break
            log.warn("Spool filesystem full at start: deleted a segment of finished mail",
                     segment=seg.name, freed_bytes=seg.size)  # fmt: skip
            self._drop_segment_file(seg)
            dropped = True
        if dropped:
            fsync_dir(self._log_dir)
        return dropped

    def _drop_segment_file(self, seg: Segment) -> None:
        with contextlib.suppress(OSError):
            os.close(seg.read_fd)
        seg.path.unlink()
        self._segments.pop(seg.seq, None)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def close(self) -> None:
        if self._writer is None:
            return
        # A compaction under way finishes the segment it is on (its copies need the
        # writer) and starts no other; only then do the writer and the segments go.
        self._closing = True
        async with self._compact_lock:
            writer, self._writer = self._writer, None
            if writer is None:
                return
            await asyncio.to_thread(writer.stop)
            await asyncio.sleep(0)  # let the last batch callback run
            with self._segments_lock:
                segments, self._segments = list(self._segments.values()), {}
            for seg in segments:
                with contextlib.suppress(OSError):
                    os.close(seg.read_fd)
            self._release_lock()

    # --- writing ----------------------------------------------------------------

    def begin(self) -> FileBodyWriter:
        return FileBodyWriter(new_ulid(), self._bodies_dir, self._spill_bytes)

    def _live_writer(self) -> LogWriter:
        if self._writer is None:
            raise SpoolError("spool is not open")
        return self._writer

    async def commit(
        self, body: BodyWriter, envelope: Envelope, units: tuple[UnitState, ...]
    ) -> MessageState:
        return await self.start_commit(body, envelope, units)

    def start_commit(
        self, body: BodyWriter, envelope: Envelope, units: tuple[UnitState, ...]
    ) -> asyncio.Future[MessageState]:
        """The commit as a future, without a Task for the common case (an inline body):
        the record is built and queued now, the future resolves once it is durable."""
        if not isinstance(body, FileBodyWriter):
            raise TypeError("FileSpool.commit needs a writer from FileSpool.begin()")
        writer = self._live_writer()
        body._start_commit()
        size = body.size
        if envelope.size != size:
            envelope = replace(envelope, size=size)
        if type(units) is not tuple:
            units = tuple(units)
        msg = MessageState(body.id, envelope, units)
        loop = asyncio.get_running_loop()
        if body.spilled:
            # The SMTP session that asked awaits it (its pending_task) and answers from
            # its done-callback; the supervisor keeps it for shutdown.
            return self._track(self._commit_spilled(writer, body, msg), name="empath-commit")
        payload, body_rel = codec.msg_payload(
            body.id, envelope, units, body_bytes=size, spilled=False,
            inline_body=body._inline_body(),
        )  # fmt: skip
        body._state = BodyState.DONE  # its bytes now live in the record
        future: asyncio.Future[MessageState] = loop.create_future()
        writer.submit(
            Entry(EntryKind.COMMIT, body.id, payload, future, body_rel=body_rel,
                  body_bytes=size, message=msg)
        )  # fmt: skip
        return future

    async def _commit_spilled(
        self, writer: LogWriter, body: FileBodyWriter, msg: MessageState
    ) -> MessageState:
        try:
            await asyncio.to_thread(body._finish_spill)
        except OSError as exc:
            body.abort()
            raise map_os_error(exc, "writing the message body") from exc
        payload, body_rel = codec.msg_payload(
            body.id, msg.envelope, msg.units, body_bytes=body.size, spilled=True
        )
        future: asyncio.Future[MessageState] = asyncio.get_running_loop().create_future()
        writer.submit(
            Entry(EntryKind.COMMIT, body.id, payload, future, body_rel=body_rel,
                  body_bytes=body.size, spilled=True, message=msg)
        )  # fmt: skip
        try:
            await future
        except SpoolError:
            body._state = BodyState.DONE
            await asyncio.to_thread(_unlink_quietly, self._bodies_dir / body.id)
            raise
        body._state = BodyState.DONE
        return msg

    async def update(
        self, msg_id: str, units: tuple[UnitState, ...], *, durable: bool = True
    ) -> MessageState:
        writer = self._live_writer()
        old = self.get(msg_id)
        new = MessageState(old.id, old.envelope, tuple(units))  # (replace(): 3x the cost)
        self._index[msg_id] = new
        entry = Entry(EntryKind.STATE, msg_id, codec.state_payload(msg_id, new.units), message=new)
        if durable:
            entry.future = asyncio.get_running_loop().create_future()
        writer.submit(entry)
        if entry.future is not None:
            await entry.future
        return new

    async def remove(self, msg_id: str, *, durable: bool = True) -> None:
        writer = self._live_writer()
        self._known(msg_id)
        packed = self._locs.get(msg_id)
        loc = None if packed is None else BodyLocation.unpack(packed)
        if not durable and (loc is None or not loc.spilled):
            # Gone for every reader now; the tombstone is gathered with the others of
            # the next LAZY_FLUSH_S into one record (LogWriter.submit lazy), written
            # after the message history is synced.  Its MSG record is dead for
            # compaction at once: never copied forward (a copy after the tombstone
            # would bring it back), and its segment may be deleted before the
            # tombstone is written - which forgets the message just as well.  Were it
            # kept live until the tombstone is durable, a full disk that refuses the
            # tombstone would pin its segment for good, and the space of delivered
            # mail could never come back through compaction (issue 20, disk full).
            self._index.forget(msg_id)
            if packed is not None and loc is not None:
                del self._locs[msg_id]
                self._unplace(msg_id, loc)
            writer.submit(Entry(EntryKind.DEL, msg_id, codec.del_payload(msg_id)), lazy=True)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._removing.add(msg_id)
        try:
            writer.submit(Entry(EntryKind.DEL, msg_id, codec.del_payload(msg_id), future))
            await future
        finally:
            self._removing.discard(msg_id)
        if loc is not None and loc.spilled:
            await asyncio.to_thread(_unlink_quietly, self._bodies_dir / msg_id)

    def _on_batch(self, batch: list[Entry], error: OSError | None) -> None:
        """Runs on the loop once per written batch: index bookkeeping, then wake the waiters."""
        if self._reserve.held is not self._reserve_was_held:
            self._reserve_changed()
        if error is not None:
            log.error(
                "Spool write failed",
                error=error.strerror or str(error),
                errno=error.errno,
                records=len(batch),
                path=str(self.path),
            )
            for entry in batch:
                fut = entry.future
                if fut is not None and not fut.done():
                    fut.set_exception(map_os_error(error, "writing to the spool log"))
                elif fut is None and entry.kind is EntryKind.DEL and self._writer is not None:
                    # lazy tombstones: gathered again for the next flush (the messages
                    # are out of the index already; until written, a restart delivers
                    # them again, which is the at-least-once side of the trade)
                    with contextlib.suppress(RuntimeError):  # the writer is stopping
                        self._writer.submit(entry, lazy=True)
            return
        for entry in batch:
            kind = entry.kind
            if kind is EntryKind.STATE:
                if entry.message is not None and self._may_chill(entry.message):
                    start = entry.offset + codec.HEADER_BYTES + codec.MSG_PREFIX_BYTES
                    json_bytes = len(entry.payload) - codec.MSG_PREFIX_BYTES
                    state = pack_state(entry.seg, start, json_bytes)
                    self._index.chill(entry.msg_id, entry.message, state)
            elif kind is EntryKind.COMMIT:
                assert entry.message is not None
                self._index[entry.msg_id] = entry.message
                self._place(entry)
                if entry.spilled:
                    self._spill_total += entry.body_bytes
                if self._index.hot > HOT_LIMIT:
                    self._index.chill(entry.msg_id, entry.message, 0)
            elif kind is EntryKind.COPY:
                packed = self._locs.get(entry.msg_id)
                if packed is not None and packed_seg(packed) == entry.from_seg:
                    self._unplace(entry.msg_id, BodyLocation.unpack(packed))
                    self._place(entry)
                    brief = self._index.brief(entry.msg_id)
                    if brief is not None:
                        brief.state = 0  # the copy holds the newest units
            elif kind is EntryKind.DEL:
                for msg_id in entry.ids:
                    self._index.forget(msg_id)
                    packed = self._locs.pop(msg_id, None)
                    if packed is not None:
                        loc = BodyLocation.unpack(packed)
                        self._unplace(msg_id, loc)
                        if loc.spilled:
                            self._spill_total -= loc.length
            fut = entry.future
            if fut is not None and not fut.done():
                fut.set_result(entry.message)

    def _reserve_changed(self) -> None:
        held = self._reserve_was_held = self._reserve.held
        if held:
            log.info("Spool space reserve restored; accepting mail again", path=str(self.path))
        else:
            log.warn(
                "Spool filesystem full: space reserve released for deletions and compaction; "
                "new mail refused (452) until space is reclaimed",
                path=str(self.path),
                reclaimable_bytes=self.reclaimable_bytes(),
            )

    def _may_chill(self, msg: MessageState) -> bool:
        """Whether ``msg`` (its newest state now durable) may be held as a brief."""
        if self._index.hot > HOT_LIMIT:
            return True
        soon = self._clock.now() + CHILL_AFTER_S
        for unit in msg.units:
            st = unit.status
            if not st.terminal and st is not UnitStatus.HELD and unit.next_attempt_at < soon:
                return False
        return True

    def _decode(self, brief: Brief) -> MessageState:
        """A brief's message, read from its records (spool/index.py)."""
        loc = BodyLocation.unpack(self._locs[brief.id])
        try:
            head = codec.loads(self._pread(loc.seg, loc.offset, loc.json_bytes))
            if brief.state:
                units_src = codec.loads(self._pread(*unpack_state(brief.state)))["units"]
            else:
                units_src = head["units"]
            envelope = codec.envelope_from_json(head["envelope"])
            units = requeue_in_progress(codec.units_from_json(units_src))
        except OSError as exc:
            raise map_os_error(exc, f"reading the records of {brief.id}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolError(f"the records of {brief.id} do not decode: {exc}") from exc
        return MessageState(id=brief.id, envelope=envelope, units=units)

    def _pread(self, seq: int, offset: int, length: int) -> bytes:
        seg = self._segments[seq]
        data = os.pread(seg.read_fd, length, offset)
        if len(data) != length:
            raise SpoolError(f"record in {seg.name}@{offset} is short")
        return data

    def _known(self, msg_id: str) -> None:
        if msg_id not in self._index:
            raise UnknownMessageError(f"no such message: {msg_id}")

    def _place(self, entry: Entry) -> None:
        seg = self._segments[entry.seg]
        self._locs[entry.msg_id] = BodyLocation(
            seg=entry.seg,
            offset=entry.offset + codec.HEADER_BYTES + codec.MSG_PREFIX_BYTES,
            length=entry.body_bytes,
            spilled=entry.spilled,
            record_bytes=entry.record_bytes,
        ).pack()
        seg.refs.add(entry.msg_id)
        seg.live_bytes += entry.record_bytes

    def _unplace(self, msg_id: str, loc: BodyLocation) -> None:
        seg = self._segments.get(loc.seg)
        if seg is not None:
            seg.refs.discard(msg_id)
            seg.live_bytes -= loc.record_bytes

    # --- reading ----------------------------------------------------------------

    def _location(self, msg_id: str) -> BodyLocation:
        self._known(msg_id)
        return BodyLocation.unpack(self._locs[msg_id])

    def _pread_inline(self, loc: BodyLocation) -> bytes:
        seg = self._segments[loc.seg]
        data = os.pread(seg.read_fd, loc.length, loc.body_offset)
        if len(data) != loc.length:
            raise SpoolError(f"body in {seg.name}@{loc.body_offset} is short")
        return data

    async def read_body(self, msg_id: str) -> bytes:
        loc = self._location(msg_id)
        try:
            if loc.spilled:
                return await asyncio.to_thread((self._bodies_dir / msg_id).read_bytes)
            return self._pread_inline(loc)
        except OSError as exc:
            raise map_os_error(exc, f"reading the body of {msg_id}") from exc

    async def iter_body(self, msg_id: str, chunk_bytes: int = 65536) -> AsyncIterator[bytes]:
        loc = self._location(msg_id)
        if not loc.spilled:
            try:
                data = self._pread_inline(loc)
            except OSError as exc:
                raise map_os_error(exc, f"reading the body of {msg_id}") from exc
            view = memoryview(data)
            for start in range(0, len(data), chunk_bytes):
                yield bytes(view[start : start + chunk_bytes])
            return
        try:
            fd = await asyncio.to_thread(
                os.open, self._bodies_dir / msg_id, os.O_RDONLY | os.O_CLOEXEC
            )
        except OSError as exc:
            raise map_os_error(exc, f"opening the body of {msg_id}") from exc
        try:
            while True:
                chunk = await asyncio.to_thread(os.read, fd, chunk_bytes)
                if not chunk:
                    return
                yield chunk
        finally:
            os.close(fd)

    def usage(self) -> SpoolUsage:
        st = os.statvfs(self.path)
        with self._segments_lock:
            log_bytes = sum(seg.size for seg in self._segments.values())
        writer = self._writer
        spare = 0 if writer is None else writer.preformatted_bytes
        return SpoolUsage(
            free_bytes=st.f_bavail * st.f_frsize,
            total_bytes=st.f_blocks * st.f_frsize,
            size_bytes=log_bytes + self._spill_total + spare,
            preformatted_bytes=spare,
            reclaimable_bytes=self.reclaimable_bytes(),
            reserve_bytes=self._reserve.size if self._reserve.held else 0,
            reserve_released=not self._reserve.held,
        )

    def segment_stats(self) -> list[tuple[str, int, int, int]]:
        """(file name, size, live MSG bytes, live messages) per segment, oldest first."""
        with self._segments_lock:
            segs = sorted(self._segments.values(), key=lambda s: s.seq)
        return [(s.name, s.size, s.live_bytes, len(s.refs)) for s in segs]


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
