"""Startup recovery of the file spool: scan every segment, verify every record, rebuild the index.

Why this module is (just) over 600 lines: the scan, the damage rules (torn tails, corrupt
regions, declared ends, pre-formatted zero tails) and the index they rebuild are one pass
over each segment and are read together.

Theory of operation.  Segments are scanned oldest first; within a segment,
records in file order, so "newest wins" is simply "last seen wins": an MSG
record (re)defines a message (envelope, units, body location), a STATE record
replaces its units, a DEL record forgets it (or them: a gathered tombstone lists
several).  Only the message id is decoded
while scanning; the JSON of the survivors is parsed once at the end, which
keeps recovery of a large, mostly-finished log fast.

Damage handling.  A record whose header or CRC does not verify starts a
corrupt region that ends at the next offset where a record verifies (or at the
end of the file).  The region is copied to ``<spool>/corrupt/<segment>-<offset>.bin``,
logged at ERROR and then neutralised on disk so it is reported only once: a
region at the end of a segment (a torn tail after a crash) is truncated away; a
region in the middle is covered in place by a PAD record whose checksum makes
the old bytes a skippable record.  A segment's SEGMENT header may say the
previous segment's valid data ends early (a failed batch that could not be
truncated at the time); bytes after that point are quarantined the same way.
Pre-formatted segments (preformat.py) end in zeros: when everything from a record's
offset to the segment's end (or its declared end) is zero bytes, that is the clean end of
its data - the writer overwrites from there - not a torn tail: nothing is quarantined and
the file keeps its size.  A torn record followed by zeros is a torn tail as before: its
bytes up to the last non-zero one (up to the end if fewer than 4 KiB of zeros follow:
they may be its own) are quarantined and the segment is cut at the record (the rest of
it is then appended to).  Zeros after a closed segment's declared end are
its unused pre-formatted tail: cut off without a quarantine copy.  An appended segment
(no zeros at its end) recovers exactly as before.
Units left ``in_progress`` by a crash become ``pending``.  A message whose
spilled body file is missing (or short) is logged and dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import gc
import mmap
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from empath.errors import SpoolError
from empath.logs import get_logger
from empath.spool import codec
from empath.spool.codec import RecordType
from empath.spool.index import Brief, brief_from_json, pack_state
from empath.spool.preformat import spare_seed
from empath.spool.writer import Segment, fsync_dir

log = get_logger("spool", __name__)
_U32 = struct.Struct("<I")
_MESSAGE_TYPES = frozenset({RecordType.MSG, RecordType.STATE, RecordType.DEL})


_FIELD_BITS = 40  # offset, length and record size each fit in 40 bits (1 TiB)
_FIELD_MASK = (1 << _FIELD_BITS) - 1


@dataclass(slots=True, init=False)
class BodyLocation:
    """Where a live message's body is: inline in a segment, or a spill file.

    The spool keeps one of these per queued message, so it stores them packed into
    one int (:meth:`pack`, ~48 bytes instead of ~170 for the object and its three
    ints) and unpacks one when it reads a body or moves a record (issue 20: RSS per
    queued unit).  Two packed locations are equal exactly when the locations are."""

    seg: int  # segment holding the message's current MSG record
    offset: int  # absolute offset of that record's JSON in the segment (the body follows)
    length: int  # body bytes
    spilled: bool
    record_bytes: int  # size of the MSG record (for the segment's live-bytes count)

    # written out (init=False): compiled, it runs natively (smtp/events.py)
    def __init__(
        self,
        seg: int,
        offset: int,
        length: int,
        spilled: bool,
        record_bytes: int,
    ) -> None:
        self.seg = seg
        self.offset = offset
        self.length = length
        self.spilled = spilled
        self.record_bytes = record_bytes

    @property
    def json_bytes(self) -> int:
        """Length of the MSG record's JSON."""
        inline = 0 if self.spilled else self.length
        return self.record_bytes - codec.HEADER_BYTES - codec.MSG_PREFIX_BYTES - inline

    @property
    def body_offset(self) -> int:
        """Absolute offset of the inline body in the segment."""
        return self.offset + self.json_bytes

    def pack(self) -> int:
        return pack_location(self.seg, self.offset, self.length, self.spilled, self.record_bytes)

    @classmethod
    def unpack(cls, packed: int) -> BodyLocation:
        spilled = bool(packed & 1)
        packed >>= 1
        record_bytes = packed & _FIELD_MASK
        packed >>= _FIELD_BITS
        length = packed & _FIELD_MASK
        packed >>= _FIELD_BITS
        return cls(packed >> _FIELD_BITS, packed & _FIELD_MASK, length, spilled, record_bytes)


def pack_location(seg: int, offset: int, length: int, spilled: bool, record_bytes: int) -> int:
    """:meth:`BodyLocation.pack` without the object (recovery's loop)."""
    mask = _FIELD_MASK
    if (
        offset > mask
        or length > mask
        or record_bytes > mask
        or min(offset, length, record_bytes) < 0
    ):
        raise ValueError(f"spool location field out of range: {(offset, length, record_bytes)}")
    packed = (seg << _FIELD_BITS | offset) << _FIELD_BITS | length
    return ((packed << _FIELD_BITS | record_bytes) << 1) | spilled


def packed_seg(packed: int) -> int:
    """The segment of a packed location, without unpacking the rest."""
    return packed >> (3 * _FIELD_BITS + 1)


@dataclass(slots=True)
class _Found:
    """Where a message's newest records are (offsets, not copies of their JSON: a large
    queue's scan would otherwise hold every record's JSON at once)."""

    seg: int
    msg_start: int  # the MSG record's JSON: msg_start..body_offset in segment ``seg``
    body_offset: int
    record_bytes: int
    state_seg: int = -1  # the newest STATE record's JSON, if any
    state_start: int = 0
    state_end: int = 0


@dataclass(slots=True)
class Recovered:
    index: dict[str, Brief]  # nothing decoded beyond what the queue's views read
    locations: dict[str, int]  # packed BodyLocation
    segments: dict[int, Segment]
    dropped: list[str] = field(default_factory=list)  # ids to tombstone (body missing)
    records: int = 0
    quarantined: int = 0
    deferred: int = 0  # damaged regions left in place: their copy to corrupt/ failed
    spill_bytes: int = 0


def _quarantine(
    corrupt_dir: Path, seg_name: str, offset: int, data: bytes | memoryview, why: str
) -> bool:
    """Copy a damaged region to ``corrupt/`` (synced).  False if the copy could not be
    made (a full disk): the caller then leaves the region in place, untouched, so a later
    start-up quarantines it - never cut away or padded over without its copy."""
    target = corrupt_dir / f"{seg_name}-{offset}.bin"
    size = len(data)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with memoryview(data) as whole:
                done = 0
                while done < size:
                    with whole[done:] as rest:
                        done += os.write(fd, rest)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(corrupt_dir)  # the copy must be durable before the segment is cut or padded
    except OSError as exc:
        # The views above are released already (with-blocks), so the segment's mmap can
        # still be closed and this, the real cause, is what the log says.
        with contextlib.suppress(OSError):
            target.unlink()
        log.error(
            "Could not quarantine a corrupt spool region; left in place for the next start",
            segment=seg_name,
            offset=offset,
            bytes=size,
            reason=why,
            path=str(target),
            error=_describe(exc),
            errno=exc.errno,
        )
        return False
    log.error(
        "Quarantined corrupt spool region",
        segment=seg_name,
        offset=offset,
        bytes=size,
        reason=why,
        path=str(target),
    )
    return True


def _describe(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the spool filesystem ({exc.strerror})"
    return exc.strerror or str(exc)


def _next_valid(buf: memoryview, mm: mmap.mmap, start: int, limit: int, seed: int) -> int:
    """Offset of the next verifiable record after ``start`` (``limit`` if none)."""
    pos = start + 1
    while True:
        pos = mm.find(codec.MAGIC, pos, limit)
        if pos < 0:
            return limit
        if codec.parse_at(buf, pos, limit, seed) is not None:
            return pos
        pos += 1


_ZERO_SCAN = 1 << 20  # bytes examined per step looking for the end of the non-zero data
# A damaged tail's copy leaves out the zeros after its last non-zero byte when there are
# at least this many (a pre-formatted segment's rest); fewer may be the record's own bytes.
_ZERO_TAIL_MIN = 4096


def _data_end(mm: mmap.mmap, start: int, stop: int) -> int:
    """Offset just past the last non-zero byte of ``[start, stop)``; ``start`` if every
    byte there is zero (a pre-formatted segment's unused tail)."""
    end = stop
    while end > start:
        low = max(start, end - _ZERO_SCAN)
        kept = len(mm[low:end].rstrip(b"\0"))
        if kept:
            return low + kept
        end = low
    return start


def _copy_end(data_end: int, stop: int) -> int:
    """Where the quarantine copy of a damaged tail ending at ``stop`` stops."""
    return data_end if stop - data_end >= _ZERO_TAIL_MIN else stop


def _read_prev_end(path: Path, seed: int) -> int | None:
    """The ``prev_end`` a segment's SEGMENT header declares for its predecessor."""
    try:
        with path.open("rb") as f:
            head = f.read(codec.HEADER_BYTES + 4096)
    except OSError:
        return None
    buf = memoryview(head)
    rec = codec.parse_at(buf, 0, len(head), seed)
    if rec is None or rec.rtype != RecordType.SEGMENT:
        return None
    try:
        value = codec.loads(buf[rec.payload_start : rec.end]).get("prev_end")
    except (ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


class _Scanner:
    def __init__(self, spool_dir: Path, progress_every: int) -> None:
        self.log_dir = spool_dir / "log"
        self.bodies_dir = spool_dir / "bodies"
        self.corrupt_dir = spool_dir / "corrupt"
        self.progress_every = progress_every
        self.found: dict[str, _Found] = {}
        self.records = 0
        self.quarantined = 0
        self.deferred = 0

    def _quarantine(self, seg_name: str, offset: int, data: memoryview, why: str) -> bool:
        copied = _quarantine(self.corrupt_dir, seg_name, offset, data, why)
        if copied:
            self.quarantined += 1
        else:
            self.deferred += 1
        return copied

    def scan_segment(self, seq: int, seed: int, path: Path, prev_end: int | None) -> int:
        """Scan one segment, neutralising damage on disk.  Returns where its data ends
        afterwards: the file size, or the start of its zero tail (pre-formatted).

        A damaged region whose copy to ``corrupt/`` failed stays in the file (and in the
        size returned): the writer appends after it, and a later start quarantines it."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            limit = size if prev_end is None else min(prev_end, size)
            pads: list[tuple[int, int]] = []
            truncate_at: int | None = None
            zero_end: int | None = None
            if size:
                with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
                    buf = memoryview(mm)
                    try:
                        truncate_at, zero_end = self._scan(
                            buf, mm, seq, seed, name=path.name, limit=limit, pads=pads
                        )
                        stop = _data_end(mm, limit, size) if limit < size else limit
                        if stop == limit < size:  # zeros: an unused pre-formatted tail
                            truncate_at = limit if truncate_at is None else truncate_at
                        elif limit < size:  # a failed batch the writer could not cut off
                            if self._quarantine(
                                path.name,
                                limit,
                                buf[limit : _copy_end(stop, size)],
                                "after the end declared by the next segment",
                            ):
                                truncate_at = limit if truncate_at is None else truncate_at
                            else:
                                truncate_at = None  # cutting at the tail would cut it too
                        for start, end in pads:
                            pads_payload = buf[start + codec.HEADER_BYTES : end]
                            header = codec.pad_header(
                                end - start - codec.HEADER_BYTES, pads_payload, seed
                            )
                            del pads_payload
                            os.pwrite(fd, header, start)
                    finally:
                        buf.release()
            if truncate_at is not None:
                os.ftruncate(fd, truncate_at)
                size = truncate_at
            if pads or truncate_at is not None:
                os.fsync(fd)
            return size if zero_end is None else min(zero_end, size)
        finally:
            os.close(fd)

    def _scan(
        self,
        buf: memoryview,
        mm: mmap.mmap,
        seq: int,
        seed: int,
        *,
        name: str,
        limit: int,
        pads: list[tuple[int, int]],
    ) -> tuple[int | None, int | None]:
        """Walk the records; returns where to truncate a torn tail, if any, and where the
        data ends if the rest up to ``limit`` is zeros (a pre-formatted tail)."""
        off = 0
        found = self.found
        unpack = codec.HEADER.unpack_from
        crc32 = zlib.crc32
        magic_ok = codec.MAGIC
        hdr = codec.HEADER_BYTES
        crc_from = 8
        max_plen = codec.MAX_PAYLOAD_BYTES
        msg_t, state_t = RecordType.MSG, RecordType.STATE
        message_types = _MESSAGE_TYPES
        records = self.records
        every = self.progress_every
        try:
            while off < limit:
                # The hot path, inlined: header, bounds, one CRC over header tail + payload.
                good = False
                if off + hdr <= limit:
                    magic, crc, version, rtype, _flags, plen = unpack(buf, off)
                    end = off + hdr + plen
                    good = (
                        magic == magic_ok
                        and plen <= max_plen
                        and end <= limit
                        and crc32(buf[off + crc_from : end], seed) == crc
                    )
                if not good:
                    data_end = _data_end(mm, off, limit)
                    if data_end == off:  # only zeros from here: the clean end
                        return None, off
                    nxt = _next_valid(buf, mm, off, limit, seed)
                    tail = nxt >= limit
                    why = "torn tail" if tail else "checksum or header mismatch"
                    # a torn tail's copy leaves out the pre-formatted zeros after it
                    upto = _copy_end(data_end, limit) if tail else nxt
                    copied = self._quarantine(name, off, buf[off:upto], why)
                    if tail:
                        return (off if copied else None), None
                    if copied and nxt - off >= hdr:
                        pads.append((off, nxt))
                    off = nxt
                    continue
                start = off + hdr
                rec_off, off = off, end
                records += 1
                if records % every == 0:
                    log.info(
                        "Spool recovery progress",
                        records=records,
                        segment=name,
                        messages=len(found),
                    )
                if version > codec.VERSION:
                    raise SpoolError(
                        f"{name}@{rec_off}: record version {version} is newer than this "
                        f"Empath understands ({codec.VERSION}); refusing to open the spool"
                    )
                if rtype not in message_types:
                    if rtype not in codec.KNOWN_TYPES:
                        log.error(
                            "Skipped a spool record of unknown type",
                            segment=name,
                            offset=rec_off,
                            record_type=rtype,
                        )
                    continue
                jstart = start + codec.MSG_PREFIX_BYTES
                if jstart > end:
                    log.error("Skipped a malformed spool record", segment=name, offset=rec_off)
                    continue
                msg_id = bytes(buf[start : start + codec.ID_BYTES]).decode("ascii", "replace")
                if rtype == msg_t:
                    jend = jstart + _U32.unpack_from(buf, start + codec.ID_BYTES)[0]
                    found[msg_id] = _Found(seq, jstart, jend, end - rec_off)
                elif rtype == state_t:
                    entry = found.get(msg_id)
                    if entry is not None:
                        jend = jstart + _U32.unpack_from(buf, start + codec.ID_BYTES)[0]
                        entry.state_seg = seq
                        entry.state_start, entry.state_end = jstart, jend
                else:
                    found.pop(msg_id, None)
                    if end > jstart:  # a gathered tombstone: more ids follow (codec.py)
                        for gone in codec.del_ids(buf[start:end])[1:]:
                            found.pop(gone, None)
            return None, None
        finally:
            self.records = records


def _brief(msg_id: str, f: _Found, maps: dict[int, mmap.mmap]) -> tuple[Brief, bool, int]:
    head: dict[str, Any] = codec.loads(maps[f.seg][f.msg_start : f.body_offset])
    if f.state_seg < 0:
        units_src = head["units"]
        state = 0
    else:
        units_src = codec.loads(maps[f.state_seg][f.state_start : f.state_end])["units"]
        state = pack_state(f.state_seg, f.state_start, f.state_end - f.state_start)
    brief = brief_from_json(msg_id, head["envelope"], units_src, state)
    body = head["body"]
    return brief, bool(body["spilled"]), int(body["bytes"])


def recover(spool_dir: Path, *, progress_every: int = 100_000) -> Recovered:
    """Scan ``<spool>/log`` and rebuild the index (blocking: run it in a thread).

    The cyclic GC is paused meanwhile: recovery allocates millions of acyclic
    objects, and repeated full collections over the growing heap cost more than
    the decoding itself.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _recover(spool_dir, progress_every)
    finally:
        if was_enabled:
            gc.enable()
        _trim_heap()


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``): the
    scan's transient buffers would otherwise stay in the daemon's RSS for good."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return  # not glibc: nothing to do
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def _recover(spool_dir: Path, progress_every: int) -> Recovered:
    started = time.monotonic()
    scanner = _Scanner(spool_dir, progress_every)
    names: list[tuple[int, int, Path]] = []
    for entry in os.scandir(scanner.log_dir):
        parsed = codec.parse_segment_name(entry.name)
        if parsed is None:
            if spare_seed(entry.name) is None:  # (a spare holds no record: preformat.py)
                log.warn("Ignoring a foreign file in the spool log directory", path=entry.path)
            continue
        names.append((parsed[0], parsed[1], Path(entry.path)))
    names.sort()
    if names:
        log.info("Spool recovery started", segments=len(names), path=str(spool_dir))
    sizes: dict[int, tuple[int, int, Path, int]] = {}
    for i, (seq, seed, path) in enumerate(names):
        prev_end = None
        if i + 1 < len(names):
            nseq, nseed, npath = names[i + 1]
            prev_end = _read_prev_end(npath, nseed)
            if prev_end is not None and nseq != seq + 1:
                # Only the direct successor speaks for a segment.  A gap means the
                # declaring segment replaced a dropped, empty one (older versions
                # wrote that file's size, 0, here): cutting by it would lose data.
                log.warn(
                    "Ignored the end a non-adjacent segment declares",
                    segment=path.name,
                    declared_by=npath.name,
                    prev_end=prev_end,
                )
                prev_end = None
        size = scanner.scan_segment(seq, seed, path, prev_end)
        sizes[seq] = (seq, seed, path, size)

    segments: dict[int, Segment] = {}
    for seq, seed, path, size in sizes.values():
        segments[seq] = Segment(
            seq=seq,
            seed=seed,
            path=path,
            size=size,
            read_fd=os.open(path, os.O_RDONLY | os.O_CLOEXEC),
        )
    result = Recovered(
        index={},
        locations={},
        segments=segments,
        records=scanner.records,
        quarantined=scanner.quarantined,
        deferred=scanner.deferred,
    )
    with contextlib.ExitStack() as stack:
        maps = {
            seq: stack.enter_context(mmap.mmap(seg.read_fd, seg.size, access=mmap.ACCESS_READ))
            for seq, seg in segments.items()
            if seg.size
        }
        referenced = _decode_all(result, scanner, maps)
    _remove_orphan_bodies(scanner.bodies_dir, referenced)
    if names:
        log.info(
            "Spool recovery finished",
            messages=len(result.index),
            records=result.records,
            quarantined=result.quarantined,
            left_in_place=result.deferred,
            missing=len(result.dropped),
            seconds=round(time.monotonic() - started, 3),
        )
    return result


def _decode_all(result: Recovered, scanner: _Scanner, maps: dict[int, mmap.mmap]) -> set[str]:
    """Decode the survivors into ``result`` (ids order: oldest first); the ids of the
    spill files they reference."""
    referenced: set[str] = set()
    segments = result.segments
    found = scanner.found
    for msg_id in sorted(found):
        f = found.pop(msg_id)
        try:
            msg, spilled, length = _brief(msg_id, f, maps)
        except (ValueError, KeyError, TypeError) as exc:
            log.error(
                "Dropped a spool record that does not decode", message_id=msg_id, error=str(exc)
            )
            result.dropped.append(msg_id)
            continue
        if spilled:
            try:
                on_disk = os.stat(scanner.bodies_dir / msg_id).st_size
            except FileNotFoundError:
                on_disk = -1
            if on_disk != length:
                log.error(
                    "Dropped a message whose body file is missing or short",
                    message_id=msg_id,
                    expected_bytes=length,
                    found_bytes=on_disk,
                )
                result.dropped.append(msg_id)
                continue
            referenced.add(msg_id)
            result.spill_bytes += length
        result.index[msg_id] = msg
        result.locations[msg_id] = pack_location(
            f.seg, f.msg_start, length, spilled, f.record_bytes
        )
        seg = segments[f.seg]
        seg.refs.add(msg_id)
        seg.live_bytes += f.record_bytes
    return referenced


def _remove_orphan_bodies(bodies_dir: Path, referenced: set[str]) -> None:
    """Spill files of finished, aborted or never-committed messages."""
    for entry in os.scandir(bodies_dir):
        if entry.name in referenced:
            continue
        log.info("Removed an orphaned body file", path=entry.path)
        with contextlib.suppress(OSError):
            os.unlink(entry.path)


__all__ = ["BodyLocation", "Recovered", "packed_seg", "recover"]
