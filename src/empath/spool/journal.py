"""Message history (`empathctl message log ID`): what happened to a message, kept after it
leaves the queue.

Theory of operation
-------------------
While a message is queued, the spool holds most of its story (the envelope, each
unit's last attempts).  What the spool forgets - TLS of each attempt, DSNs sent,
operator actions, and the message itself once it is delivered or deleted - is
appended here as one JSON line per event to an hourly file under
``<spool>/journal/``.  Nothing is written when a message is accepted (the ingest
path pays nothing); the envelope is written once, in the ``left`` event, when
the message leaves the queue.

Durability (DESIGN §3): every event is recorded before the spool change it goes
with (the attempt before the unit's new state, ``left`` before the tombstone, an
operator's action before the state it sets).  ``record`` only appends the line to a
buffer, on the loop, at no I/O cost; the spool's group-commit thread calls
:meth:`MessageJournal.sync` before it writes a batch holding a state change or a
tombstone, which writes the buffered lines and ``fdatasync``s the file.  So once a
state change is durable, every event recorded before it is too: a power cut loses
the history no more than it loses the queue, and a batch of new messages alone (the
ingest path) never waits for it.  The sync runs in that thread, never on the loop.
A lookup writes what is buffered, then reads the files still kept, oldest first,
for lines holding the id (a grep: no index in memory, so the history costs no RAM
per message).  Files older than ``failed_retention_secs`` are deleted by the janitor.
A failing history disk is ignored: the history is for people, the mail goes on.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from typing import Any, Final

import orjson

from empath.clock import Clock

DIR_NAME: Final = "journal"
FILE_SECONDS: Final = 3600  # one file per hour
MAX_TEXT: Final = 1000  # characters of remote reply text kept per event


class MessageJournal:
    """Append-only hourly JSON-lines files of message events (see module doc)."""

    def __init__(
        self,
        directory: str | None,
        retention_s: float,
        clock: Clock,
        fdatasync: Any = os.fdatasync,
    ) -> None:
        self.directory = directory
        self.retention_s = retention_s
        self._clock = clock
        self._fdatasync = fdatasync
        # _pending, the file and _unsynced are shared with the spool's writer thread
        self._lock = threading.Lock()
        self._pending: list[tuple[int, bytes]] = []  # (hour, line) recorded, not written
        self._fd = -1
        self._file_hour = -1
        self._unsynced = False  # written since the last fdatasync
        self.syncs = 0

    def record(self, msg_id: str, event: str, **fields: Any) -> None:
        """Buffer one event (``attempt``, ``dsn``, ``operator``, ``expired``, ``left``);
        record it *before* the spool change it goes with (see the module doc)."""
        if self.directory is None:
            return
        now = self._clock.now()
        for k, v in fields.items():
            if isinstance(v, str) and len(v) > MAX_TEXT:
                fields[k] = v[:MAX_TEXT]
        # orjson: ~1 µs a line against ~7 for json.dumps (two lines per delivered message)
        line = orjson.dumps({"id": msg_id, "at": now, "event": event, **fields})
        with self._lock:
            self._pending.append((int(now // FILE_SECONDS), line + b"\n"))

    def flush(self) -> None:
        """Write the buffered lines to their files (no fdatasync)."""
        if self._pending:
            with self._lock:
                self._write_pending()

    def sync(self) -> None:
        """Write the buffered lines and fdatasync them: the spool's writer thread calls
        this before a batch of state changes (never on the event loop)."""
        with self._lock:
            self._write_pending()
            if not self._unsynced or self._fd < 0:
                return
            fd = os.dup(self._fd)  # the loop may rotate the file while this one syncs
            self._unsynced = False
        try:
            self._fdatasync(fd)
            self.syncs += 1
        except OSError:
            return  # a failing history disk: the mail is not affected
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._write_pending()
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    self._fdatasync(self._fd)
                os.close(self._fd)
                self._fd = -1
                self._file_hour = -1

    def _write_pending(self) -> None:
        """Under the lock: append the buffered lines to their hourly files."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            start = 0
            while start < len(pending):
                hour = pending[start][0]
                end = start
                while end < len(pending) and pending[end][0] == hour:
                    end += 1
                data = b"".join(line for _h, line in pending[start:end])
                fd = self._open(hour)
                while data:
                    data = data[os.write(fd, data) :]
                self._unsynced = True
                start = end
        except OSError:
            return  # a full disk: the history is best effort, the mail is not affected

    def lookup(self, msg_id: str) -> list[dict[str, Any]]:
        """Every event of ``msg_id`` still kept, oldest first."""
        if self.directory is None:
            return []
        self.flush()
        # the id as it appears in a line; files written before orjson had a space after ':'
        needle = msg_id.encode()
        out: list[dict[str, Any]] = []
        for name in self._files():
            try:
                with open(os.path.join(self.directory, name), "rb") as f:
                    for line in f:
                        if needle in line:
                            try:
                                obj = orjson.loads(line)
                            except ValueError:
                                continue  # a line torn by a crash
                            if obj.get("id") == msg_id:
                                out.append(obj)
            except OSError:
                continue
        return out

    def purge(self) -> int:
        """Delete files whose newest event is older than the retention; how many."""
        if self.directory is None:
            return 0
        cutoff_hour = int((self._clock.now() - self.retention_s) // FILE_SECONDS)
        n = 0
        for name in self._files():
            hour = _hour_of(name)
            if hour is not None and hour < cutoff_hour and hour != self._file_hour:
                try:
                    os.unlink(os.path.join(self.directory, name))
                    n += 1
                except OSError:
                    pass
        return n

    def usage(self) -> Mapping[str, int]:
        """Files and bytes of the history (for `spool status`)."""
        if self.directory is None:
            return {"files": 0, "bytes": 0}
        self.flush()
        files = self._files()
        size = 0
        for name in files:
            try:
                size += os.stat(os.path.join(self.directory, name)).st_size
            except OSError:
                pass
        return {"files": len(files), "bytes": size}

    def _files(self) -> list[str]:
        assert self.directory is not None
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(n for n in names if _hour_of(n) is not None)

    def _open(self, hour: int) -> int:
        """Under the lock: the fd of ``hour``'s file; the previous file is synced and
        closed, a new file's directory entry synced."""
        if self._fd >= 0 and hour == self._file_hour:
            return self._fd
        assert self.directory is not None
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self._fdatasync(self._fd)
            os.close(self._fd)
            self._fd = -1
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = os.path.join(self.directory, f"{hour}.jsonl")
        new = not os.path.exists(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file_hour = hour
        if new:
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return self._fd


def _hour_of(name: str) -> int | None:
    stem, dot, ext = name.partition(".")
    if ext != "jsonl" or not dot or not stem.isdigit():
        return None
    return int(stem)
