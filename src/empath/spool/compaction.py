"""Space reclamation for the file spool: compaction and the space reserve's upkeep.

:class:`Compaction` is the part of :class:`~empath.spool.fs.FileSpool` that frees
segments; it is a separate module to keep fs.py readable, and a mixin because it
works on the spool's own index, locations and segments.  What to compact and when
is decided by the pure functions of :mod:`empath.spool.space`; this module carries
the decision out:

1. Oldest first, each closed victim's live messages are copied forward (a MSG
   record with the body and the current units, group-committed like any write),
   then its file is deleted.  A victim whose live bytes do not fit in the free
   space is left alone (logged once).
2. In PRESSURE or FORCED mode, unless step 1 had to leave a segment, a ROTATE entry
   closes the active segment when it is worth compacting (the writer starts the
   next one, using the reserve if the disk is full), and step 1 runs again.
3. The reserve is restored when there is room for it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path
from typing import Final

from empath.clock import Clock
from empath.errors import SpoolError
from empath.logs import get_logger
from empath.spool import codec
from empath.spool.index import MessageIndex
from empath.spool.recovery import BodyLocation, packed_seg
from empath.spool.space import (
    CompactMode,
    Reserve,
    SegmentSpace,
    mode_for,
    pick_victim,
    reclaimable_bytes,
    rotate_active,
    under_pressure,
)
from empath.spool.writer import Entry, EntryKind, LogWriter, Segment, fsync_dir

log = get_logger("spool", __name__)

COPY_BATCH_BYTES: Final = 4 * 1024 * 1024  # compaction moves this much per group commit
UNFIT_WARN_EVERY_S: Final = 10.0  # "does not fit" is repeated this often for one segment


class Compaction:
    """Compaction and space accounting over a file spool's state (see the module doc)."""

    path: Path
    _index: MessageIndex
    _locs: dict[str, int]  # packed BodyLocation
    _segments: dict[int, Segment]
    _segments_lock: threading.Lock
    _removing: set[str]
    _compact_lock: asyncio.Lock
    _compact_live_ratio: float
    _closing: bool
    _log_dir: Path
    _reserve: Reserve
    _reserve_was_held: bool
    _clock: Clock
    _unfit_warned: tuple[int, float] | None = None  # (segment, when) "does not fit" was logged

    def _live_writer(self) -> LogWriter:
        raise NotImplementedError

    def _reserve_changed(self) -> None:
        raise NotImplementedError

    def _pread_inline(self, loc: BodyLocation) -> bytes:
        raise NotImplementedError

    # --- accounting -------------------------------------------------------------

    def _space(self, seg: Segment) -> SegmentSpace:
        return SegmentSpace(seg.seq, seg.size, seg.live_bytes, bool(seg.refs & self._removing))

    def _all_space(self) -> list[SegmentSpace]:
        with self._segments_lock:
            segs = list(self._segments.values())
        return [self._space(s) for s in segs]

    def reclaimable_bytes(self) -> int:
        """Bytes held by dead records (finished or deleted messages, old unit states):
        what compacting every segment, the active one included, would give back."""
        return reclaimable_bytes(self._all_space())

    def _free_total(self) -> tuple[int, int]:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def under_pressure(self) -> bool:
        """Space is short (the reserve is out, or under 10 % of the filesystem is free):
        the app's compactor then runs at once instead of at its interval."""
        if not self._reserve.held:
            return True
        free, total = self._free_total()
        return under_pressure(free, total, True)

    # --- compaction -------------------------------------------------------------

    async def compact(self, *, include_active: bool = False) -> int:
        """Reclaim dead segments, oldest first; the bytes of the segment files deleted
        (0 if nothing was to do).  ``include_active`` (an operator's request) compacts
        every segment with dead records, the active one included; without it that
        happens only under space pressure (see :mod:`empath.spool.space`)."""
        writer = self._live_writer()
        async with self._compact_lock:
            if self._closing:
                return 0
            mode = mode_for(include_active, self.under_pressure())
            freed, blocked = await self._reclaim_closed(writer, mode)
            active = writer.active
            # Not behind a segment that could not be compacted (it does not fit, or a
            # removal is pending): segments go oldest first, so closing this one now
            # would only add a file.
            if (
                not self._closing
                and not blocked
                and rotate_active(self._space(active), mode, self._compact_live_ratio)
            ):
                await self._rotate(writer, active)
                more, _blocked = await self._reclaim_closed(writer, mode)
                freed += more
            if not self._reserve.held:
                await asyncio.to_thread(self._reserve.restore)
            if self._reserve.held is not self._reserve_was_held:
                self._reserve_changed()
            return freed

    async def _reclaim_closed(self, writer: LogWriter, mode: CompactMode) -> tuple[int, bool]:
        """Compact closed segments oldest first while one is worth it and fits; the
        bytes freed, and whether a segment worth compacting had to be left."""
        freed = 0
        while not self._closing:
            seg = self._pick_victim(writer, mode)
            if seg is None:
                return freed, False
            if not await self._fits(seg):
                return freed, True
            moved = await self._copy_forward(writer, seg)
            if seg.refs:  # a removal or a failed copy is still pending: try again later
                return freed, True
            await asyncio.to_thread(self._delete_segment, seg)
            freed += seg.size
            log.info(
                "Compacted a spool segment",
                segment=seg.name,
                moved_messages=moved,
                freed_bytes=seg.size,
                mode=mode.value,
            )
        return freed, False

    async def _rotate(self, writer: LogWriter, active: Segment) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        writer.submit(Entry(EntryKind.ROTATE, "", b"", future))
        try:
            await future
        except SpoolError as exc:
            log.warn(
                "Could not rotate the active spool segment", segment=active.name, error=str(exc)
            )
            return
        log.info(
            "Rotated the active spool segment to compact it",
            segment=active.name,
            dead_bytes=active.size - active.live_bytes,
        )

    async def _fits(self, seg: Segment) -> bool:
        """Whether the victim's live records can be copied into the free space (the
        reserve counts: the writer gives it up for copies if it must)."""
        free, _total = await asyncio.to_thread(self._free_total)
        room = free + (self._reserve.size if self._reserve.held else 0)
        if seg.live_bytes <= room:
            return True
        # Said again now and then, not every second (the compactor asks that often under
        # pressure): a full disk that stays stuck keeps saying so.
        now = self._clock.monotonic()
        last = self._unfit_warned
        if last is not None and last[0] == seg.seq and now - last[1] < UNFIT_WARN_EVERY_S:
            return False
        self._unfit_warned = (seg.seq, now)
        log.warn(
            "Spool segment not compacted: its live messages do not fit in the free space",
            segment=seg.name,
            live_bytes=seg.live_bytes,
            free_bytes=free,
        )
        return False

    def _pick_victim(
        self, writer: LogWriter, mode: CompactMode = CompactMode.NORMAL
    ) -> Segment | None:
        with self._segments_lock:
            closed = {s.seq: s for s in self._segments.values() if s.seq < writer.active.seq}
        choice = pick_victim(
            [self._space(s) for s in closed.values()], mode, self._compact_live_ratio
        )
        return None if choice is None else closed[choice.seq]

    async def _copy_forward(self, writer: LogWriter, seg: Segment) -> int:
        moved = 0
        ids = sorted(seg.refs)
        while ids:
            chunk: list[str] = []
            chunk_bytes = 0
            while ids and chunk_bytes < COPY_BATCH_BYTES:
                msg_id = ids.pop()
                packed = self._locs.get(msg_id)
                if packed is None or packed_seg(packed) != seg.seq or msg_id in self._removing:
                    continue
                chunk.append(msg_id)
                chunk_bytes += BodyLocation.unpack(packed).record_bytes
            wanted = [(i, self._locs[i]) for i in chunk]
            bodies = await asyncio.to_thread(self._read_inline_bodies, wanted)
            loop = asyncio.get_running_loop()
            entries: list[Entry] = []
            for (msg_id, packed), body in zip(wanted, bodies, strict=True):
                msg = self._index.get(msg_id)
                if msg is None or msg_id in self._removing or self._locs.get(msg_id) != packed:
                    continue  # removed, or moved since we read it
                loc = BodyLocation.unpack(packed)
                payload, rel = codec.msg_payload(
                    msg_id,
                    msg.envelope,
                    msg.units,
                    body_bytes=loc.length,
                    spilled=loc.spilled,
                    inline_body=body,
                )
                entries.append(
                    Entry(
                        EntryKind.COPY,
                        msg_id,
                        payload,
                        loop.create_future(),
                        body_rel=rel,
                        body_bytes=loc.length,
                        spilled=loc.spilled,
                        from_seg=seg.seq,
                    )
                )
            if not entries:
                continue
            writer.submit_many(entries)
            results = await asyncio.gather(
                *(e.future for e in entries if e.future is not None), return_exceptions=True
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                log.warn(
                    "Compaction could not copy messages forward",
                    segment=seg.name,
                    error=str(failures[0]),
                )
                return moved
            moved += len(entries)
        return moved

    def _read_inline_bodies(self, wanted: list[tuple[str, int]]) -> list[bytes]:
        locs = [BodyLocation.unpack(packed) for _, packed in wanted]
        return [b"" if loc.spilled else self._pread_inline(loc) for loc in locs]

    def _delete_segment(self, seg: Segment) -> None:
        seg.path.unlink()
        fsync_dir(self._log_dir)
        with self._segments_lock:
            owned = self._segments.pop(seg.seq, None) is not None
        if owned:  # else close() took the segment and closes its descriptor
            with contextlib.suppress(OSError):
                os.close(seg.read_fd)
