"""Pre-formatted spool segments: a spare segment file written full of zeros beforehand, so
that the writer's group commits overwrite blocks in place instead of appending.

Why (docs/bench.md "Spool: pre-formatted segments").  On ext4 an ``O_DSYNC`` write that
extends a file changes its size and allocates blocks, so every such write commits the
filesystem journal (a wake-up of its jbd2 thread): on the project VM 75-87 µs of kernel
CPU and ~3.7 context switches per append.  Overwriting blocks that were written (not just
allocated) and synced earlier needs only the data and a cache flush: 41-51 µs, 2
switches.  Databases pre-format their logs for the same reason (PostgreSQL's WAL
segments are written full of zeros before use).

Theory of operation.

- One spare at most: ``log/next-<seed>.pre``.  A helper thread (never the event loop, never
  the writer) makes it: ``next-<seed>.tmp`` is created, allocated, written with
  ``segment_bytes`` zero bytes in 1 MiB steps, each step synced (so the writer's own
  syncs never queue behind the whole file's dirty pages), synced, renamed to ``.pre`` and
  the directory synced.  Only zeros are ever written to a spare before it becomes a
  segment, so a spare holds no record: a leftover ``.tmp`` is deleted at open, a leftover
  ``.pre`` of the right size is used.
- The writer takes the spare at a rotation (:meth:`Spares.open_segment`): it writes the
  SEGMENT header (followed by zeros to :data:`HEAD_AREA`, so nothing an earlier attempt
  wrote survives after the header), syncs it, renames the file to its segment name and
  syncs the directory - the same two durable steps as creating a segment.  It asks for
  the next spare once the active segment is half full (well before the rotation that
  takes it; at open if none is ready).  It also rotates to a ready spare *early* when the
  active segment has no pre-formatted room (a segment made before this, or at a start):
  the writer never appends while a spare is ready.
- Where a segment's data ends is the writer's offset in memory, not the file size; on
  disk it is where the records stop and zeros begin (recovery.py reads an all-zero rest
  of a segment as its clean end).  A closed segment's unused zero tail is cut off at
  rotation, so only the active segment and the spare hold pre-formatted bytes; both
  count in the spool's size (``SpoolUsage.preformatted_bytes``).
- Space: a spare is made only while the space reserve is held and the filesystem stays
  out of pressure afterwards (:func:`~empath.spool.space.may_preformat`), so it never
  takes space that deletions, compaction or new mail need; the disk-full rules (the
  reserve, ``452 4.3.1``) are unchanged - a full disk fails the next rotation that has no
  spare, as before.
- Failure (ENOSPC, EIO, anything): the partial file is removed, a warning logged, and
  segments are created as before (appended) until the next rotation asks again.  Nothing
  here ever fails a commit.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

from empath.logs import get_logger
from empath.spool import codec
from empath.spool.codec import RecordType
from empath.spool.writer import Segment, fsync_dir, open_for_append, write_all

log = get_logger("spool", __name__)

CHUNK_BYTES: Final = 1 << 20  # zeros written (and synced) per step
HEAD_AREA: Final = 512  # the header is written followed by zeros up to this offset
_PRE, _TMP = ".pre", ".tmp"


def spare_seed(name: str) -> tuple[int, str] | None:
    """(seed, suffix) of a spare's file name (``next-<seed>.pre`` / ``.tmp``), else None."""
    if len(name) != 17 or not name.startswith("next-") or name[-4:] not in (_PRE, _TMP):
        return None
    try:
        return int(name[5:13], 16), name[-4:]
    except ValueError:
        return None


class Preformatter:
    """Keeps one pre-formatted spare segment ready (see the module doc).  Thread-safe: the
    helper thread makes spares, the writer thread takes them, the loop reads sizes."""

    def __init__(
        self,
        log_dir: Path,
        size: int,
        *,
        room: Callable[[int], bool],
        fdatasync: Callable[[int], None] = os.fdatasync,
    ) -> None:
        self._log_dir = log_dir
        self.size = size
        self._room = room  # whether ``size`` more bytes may be taken now (space.py)
        self._sync = fdatasync
        self._dsync = fdatasync is os.fdatasync
        self._lock = threading.Lock()
        self._ready: tuple[Path, int] | None = None  # (path, seed)
        self._maker: threading.Thread | None = None
        self._stopping = False
        self.made = 0  # spares made since open
        self.used = 0  # spares that became segments
        self.failures = 0

    def adopt(self) -> None:
        """At open (blocking): use a complete spare left by a previous run; delete the rest."""
        for entry in os.scandir(self._log_dir):
            parsed = spare_seed(entry.name)
            if parsed is None:
                continue
            seed, suffix = parsed
            path = Path(entry.path)
            if suffix == _PRE and self._ready is None and entry.stat().st_size == self.size:
                self._ready = (path, seed)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()

    def ready(self) -> bool:
        return self._ready is not None

    @property
    def spare_bytes(self) -> int:
        return self.size if self._ready is not None else 0

    def request(self) -> None:
        """Start making a spare unless one is ready or being made."""
        with self._lock:
            if self._stopping or self._ready is not None:
                return
            if self._maker is not None and self._maker.is_alive():
                return
            self._maker = threading.Thread(
                target=self._make, name="empath-spool-preformat", daemon=True
            )
            self._maker.start()

    def wait(self) -> None:
        """Wait for the spare being made, if any (blocking; tests and benchmarks)."""
        maker = self._maker
        if maker is not None:
            maker.join()

    def stop(self) -> None:
        """Abandon a spare being made and wait for the helper (blocking).  A ready spare
        stays on disk for the next open."""
        with self._lock:
            self._stopping = True
            maker = self._maker
        if maker is not None:
            maker.join()

    def _make(self) -> None:
        if not self._room(self.size):
            return  # appended segments until a later rotation finds room
        seed = int.from_bytes(os.urandom(4), "little")
        tmp = self._log_dir / f"next-{seed:08x}{_TMP}"
        ready = tmp.with_suffix(_PRE)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                done = self._zero_fill(fd)
            finally:
                os.close(fd)
            if done:
                os.rename(tmp, ready)
                fsync_dir(self._log_dir)
        except OSError as exc:
            done = False
            self.failures += 1
            log.warn(
                "Could not pre-format a spool segment; new segments are appended",
                path=str(tmp),
                error=exc.strerror or str(exc),
                errno=exc.errno,
            )
        if not done:  # failed, or the spool is closing
            for left in (tmp, ready):
                with contextlib.suppress(OSError):
                    left.unlink()
            return
        with self._lock:
            self._ready = (ready, seed)
            self.made += 1

    def _zero_fill(self, fd: int) -> bool:
        """Write the zeros; False if the spool began closing meanwhile."""
        size = self.size
        with contextlib.suppress(OSError):  # allocation in one piece, if the fs can
            os.posix_fallocate(fd, 0, size)
        zeros = bytes(CHUNK_BYTES)
        for start in range(0, size, CHUNK_BYTES):
            if self._stopping:
                return False
            left = size - start
            write_all(fd, zeros if left >= CHUNK_BYTES else zeros[:left], start)
            os.fdatasync(fd)
        os.fsync(fd)
        return True

    def open_segment(self, seq: int, prev_end: int, now: float) -> tuple[Segment, int, int] | None:
        """Make the ready spare segment ``seq`` (writer thread): the segment, its write fd
        and its file size; None if no spare is ready or it could not be used (it is then
        deleted, logged, and the caller creates a segment as before)."""
        with self._lock:
            spare, self._ready = self._ready, None
        if spare is None:
            return None
        path, seed = spare
        target = self._log_dir / codec.segment_name(seq, seed)
        header = codec.frame(RecordType.SEGMENT, codec.segment_payload(seq, prev_end, now), seed)
        renamed = False
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                write_all(fd, header + bytes(max(0, HEAD_AREA - len(header))), 0)
                self._sync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            os.rename(path, target)
            renamed = True
            fsync_dir(self._log_dir)
            write_fd = open_for_append(target, self._dsync)
            try:
                read_fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                os.close(write_fd)
                raise
        except OSError as exc:
            self.failures += 1
            with contextlib.suppress(OSError):
                (target if renamed else path).unlink()
            log.warn(
                "Could not use the pre-formatted spool segment; creating one",
                path=str(path),
                error=exc.strerror or str(exc),
                errno=exc.errno,
            )
            return None
        self.used += 1
        seg = Segment(seq=seq, seed=seed, path=target, size=len(header), read_fd=read_fd)
        return seg, write_fd, size


def remove_spares(log_dir: Path) -> None:
    """Delete spare files (a spool opened without pre-formatting)."""
    for entry in os.scandir(log_dir):
        if spare_seed(entry.name) is not None:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
