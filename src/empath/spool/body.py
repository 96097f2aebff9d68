"""Message bodies being received: buffered in memory, spilled to ``<spool>/bodies/<id>`` when large.

Theory of operation.  ``FileBodyWriter.write`` is called from the SMTP
transport's ``data_received`` and must be cheap and never raise.  Up to
``spill_bytes`` are kept in memory (the common case: the body goes inline into
the message's log record).  Past that the body is written, unsynced, to its
own file as it arrives: every ``FLUSH_BYTES`` buffered are handed to the
spill thread, which creates the file and writes them - file creation and
writes never run on the event loop (a write can block on a busy disk).  The
thread is one for all bodies, so each body's writes happen in order.  A body
keeps at most ``MAX_QUEUED_BYTES`` waiting for that thread; past that (a disk
slower than the network) ``write`` waits for its oldest chunk, so a 25 MiB
message costs about a MiB of memory whatever the disk does.  An I/O error is
remembered and raised (mapped to the spool's error tree) when the body is
committed.  At commit a spilled body is fsync'd and its directory fsync'd - in
a thread, never on the event loop - before the record that references it is
written.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Final

from empath.errors import SpoolError, SpoolFullError
from empath.spool.writer import fsync_dir

__all__ = ["FLUSH_BYTES", "MAX_QUEUED_BYTES", "BodyState", "FileBodyWriter", "map_os_error"]

FLUSH_BYTES: Final = 64 * 1024  # spilled bodies are written out in chunks of about this size
MAX_QUEUED_BYTES: Final = 1024 * 1024  # per body, waiting for the spill thread
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})

_spill_pool: ThreadPoolExecutor | None = None
_spill_pool_lock = threading.Lock()


def _spill_thread() -> ThreadPoolExecutor:
    """The one thread that creates and writes spill files (FIFO: per-body order holds)."""
    global _spill_pool
    if _spill_pool is None:
        with _spill_pool_lock:
            if _spill_pool is None:
                _spill_pool = ThreadPoolExecutor(1, thread_name_prefix="empath-spill")
    return _spill_pool


def map_os_error(exc: OSError, what: str) -> SpoolError:
    """ENOSPC/EDQUOT -> SpoolFullError (452 4.3.1); anything else -> SpoolError (451 4.3.0)."""
    if exc.errno in _FULL_ERRNOS:
        return SpoolFullError(f"{what}: spool filesystem is full ({exc.strerror})")
    return SpoolError(f"{what}: {exc.strerror or exc}")


class BodyState(enum.Enum):
    """Where a body is in its life: OPEN -> COMMITTING -> DONE, or -> ABORTED."""

    OPEN = "open"  # receiving bytes
    COMMITTING = "committing"  # handed to FileSpool.commit
    DONE = "done"  # its bytes live in a log record or a synced spill file
    ABORTED = "aborted"  # discarded


class FileBodyWriter:
    """A message body being received.  ``write`` never raises; errors surface at commit."""

    __slots__ = (
        "_bodies_dir",
        "_buffered",
        "_chunks",
        "_error",
        "_fd",
        "_id",
        "_io_lock",
        "_jobs",
        "_queued",
        "_size",
        "_spill_bytes",
        "_state",
    )

    def __init__(self, msg_id: str, bodies_dir: Path, spill_bytes: int) -> None:
        self._id = msg_id
        self._bodies_dir = bodies_dir  # the file path is only built if the body spills
        self._spill_bytes = spill_bytes
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._fd: int | None = None  # owned by the spill thread until commit
        self._error: OSError | None = None  # set by the spill thread
        self._state = BodyState.OPEN
        # Chunks handed to the spill thread and not known to be written (loop side only).
        self._jobs: collections.deque[tuple[Future[None], int]] | None = None
        self._queued = 0
        self._io_lock: threading.Lock | None = None  # the file's, once the body spills

    @property
    def id(self) -> str:
        return self._id

    @property
    def size(self) -> int:
        return self._size

    @property
    def state(self) -> BodyState:
        return self._state

    @property
    def spilled(self) -> bool:
        """True once the body has (begun to) go to its own file."""
        return self._jobs is not None

    def write(self, data: bytes) -> None:
        if self._state is not BodyState.OPEN or not data:
            return
        chunk = bytes(data)
        self._size += len(chunk)
        if self._error is not None:
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._jobs is None:
            if self._buffered <= self._spill_bytes:
                return
            self._jobs = collections.deque()
            self._io_lock = threading.Lock()
        elif self._buffered < FLUSH_BYTES:
            return
        self._hand_over()

    def _hand_over(self) -> None:
        """Give what is buffered to the spill thread (loop side)."""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        jobs = self._jobs
        assert jobs is not None
        while jobs and jobs[0][0].done():
            self._queued -= jobs.popleft()[1]
        while jobs and self._queued >= MAX_QUEUED_BYTES:  # the disk is behind: wait
            future, n = jobs.popleft()
            future.result()
            self._queued -= n
        jobs.append((_spill_thread().submit(self._write_out, data), len(data)))
        self._queued += len(data)

    def _path(self) -> str:
        return os.path.join(self._bodies_dir, self._id)

    def _write_out(self, data: bytes) -> None:
        """Create the file if needed and append ``data`` (the spill thread)."""
        assert self._io_lock is not None
        with self._io_lock:
            if self._error is not None or self._state is BodyState.ABORTED:
                return
            try:
                if self._fd is None:
                    self._fd = self._create()
                _write_all(self._fd, data)
            except OSError as exc:
                self._error = exc

    def _create(self) -> int:
        return os.open(self._path(), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def abort(self) -> None:
        if self._state in (BodyState.ABORTED, BodyState.DONE):
            return
        self._state = BodyState.ABORTED
        self._chunks.clear()
        if self._jobs is not None:  # after the writes already queued
            _spill_thread().submit(self._discard_file)

    def _discard_file(self) -> None:
        """Close and remove a file still being written (the spill thread).  A file that
        commit already synced and closed is the spool's to keep or remove."""
        assert self._io_lock is not None
        with self._io_lock:
            self._discard_locked()

    def _discard_locked(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):
                os.unlink(self._path())

    # --- used by FileSpool.commit ------------------------------------------------

    def _start_commit(self) -> None:
        if self._state is BodyState.ABORTED:
            raise SpoolError("message body was aborted")
        if self._state is not BodyState.OPEN:
            raise SpoolError("message body was already committed")
        self._state = BodyState.COMMITTING

    def _inline_body(self) -> bytes:
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    def _finish_spill(self) -> None:
        """Wait for the spill thread, write the rest, fsync the body and its directory
        (blocking: in a thread).  Raises the OSError of a failed write or sync."""
        jobs = self._jobs
        assert jobs is not None
        if jobs:
            jobs[-1][0].result()  # one FIFO thread: every earlier write is done too
        jobs.clear()
        self._queued = 0
        assert self._io_lock is not None
        with self._io_lock:
            if self._state is BodyState.ABORTED:  # the commit was cancelled meanwhile
                raise OSError(errno.ECANCELED, "message body was aborted")
            if self._error is None:
                try:
                    if self._fd is None:
                        self._fd = self._create()
                    _write_all(self._fd, self._inline_body())
                    os.fsync(self._fd)
                except OSError as exc:
                    self._error = exc
            if self._error is not None:
                self._state = BodyState.ABORTED
                self._discard_locked()  # a failed commit leaves no file behind
                raise self._error
            assert self._fd is not None
            os.close(self._fd)
            self._fd = None
        fsync_dir(self._bodies_dir)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
