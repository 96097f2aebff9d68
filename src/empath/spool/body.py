"""Message bodies being received: buffered in memory, spilled to ``<spool>/bodies/<id>`` when large.

Theory of operation.  ``FileBodyWriter.write`` is called from the SMTP
transport's ``data_received`` and must be cheap and never raise.  Up to
``spill_bytes`` are kept in memory (the common case: the body goes inline into
the message's log record).  Past that the body is written, unsynced, to its
own file as it arrives, buffering at most ``FLUSH_BYTES`` between writes, so a
25 MiB message costs a few hundred KiB of memory.  An I/O error is remembered
and raised (mapped to the spool's error tree) when the body is committed.  At
commit a spilled body is fsync'd and its directory fsync'd - in a thread, never
on the event loop - before the record that references it is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Final

from empath.errors import SpoolError, SpoolFullError
from empath.spool.writer import fsync_dir

__all__ = ["FLUSH_BYTES", "FileBodyWriter", "map_os_error"]

FLUSH_BYTES: Final = 64 * 1024  # spilled bodies are written out in chunks of about this size
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


def map_os_error(exc: OSError, what: str) -> SpoolError:
    """ENOSPC/EDQUOT -> SpoolFullError (452 4.3.1); anything else -> SpoolError (451 4.3.0)."""
    if exc.errno in _FULL_ERRNOS:
        return SpoolFullError(f"{what}: spool filesystem is full ({exc.strerror})")
    return SpoolError(f"{what}: {exc.strerror or exc}")


class FileBodyWriter:
    """A message body being received.  ``write`` never raises; errors surface at commit."""

    __slots__ = (
        "_bodies_dir",
        "_buffered",
        "_chunks",
        "_error",
        "_fd",
        "_id",
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
        self._fd: int | None = None
        self._error: OSError | None = None
        self._state = "open"  # open | committing | done | aborted

    @property
    def id(self) -> str:
        return self._id

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        if self._state != "open" or not data:
            return
        chunk = bytes(data)
        self._size += len(chunk)
        if self._error is not None:
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._fd is None and self._buffered <= self._spill_bytes:
            return
        if self._fd is not None and self._buffered < FLUSH_BYTES:
            return
        try:
            if self._fd is None:
                self._fd = os.open(
                    self._path(), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
                )
            self._flush()
        except OSError as exc:
            self._error = exc
            self._chunks.clear()
            self._buffered = 0

    def _path(self) -> str:
        return os.path.join(self._bodies_dir, self._id)

    def _flush(self) -> None:
        assert self._fd is not None
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def abort(self) -> None:
        if self._state in ("aborted", "done"):
            return
        self._state = "aborted"
        self._chunks.clear()
        self._discard_file()

    def _discard_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):
                os.unlink(self._path())

    # --- used by FileSpool.commit ------------------------------------------------

    def _start_commit(self) -> None:
        if self._state == "aborted":
            raise SpoolError("message body was aborted")
        if self._state != "open":
            raise SpoolError("message body was already committed")
        self._state = "committing"
        if self._error is not None:
            exc = self._error
            self._discard_file()
            raise map_os_error(exc, "writing the message body")

    def _inline_body(self) -> bytes:
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    def _finish_spill(self) -> None:
        """Write what is buffered, fsync the body and its directory (blocking: in a thread)."""
        assert self._fd is not None
        self._flush()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        fsync_dir(self._bodies_dir)
