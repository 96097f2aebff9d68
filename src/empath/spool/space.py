"""Spool space: the reserve that keeps deletions possible on a full disk, and the pure
decisions of when compaction runs and what it takes.

Theory of operation (issue 14, defect 15).  A log-structured spool frees space only
by deleting whole segment files, and writing a deletion (a DEL tombstone) itself
needs space.  Two things follow:

- **The reserve.**  ``<spool>/reserve`` is a preallocated file (:func:`reserve_size`:
  about 1/64 of the filesystem, 256 KiB to 4 MiB).  When a write of tombstones,
  unit states, compaction copies or a rotation meets ENOSPC/EDQUOT, the writer
  thread unlinks it and retries those records; the new messages of that batch are
  refused (``452 4.3.1``), and so is every new message while the reserve is out -
  the freed space is for deleting and compacting, as an ``unlink`` is for Postfix.
  The reserve comes back (:meth:`Reserve.restore`) as soon as the filesystem has
  room for it again; until then acceptance stays refused.
- **Compaction modes.**  ``NORMAL`` (the periodic pass) takes closed segments whose
  live records are at most ``live_ratio`` of their size, oldest first.  Under
  ``PRESSURE`` (the reserve is out, or less than :data:`PRESSURE_FREE_RATIO` of the
  filesystem is free) the active segment is rotated and compacted too, and a segment
  qualifies once its dead bytes are at least :data:`MIN_RECLAIM_BYTES` and a quarter
  of its live bytes (so rewriting live mail costs at most four bytes per byte won
  back: no thrashing on a disk full of live mail); a closed segment the periodic pass
  would take is taken under pressure too.  ``FORCED`` (an operator's
  ``compact(include_active=True)``) takes every segment with a page or more of dead
  bytes.  Segments always go oldest first: a tombstone never outlives its record.

Everything here but :class:`Reserve` is pure and needs no disk.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

RESERVE_MIN_BYTES: Final = 256 * 1024
RESERVE_MAX_BYTES: Final = 4 * 1024 * 1024
PRESSURE_FREE_RATIO: Final = 0.10  # below this share of free space, reclaim eagerly
MIN_RECLAIM_BYTES: Final = 64 * 1024  # under pressure, less dead data is not worth a rewrite
FORCED_MIN_RECLAIM_BYTES: Final = 4096
MAX_REWRITE_PER_FREED: Final = 4  # under pressure: live bytes copied per dead byte freed


class CompactMode(enum.Enum):
    NORMAL = "normal"
    PRESSURE = "pressure"
    FORCED = "forced"


@dataclass(frozen=True, slots=True)
class SegmentSpace:
    """What compaction needs to know of one segment."""

    seq: int
    size: int
    live_bytes: int
    busy: bool = False  # a message in it is being removed right now

    @property
    def dead_bytes(self) -> int:
        return max(0, self.size - self.live_bytes)


def reserve_size(total_bytes: int) -> int:
    """Bytes held back for deletions on a filesystem of ``total_bytes``."""
    return max(RESERVE_MIN_BYTES, min(RESERVE_MAX_BYTES, total_bytes // 64))


def under_pressure(free_bytes: int, total_bytes: int, reserve_held: bool) -> bool:
    """Space is short: reclaim dead records now, the active segment's included."""
    return not reserve_held or free_bytes < PRESSURE_FREE_RATIO * total_bytes


def may_preformat(free_bytes: int, total_bytes: int, size: int, reserve_held: bool) -> bool:
    """Whether a spare segment of ``size`` bytes may be pre-formatted now (preformat.py):
    only with the reserve held and if the filesystem stays out of pressure afterwards, so
    that pre-formatting never takes space deletions, compaction or new mail need."""
    return not under_pressure(free_bytes - size, total_bytes, reserve_held)


def mode_for(include_active: bool, pressure: bool) -> CompactMode:
    if include_active:
        return CompactMode.FORCED
    return CompactMode.PRESSURE if pressure else CompactMode.NORMAL


def worth_compacting(seg: SegmentSpace, mode: CompactMode, live_ratio: float) -> bool:
    """Whether rewriting ``seg``'s live records to free it pays in ``mode``."""
    if mode is CompactMode.NORMAL:
        return seg.live_bytes <= live_ratio * max(seg.size, 1)
    if mode is CompactMode.FORCED:
        return seg.dead_bytes >= FORCED_MIN_RECLAIM_BYTES
    return seg.dead_bytes >= max(MIN_RECLAIM_BYTES, seg.live_bytes // MAX_REWRITE_PER_FREED)


def rotate_active(active: SegmentSpace, mode: CompactMode, live_ratio: float) -> bool:
    """Close the active segment so that it can be compacted (never in NORMAL mode)."""
    return mode is not CompactMode.NORMAL and worth_compacting(active, mode, live_ratio)


def pick_victim(
    closed: Sequence[SegmentSpace], mode: CompactMode, live_ratio: float
) -> SegmentSpace | None:
    """The oldest closed segment, if it or a newer one is worth compacting (a newer
    one can only go once every older one has), unless a removal is under way in it."""
    if not closed:
        return None
    oldest = min(closed, key=lambda s: s.seq)
    if not any(_closed_worth(s, mode, live_ratio) for s in closed):
        return None
    return None if oldest.busy else oldest


def _closed_worth(seg: SegmentSpace, mode: CompactMode, live_ratio: float) -> bool:
    """A closed segment is worth compacting under pressure whenever the periodic pass
    would take it too: with small segments (under MIN_RECLAIM_BYTES) the pressure rule
    alone took none that held any live mail, so a full disk stopped compacting."""
    if worth_compacting(seg, mode, live_ratio):
        return True
    return mode is CompactMode.PRESSURE and worth_compacting(seg, CompactMode.NORMAL, live_ratio)


def reclaimable_bytes(segments: Sequence[SegmentSpace]) -> int:
    """Bytes of dead records: what compacting every segment would give back."""
    return sum(s.dead_bytes for s in segments)


class Reserve:
    """The preallocated ``reserve`` file (see the module doc).  Thread-safe: the
    writer thread releases it, the loop (through a thread) restores it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = RESERVE_MIN_BYTES
        self.held = False
        self._lock = threading.Lock()

    def restore(self, size: int | None = None) -> bool:
        """Allocate the reserve (again); False if the filesystem has no room for it."""
        with self._lock:
            if size is not None:
                self.size = size
            if self.held:
                return True
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, self.size)
                finally:
                    os.close(fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    self.path.unlink()
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    return False
                # Not a matter of space (no permission, an odd filesystem): go on
                # without a reserve, as before it existed, rather than refuse mail.
                self.size = 0
            self.held = True
            return True

    def release(self) -> bool:
        """Give the reserved space back to the filesystem; False if it was not held."""
        with self._lock:
            if not self.held or not self.size:
                return False
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return True
