"""Disk full: the spool on a 4 MiB tmpfs.  When the filesystem fills up, commits raise
SpoolFullError and leave nothing recovery would resurrect or call corrupt; once space is
freed, commits succeed again without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from empath.errors import SpoolFullError
from empath.spool import codec
from empath.spool.fs import FileSpool
from empath.spool.model import Envelope, MessageState, initial_units
from tests.helpers import require_tool


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "4m") -> Iterator[Path]:
    mount = require_tool("mount")
    umount = require_tool("umount")
    where.mkdir()
    subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    except BaseException:
        if subprocess.run([umount, str(where)], check=False).returncode != 0:
            subprocess.run([umount, "--lazy", str(where)], check=True)  # a failed test's files
        raise
    if subprocess.run([umount, str(where)], check=False).returncode != 0:
        subprocess.run([umount, "--lazy", str(where)], check=True)
        raise AssertionError(f"{where} was still in use: a file was left open")


def fill(path: Path) -> int:
    """Write a filler file until the filesystem refuses more; returns bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for size in (65536, 4096, 1):  # big chunks, then top up the last partial pages
            with contextlib.suppress(OSError):
                while n := f.write(b"\0" * size):
                    written += n
    return written


async def put(spool: FileSpool, body: bytes) -> MessageState:
    w = spool.begin()
    for i in range(0, len(body), 65536):
        w.write(body[i : i + 65536])
    e = Envelope("s@example.org", ("r@example.net",), 1.0)
    return await spool.commit(w, e, initial_units(e.recipients))


def test_full_filesystem_gives_spool_full_and_recovers(tmp_path: Path) -> None:
    """Full disk -> SpoolFullError for small and spilled bodies; freeing space resumes commits."""
    with small_tmpfs(tmp_path / "fs") as fs:
        spool_dir = fs / "spool"
        filler = fs / "filler"

        async def main() -> None:
            spool = FileSpool(spool_dir, spill_bytes=64 * 1024)
            await spool.open()
            acked = [await put(spool, b"before %d\r\n" % i) for i in range(20)]
            fill(filler)
            failures = 0
            for i in range(300):  # the segment's last page may still take a few records
                try:
                    acked.append(await put(spool, b"during %d " % i + b"x" * 900 + b"\r\n"))
                except SpoolFullError:
                    failures += 1
                    if failures >= 5:
                        break
            assert 5 == failures, "commits kept succeeding on a full filesystem"
            with pytest.raises(SpoolFullError):
                await put(spool, b"y" * (512 * 1024))  # spilled body: fails while spilling
            assert [] == list((spool_dir / "bodies").iterdir())
            # a restart while the disk is still full recovers exactly the acknowledged mail
            await spool.close()
            spool = FileSpool(spool_dir, spill_bytes=64 * 1024)
            report = await spool.open()
            assert 0 == report.quarantined
            assert [m.id for m in acked] == [m.id for m in spool.messages()]
            # free the space: the same spool accepts mail again, small and spilled
            filler.unlink()
            acked.append(await put(spool, b"after\r\n"))
            big = await put(spool, b"z" * (512 * 1024))
            acked.append(big)
            assert 512 * 1024 == len(await spool.read_body(big.id))
            await spool.close()
            spool = FileSpool(spool_dir, spill_bytes=64 * 1024)
            report = await spool.open()
            assert 0 == report.quarantined
            assert [m.id for m in acked] == [m.id for m in spool.messages()]
            for m in acked:
                assert m.envelope.size == len(await spool.read_body(m.id))
            assert [] == list((spool_dir / "corrupt").iterdir())
            await spool.close()

        asyncio.run(main())
        assert not os.path.exists(filler)


def test_quarantine_on_a_full_disk_leaves_the_torn_tail_for_later(tmp_path: Path) -> None:
    """Issue 7 defect 7: a torn tail whose copy to corrupt/ fails (ENOSPC) does not stop
    start-up (it once raised BufferError from the mmap, hiding the cause): the region stays
    in place, untouched, every message is restored, new mail goes after it, and the start
    after space was freed quarantines it."""
    with small_tmpfs(tmp_path / "fs") as fs:
        spool_dir = fs / "spool"
        filler = fs / "filler"

        async def main() -> None:
            spool = FileSpool(spool_dir)
            await spool.open()
            acked = [await put(spool, b"before %d\r\n" % i) for i in range(5)]
            await spool.close()
            (seg,) = (spool_dir / "log").iterdir()
            parsed = codec.parse_segment_name(seg.name)
            assert parsed is not None
            torn = codec.frame(codec.RecordType.STATE, b"t" * 20000, parsed[1])[:-7000]
            with seg.open("ab") as f:
                f.write(torn)
            intact = seg.read_bytes()
            fill(filler)
            spool = FileSpool(spool_dir)
            report = await spool.open()  # must not raise
            assert (0, 1) == (report.quarantined, report.deferred)
            assert [m.id for m in acked] == [m.id for m in spool.messages()]
            assert intact == seg.read_bytes()
            assert [] == list((spool_dir / "corrupt").iterdir())
            filler.unlink()
            acked.append(await put(spool, b"after the torn tail\r\n"))
            await spool.close()
            spool = FileSpool(spool_dir)
            report = await spool.open()
            assert (1, 0) == (report.quarantined, report.deferred)
            assert [m.id for m in acked] == [m.id for m in spool.messages()]
            (copy,) = (spool_dir / "corrupt").iterdir()
            assert torn == copy.read_bytes()
            await spool.close()
            spool = FileSpool(spool_dir)
            report = await spool.open()  # padded over: reported only once
            await spool.close()
            assert (0, 0) == (report.quarantined, report.deferred)

        asyncio.run(main())


def test_open_on_a_full_disk_fails_naming_the_cause(tmp_path: Path) -> None:
    """When start-up cannot go on without space (a fresh spool needs its first segment),
    the error says the spool filesystem is full."""
    with small_tmpfs(tmp_path / "fs") as fs:
        fill(fs / "filler")

        async def main() -> None:
            with pytest.raises(SpoolFullError, match="spool filesystem is full"):
                await FileSpool(fs / "spool").open()

        asyncio.run(main())


def test_open_on_a_full_disk_with_a_full_last_segment(tmp_path: Path) -> None:
    """The last segment reached its size (the next write would rotate) and the disk is full:
    start-up goes on with that segment (it once failed to create the next one); writes get
    SpoolFullError until space is freed, then rotate and succeed."""
    with small_tmpfs(tmp_path / "fs") as fs:
        spool_dir = fs / "spool"

        async def main() -> None:
            spool = FileSpool(spool_dir, segment_bytes=64 * 1024)
            await spool.open()
            acked = [await put(spool, b"x" * 3000)]
            while spool.segment_stats()[-1][1] < 64 * 1024:
                acked.append(await put(spool, b"x" * 3000))
            await spool.close()
            fill(fs / "filler")
            spool = FileSpool(spool_dir, segment_bytes=64 * 1024)
            await spool.open()  # must not raise
            assert [m.id for m in acked] == [m.id for m in spool.messages()]
            with pytest.raises(SpoolFullError):
                await put(spool, b"no room\r\n")
            (fs / "filler").unlink()
            acked.append(await put(spool, b"room again\r\n"))
            assert 2 == len(spool.segment_stats())
            await spool.close()
            spool = FileSpool(spool_dir, segment_bytes=64 * 1024)
            report = await spool.open()
            await spool.close()
            assert (len(acked), 0) == (report.messages, report.quarantined)

        asyncio.run(main())


def test_removal_works_on_a_full_disk_and_compaction_gives_the_space_back(
    tmp_path: Path,
) -> None:
    """Issue 14 defect 15: with the filesystem full to the last byte (a filler took it
    all), removing a message still succeeds - the space reserve is given up for the
    tombstones - while new mail is refused; the active segment is then compacted with no
    reopen, the reserve comes back and commits succeed; a reopen finds exactly what is
    left."""
    with small_tmpfs(tmp_path / "fs", "8m") as fs:
        spool_dir = fs / "spool"

        async def main() -> None:
            spool = FileSpool(spool_dir)
            await spool.open()
            assert not spool.usage().reserve_released
            assert (spool_dir / "reserve").stat().st_blocks * 512 >= spool.usage().reserve_bytes
            # 200 messages: their tombstones cannot all fit in the log's last page.
            msgs = [await put(spool, b"m%04d " % i + b"x" * 24_000 + b"\r\n") for i in range(200)]
            fill(fs / "filler")
            with pytest.raises(SpoolFullError):
                await put(spool, b"no room " * 2000)
            for m in msgs[:-1]:  # every removal succeeds on the full disk
                await spool.remove(m.id)
            assert spool.usage().reserve_released
            with pytest.raises(SpoolFullError):  # the freed reserve is not for new mail
                await put(spool, b"still no room\r\n")
            assert spool.under_pressure()
            reclaimable = spool.usage().reclaimable_bytes
            assert reclaimable > 199 * 24_000
            (fs / "filler").unlink()
            before = os.statvfs(fs).f_bavail
            freed = await spool.compact()  # the pressure pass: the active segment too
            assert freed > 199 * 24_000
            assert os.statvfs(fs).f_bavail > before
            assert spool.usage().reclaimable_bytes < reclaimable // 10
            assert not spool.usage().reserve_released
            after = await put(spool, b"after\r\n")
            assert [msgs[-1].id, after.id] == [m.id for m in spool.messages()]
            await spool.close()
            spool = FileSpool(spool_dir)
            report = await spool.open()
            assert (2, 0) == (report.messages, report.quarantined)
            assert [msgs[-1].id, after.id] == [m.id for m in spool.messages()]
            assert msgs[-1].envelope.size == len(await spool.read_body(msgs[-1].id))
            await spool.close()

        asyncio.run(main())


def test_an_operator_compaction_includes_the_active_segment(tmp_path: Path) -> None:
    """``compact(include_active=True)`` reclaims dead records in the active segment on
    a disk with plenty of room, where the periodic pass leaves it alone."""
    with small_tmpfs(tmp_path / "fs", "16m") as fs:

        async def main() -> None:
            spool = FileSpool(fs / "spool")
            await spool.open()
            msgs = [await put(spool, b"x" * 50_000) for _ in range(20)]
            for m in msgs[1:]:
                await spool.remove(m.id)
            assert not spool.under_pressure()
            assert 0 == await spool.compact()
            assert spool.usage().reclaimable_bytes > 19 * 50_000
            assert await spool.compact(include_active=True) > 19 * 50_000
            assert spool.usage().reclaimable_bytes < 50_000
            assert [msgs[0].id] == [m.id for m in spool.messages()]
            assert 50_000 == len(await spool.read_body(msgs[0].id))
            await spool.close()

        asyncio.run(main())


def test_a_restart_on_a_full_disk_of_deleted_mail_gets_the_space_back(tmp_path: Path) -> None:
    """Issue 14 defect 15, "and after a restart": every message deleted on a full disk,
    the spool closed before compaction ran and the freed reserve taken by someone else;
    the reopen deletes the segment of finished mail (no write needed) and accepts mail."""
    with small_tmpfs(tmp_path / "fs", "8m") as fs:
        spool_dir = fs / "spool"

        async def main() -> None:
            spool = FileSpool(spool_dir)
            await spool.open()
            msgs = [await put(spool, b"m%04d " % i + b"x" * 18_000 + b"\r\n") for i in range(200)]
            fill(fs / "filler")
            for m in msgs:
                await spool.remove(m.id)
            assert spool.usage().reserve_released
            await spool.close()
            fill(fs / "filler2")
            spool = FileSpool(spool_dir)
            report = await spool.open()
            assert (0, 0) == (report.messages, report.quarantined)
            assert not spool.usage().reserve_released
            assert os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize > 150 * 18_000
            kept = await put(spool, b"after the restart\r\n")
            await spool.close()
            spool = FileSpool(spool_dir)
            await spool.open()
            assert [kept.id] == [m.id for m in spool.messages()]
            await spool.close()

        asyncio.run(main())


def test_an_operator_compaction_reaches_past_an_older_live_segment(tmp_path: Path) -> None:
    """Dead records in the active segment behind an older, fully live one: the forced
    pass rotates, copies the live one forward and frees both (oldest first)."""
    with small_tmpfs(tmp_path / "fs", "16m") as fs:

        async def main() -> None:
            spool = FileSpool(fs / "spool", segment_bytes=64 * 1024)
            await spool.open()
            live = [await put(spool, b"L" * 40_000) for _ in range(2)]  # fill segment 1
            dead = [await put(spool, b"D" * 20_000) for _ in range(2)]  # go to segment 2
            assert 2 == len(spool.segment_stats())
            for m in dead:
                await spool.remove(m.id)
            assert 0 == await spool.compact()  # the periodic pass: nothing worth it
            before = spool.usage().reclaimable_bytes
            assert before > 40_000
            assert await spool.compact(include_active=True) > 0
            assert spool.usage().reclaimable_bytes < 2_000
            assert [m.id for m in live] == [m.id for m in spool.messages()]
            for m in live:
                assert b"L" * 40_000 == await spool.read_body(m.id)
            await spool.close()

        asyncio.run(main())
