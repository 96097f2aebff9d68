"""Pre-formatted spool segments (spool/preformat.py, DESIGN §3): batches overwrite a spare
written full of zeros; recovery reads the zeros after the last record as the segment's
clean end, a torn record followed by zeros as a torn tail, a failed batch never comes
back, an appended segment from before recovers as it did - on real files in tmp dirs."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from empath.errors import SpoolFullError
from empath.spool import preformat
from empath.spool.fs import FileSpool
from empath.spool.preformat import Preformatter, spare_seed
from empath.spool.space import may_preformat
from tests.unit.test_spool_fs_startup import put

SEG = 128 * 1024


async def opened(path: Path, **kw: Any) -> FileSpool:
    """A pre-formatting spool whose first spare is ready."""
    spool = FileSpool(path, segment_bytes=SEG, preformat=True, **kw)
    await spool.open()
    spares = spool._spares
    assert spares is not None
    await asyncio.to_thread(spares.wait)
    return spool


async def past_half(spool: FileSpool) -> str:
    """Write past half of the active segment, which asks for the next spare; wait for it.
    The id of the message written."""
    msg = await put(spool, b"h" * (SEG // 2) + b"\r\n")
    spares = spool._spares
    assert spares is not None
    await asyncio.to_thread(spares.wait)
    return msg.id


def segment_files(path: Path) -> list[Path]:
    return sorted(p for p in (path / "log").iterdir() if p.suffix == ".seg")


def spare_files(path: Path) -> list[Path]:
    return sorted(p for p in (path / "log").iterdir() if spare_seed(p.name) is not None)


def corrupt_files(path: Path) -> list[Path]:
    return sorted((path / "corrupt").iterdir())


def data_end(path: Path) -> int:
    return len(path.read_bytes().rstrip(b"\0"))


async def test_batches_overwrite_a_pre_formatted_segment_whose_zero_tail_is_its_clean_end(
    tmp_path: Path,
) -> None:
    """The first batch moves to the ready spare (a segment of SEG bytes, zeros after the
    records); a restart restores every message, quarantines nothing, keeps the file's size
    and writes on in place."""
    spool = await opened(tmp_path)
    ids = [(await put(spool, b"body %d\r\n" % i)).id for i in range(20)]
    newest = segment_files(tmp_path)[-1]
    assert SEG == newest.stat().st_size  # overwritten in place, not appended
    end = spool.segment_stats()[-1][1]
    assert end == data_end(newest) < SEG
    assert [] == spare_files(tmp_path)  # the next one is asked for at half full
    await spool.close()

    spool = FileSpool(tmp_path, segment_bytes=SEG, preformat=True)
    report = await spool.open()
    assert ids == [m.id for m in spool.messages()]
    assert 0 == report.quarantined
    assert [] == corrupt_files(tmp_path)
    assert SEG == newest.stat().st_size  # the zeros stay for the writer
    assert end == spool.segment_stats()[-1][1]
    more = await put(spool, b"after the restart\r\n")
    assert newest == segment_files(tmp_path)[-1]
    assert SEG == newest.stat().st_size
    assert b"after the restart\r\n" == await spool.read_body(more.id)
    await spool.close()


async def test_a_torn_record_followed_by_zeros_is_quarantined_and_cut(tmp_path: Path) -> None:
    """A record half on disk with the pre-formatted zeros after it (a power cut mid-write):
    the acknowledged records stay, the torn one's non-zero bytes go to corrupt/ (not the
    zeros), the segment is cut at it, and the spool writes on."""
    spool = await opened(tmp_path)
    ids = [(await put(spool, b"body %d\r\n" % i)).id for i in range(5)]
    start = spool.segment_stats()[-1][1]
    last = await put(spool, b"the last body, torn\r\n" * 4)
    end = spool.segment_stats()[-1][1]
    await spool.close()
    seg = segment_files(tmp_path)[-1]
    with seg.open("r+b") as f:  # the second half of the last record never reached the disk
        cut = (start + end) // 2
        f.seek(cut)
        f.write(bytes(end - cut))
    original = seg.read_bytes()

    spool = FileSpool(tmp_path, segment_bytes=SEG, preformat=True)
    report = await spool.open()
    assert ids == [m.id for m in spool.messages()]
    assert last.id not in spool
    assert 1 == report.quarantined
    (q,) = corrupt_files(tmp_path)
    assert f"{seg.name}-{start}.bin" == q.name
    assert original[start:cut].rstrip(b"\0") == q.read_bytes()
    assert start == seg.stat().st_size  # cut at the torn record, as an appended one
    after = await put(spool, b"after\r\n")
    await spool.close()
    spool = FileSpool(tmp_path, segment_bytes=SEG, preformat=True)
    report = await spool.open()
    assert [*ids, after.id] == [m.id for m in spool.messages()]
    assert 0 == report.quarantined
    await spool.close()


class FlakySync:
    """An fdatasync hook that fails the next ``fail`` calls with ENOSPC."""

    def __init__(self) -> None:
        self.fail = 0

    def __call__(self, fd: int) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fdatasync(fd)


async def test_a_failed_batch_in_a_pre_formatted_segment_never_comes_back(
    tmp_path: Path,
) -> None:
    """The failed record was written over the zeros but not synced: it is cut off (the
    segment truncated back), so no restart brings it back, with or without later writes."""
    sync = FlakySync()
    spool = await opened(tmp_path, fdatasync=sync)
    ok = await put(spool, b"ok\r\n")
    seg = segment_files(tmp_path)[-1]
    assert SEG == seg.stat().st_size
    sync.fail = 1
    with pytest.raises(SpoolFullError):
        await put(spool, b"lost\r\n")
    assert ok.id in spool
    await spool.close()
    assert b"lost\r\n" not in seg.read_bytes()
    spool = FileSpool(tmp_path, segment_bytes=SEG, preformat=True, fdatasync=sync)
    report = await spool.open()
    assert [ok.id] == [m.id for m in spool.messages()]
    assert 0 == report.quarantined
    after = await put(spool, b"after\r\n")
    await spool.close()
    spool = FileSpool(tmp_path, segment_bytes=SEG, preformat=True)
    await spool.open()
    assert [ok.id, after.id] == [m.id for m in spool.messages()]
    await spool.close()


async def test_an_untruncatable_failed_batch_goes_with_the_declared_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The "poisoned" path on a pre-formatted segment: the failed batch cannot be cut off,
    the writer rotates to the spare declaring where the data ends, recovery quarantines
    the failed record (and only it: not the zeros after it) and cuts the segment there."""
    sync = FlakySync()
    spool = await opened(tmp_path, fdatasync=sync)
    ok = await put(spool, b"ok\r\n")
    old = segment_files(tmp_path)[-1]
    half = await past_half(spool)

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "truncate refused")

    monkeypatch.setattr(os, "ftruncate", no_truncate)
    sync.fail = 1
    with pytest.raises(SpoolFullError):
        await put(spool, b"lost lost lost\r\n")
    after = await put(spool, b"after\r\n")  # heals by rotating to the spare
    monkeypatch.undo()
    assert old != segment_files(tmp_path)[-1]
    await spool.close()
    assert b"lost lost lost" in old.read_bytes()

    spool = FileSpool(tmp_path, segment_bytes=SEG, preformat=True)
    report = await spool.open()
    assert [ok.id, half, after.id] == [m.id for m in spool.messages()]
    assert 1 == report.quarantined
    (q,) = corrupt_files(tmp_path)
    assert b"lost lost lost" in q.read_bytes()
    assert q.read_bytes() == q.read_bytes().rstrip(b"\0")  # the zeros were not copied
    assert b"lost lost lost" not in old.read_bytes()
    await spool.close()


async def test_an_appended_segment_from_before_recovers_unchanged(tmp_path: Path) -> None:
    """A spool written without pre-formatting (as every spool before this) opens with it:
    nothing quarantined, the old segment's bytes untouched, new records go to a spare."""
    spool = FileSpool(tmp_path, segment_bytes=SEG)
    await spool.open()
    ids = [(await put(spool, b"body %d\r\n" % i)).id for i in range(5)]
    await spool.close()
    (old,) = segment_files(tmp_path)
    before = old.read_bytes()
    assert before[-1:] != b"\0"

    spool = await opened(tmp_path)
    assert ids == [m.id for m in spool.messages()]
    assert 0 == spool.last_recovery.quarantined  # type: ignore[union-attr]
    new = await put(spool, b"new\r\n")
    await spool.close()
    assert before == old.read_bytes()
    assert 2 == len(segment_files(tmp_path))
    assert SEG == segment_files(tmp_path)[-1].stat().st_size
    spool = FileSpool(tmp_path, segment_bytes=SEG)  # and back without it: a spare is dropped
    report = await spool.open()
    assert [*ids, new.id] == [m.id for m in spool.messages()]
    assert 0 == report.quarantined
    assert [] == spare_files(tmp_path)
    await spool.close()


async def test_a_closed_segment_gives_its_unused_zeros_back(tmp_path: Path) -> None:
    """Rotating a pre-formatted segment early (compaction under pressure) cuts its unused
    zero tail off; recovery also cuts zeros found after a declared end, without a copy."""
    spool = await opened(tmp_path)
    ids = [(await put(spool, b"body %d\r\n" % i)).id for i in range(3)]
    first = segment_files(tmp_path)[-1]
    assert [] == spare_files(tmp_path)
    await past_half(spool)
    assert 1 == len(spare_files(tmp_path))
    ids = [m.id for m in spool.messages()]
    end = spool.segment_stats()[-1][1]
    await spool._rotate(spool._live_writer(), spool._live_writer().active)
    assert end == first.stat().st_size
    await spool.close()
    with first.open("r+b") as f:  # as if that cut had not reached the disk
        f.truncate(SEG)
    spool = FileSpool(tmp_path, segment_bytes=SEG, preformat=True)
    report = await spool.open()
    assert ids == [m.id for m in spool.messages()]
    assert 0 == report.quarantined
    assert [] == corrupt_files(tmp_path)
    assert end == first.stat().st_size
    await spool.close()


async def test_usage_counts_the_pre_formatted_bytes(tmp_path: Path) -> None:
    """The spare and the active segment's unused zeros are in the spool's size."""
    spool = await opened(tmp_path)
    await past_half(spool)
    usage = spool.usage()
    active = spool.segment_stats()[-1][1]
    assert (SEG - active) + SEG == usage.preformatted_bytes
    files = sum(p.stat().st_size for p in (tmp_path / "log").iterdir())
    assert files == usage.size_bytes
    await spool.close()


async def test_a_spare_that_cannot_be_made_leaves_segments_appended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ENOSPC while writing the zeros: the partial spare is removed, a warning says so,
    and commits go on into appended segments (no commit fails because of it)."""

    def full(fd: int, data: bytes, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(preformat, "write_all", full)
    spool = await opened(tmp_path)
    assert 1 == spool._spares.failures  # type: ignore[union-attr]
    assert [] == spare_files(tmp_path)
    ids = [(await put(spool, b"body %d\r\n" % i)).id for i in range(5)]
    (seg,) = segment_files(tmp_path)
    assert spool.segment_stats()[-1][1] == seg.stat().st_size  # appended
    await spool.close()
    assert "Could not pre-format a spool segment" in caplog.text
    spool = FileSpool(tmp_path, segment_bytes=SEG)
    await spool.open()
    assert ids == [m.id for m in spool.messages()]
    await spool.close()


def test_a_spare_is_made_only_with_the_reserve_held_and_out_of_pressure() -> None:
    """Pre-formatting never takes the reserve's place nor pushes the disk into pressure."""
    total = 1000 * SEG
    assert may_preformat(500 * SEG, total, SEG, True)
    assert not may_preformat(500 * SEG, total, SEG, False)  # the reserve is out
    assert may_preformat(101 * SEG, total, SEG, True)
    assert not may_preformat(100 * SEG, total, SEG, True)  # would leave < 10 % free


def test_no_room_means_no_spare(tmp_path: Path) -> None:
    """The helper asks for room first and writes nothing without it."""
    asked: list[int] = []

    def room(size: int) -> bool:
        asked.append(size)
        return False

    spares = Preformatter(tmp_path, SEG, room=room)
    spares.request()
    spares.wait()
    assert [SEG] == asked
    assert [] == list(tmp_path.iterdir())
    assert not spares.ready()


def test_a_leftover_spare_is_used_and_a_partial_one_deleted(tmp_path: Path) -> None:
    """At open a complete spare of the right size is taken; a ``.tmp`` (a crash while it
    was being written) and a spare of another size are deleted."""
    (tmp_path / "next-0000abcd.pre").write_bytes(bytes(SEG))
    (tmp_path / "next-00001234.tmp").write_bytes(bytes(100))
    (tmp_path / "next-00005678.pre").write_bytes(bytes(SEG // 2))
    spares = Preformatter(tmp_path, SEG, room=lambda _size: True)
    spares.adopt()
    assert spares.ready()
    assert ["next-0000abcd.pre"] == [p.name for p in tmp_path.iterdir()]
    assert SEG == spares.spare_bytes
