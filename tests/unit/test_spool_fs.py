"""FileSpool: durable commit/update/remove, group commit, recovery of torn and corrupt logs,
spilled bodies, compaction and failure handling - on real files in tmp dirs."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from empath.errors import SpoolError, SpoolFullError, UnknownMessageError
from empath.spool.body import BodyState
from empath.spool.compaction import UNFIT_WARN_EVERY_S
from empath.spool.fs import FileSpool
from empath.spool.memory import MemorySpool
from empath.spool.model import Attempt, Envelope, MessageState, UnitStatus, initial_units
from empath.spool.store import Spool
from empath.testing.clock import FakeClock
from tests.helpers import wait_for

T = TypeVar("T")


def env(*rcpts: str, sender: str = "s@example.org") -> Envelope:
    return Envelope(
        sender=sender, recipients=rcpts, received_at=1_700_000_000.5, peer="127.0.0.1:1"
    )


async def put(spool: FileSpool, body: bytes, *rcpts: str) -> MessageState:
    rcpts = rcpts or ("r@example.net",)
    w = spool.begin()
    w.write(body)
    e = env(*rcpts)
    return await spool.commit(w, e, initial_units(e.recipients, 5.0))


async def reopen(path: Path, **kw: Any) -> tuple[FileSpool, Any]:
    spool = FileSpool(path, **kw)
    report = await spool.open()
    return spool, report


def segments(path: Path) -> list[Path]:
    return sorted((path / "log").iterdir())


def corrupt_files(path: Path) -> list[Path]:
    return sorted((path / "corrupt").iterdir())


# --- round trips ---------------------------------------------------------------


async def test_commit_update_remove_survive_reopen(tmp_path: Path) -> None:
    """What was committed, updated and removed is exactly what a reopened spool has."""

    async def main() -> None:
        spool, report = await reopen(tmp_path)
        assert 0 == report.messages
        a = await put(spool, b"Received: x\r\n\r\nbody a\r\n", "x@a.com", "y@b.com")
        b = await put(spool, b"body b\r\n")
        c = await put(spool, b"body c\r\n")
        assert len(b"Received: x\r\n\r\nbody a\r\n") == a.envelope.size
        done = replace(a.units[0], status=UnitStatus.DELIVERED, attempts=1, finished_at=9.0)
        done = done.with_attempt(Attempt(at=8.0, mx="mx.a.com:25", code=250, text="ok"))
        a2 = await spool.update(a.id, (done, a.units[1]))
        await spool.remove(b.id)
        assert [a.id, c.id] == [m.id for m in spool.messages()]
        await spool.close()

        spool, report = await reopen(tmp_path)
        assert 2 == report.messages
        assert 0 == report.quarantined
        assert [a.id, c.id] == [m.id for m in spool.messages()]
        assert a2 == spool.get(a.id)
        assert c == spool.get(c.id)
        assert b"Received: x\r\n\r\nbody a\r\n" == await spool.read_body(a.id)
        assert b"body c\r\n" == b"".join([x async for x in spool.iter_body(c.id, 3)])
        with pytest.raises(UnknownMessageError):
            spool.get(b.id)
        with pytest.raises(UnknownMessageError):
            await spool.read_body(b.id)
        await spool.close()

    await main()


async def test_in_progress_units_are_pending_after_reopen(tmp_path: Path) -> None:
    """A delivery in flight at a crash is re-queued: in_progress becomes pending."""

    async def main() -> None:
        spool, _ = await reopen(tmp_path)
        m = await put(spool, b"x\r\n")
        busy = (replace(m.units[0], status=UnitStatus.IN_PROGRESS),)
        await spool.update(m.id, busy, durable=False)
        assert UnitStatus.IN_PROGRESS == spool.get(m.id).units[0].status
        await spool.close()
        spool, _ = await reopen(tmp_path)
        assert UnitStatus.PENDING == spool.get(m.id).units[0].status
        await spool.close()

    await main()


async def test_second_process_cannot_open_the_same_spool(tmp_path: Path) -> None:
    """The spool is locked while open."""

    async def main() -> None:
        spool, _ = await reopen(tmp_path)
        with pytest.raises(SpoolError):
            await FileSpool(tmp_path).open()
        await spool.close()
        again, _ = await reopen(tmp_path)
        await again.close()

    await main()


# --- group commit --------------------------------------------------------------


async def test_concurrent_commits_share_fdatasyncs(tmp_path: Path) -> None:
    """200 concurrent commits are made durable with far fewer than 200 fdatasync calls."""
    syncs: list[int] = []

    def counting(fd: int) -> None:
        syncs.append(fd)
        os.fdatasync(fd)

    async def main() -> None:
        spool, _ = await reopen(tmp_path, fdatasync=counting)
        msgs = await asyncio.gather(*(put(spool, b"m %d\r\n" % i) for i in range(200)))
        assert 200 == len({m.id for m in msgs})
        await spool.close()

    await main()
    assert len(syncs) < 50, f"{len(syncs)} syncs for 200 commits"


# --- damage --------------------------------------------------------------------


async def test_torn_tail_at_every_offset_is_quarantined(tmp_path: Path) -> None:
    """Cutting the last record at any byte never crashes recovery; earlier records survive."""

    async def build() -> tuple[list[str], int, str]:
        spool, _ = await reopen(tmp_path)
        ids = [(await put(spool, b"body %d\r\n" % i)).id for i in range(3)]
        before = spool.segment_stats()[-1][1]
        last = await put(spool, b"the last body\r\n")
        await spool.close()
        return ids, before, last.id

    ids, start, last_id = await build()
    (seg,) = segments(tmp_path)
    original = seg.read_bytes()
    assert len(original) > start

    async def check_all() -> None:
        for cut in range(start, len(original)):
            seg.write_bytes(original[:cut])
            for f in corrupt_files(tmp_path):
                f.unlink()
            spool, report = await reopen(tmp_path)
            assert ids == [m.id for m in spool.messages()], cut
            assert (0 if cut == start else 1) == report.quarantined, cut
            assert last_id not in spool
            await spool.close()
            assert start == seg.stat().st_size  # the torn tail was cut off
            if cut > start:
                (q,) = corrupt_files(tmp_path)
                assert original[start:cut] == q.read_bytes()
                assert f"{seg.name}-{start}.bin" == q.name

    await check_all()


async def test_recovery_logs_quarantine_at_error_and_progress(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Quarantine is an ERROR of component "spool"; large recoveries log their progress."""

    async def main() -> None:
        spool, _ = await reopen(tmp_path)
        for i in range(5):
            await put(spool, b"m %d\r\n" % i)
        await spool.close()
        (seg,) = segments(tmp_path)
        with seg.open("ab") as f:
            f.write(b"EmpR garbage")
        caplog.set_level(logging.INFO, logger="empath")
        spool, report = await reopen(tmp_path, progress_every=2)
        await spool.close()
        assert 1 == report.quarantined

    await main()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert ["spool"] == [r.empath_fields["component"] for r in errors]  # type: ignore[attr-defined]
    progress = [r for r in caplog.records if r.getMessage() == "Spool recovery progress"]
    assert len(progress) >= 2


@pytest.mark.parametrize("where", ["header", "body"])
async def test_flipped_byte_mid_file_is_quarantined_once(tmp_path: Path, where: str) -> None:
    """A damaged record is quarantined; records after it are recovered; a reopen is clean."""

    async def build() -> tuple[list[str], int]:
        spool, _ = await reopen(tmp_path)
        ids = []
        offset = 0
        for i in range(5):
            if i == 2:
                offset = spool.segment_stats()[-1][1]
            ids.append((await put(spool, b"body %d\r\n" % i)).id)
        await spool.close()
        return ids, offset

    ids, offset = await build()
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    flip = offset + (1 if where == "header" else 60)
    data[flip] ^= 0x40
    seg.write_bytes(bytes(data))

    async def check(expect_quarantined: int) -> None:
        spool, report = await reopen(tmp_path)
        assert [*ids[:2], *ids[3:]] == [m.id for m in spool.messages()]
        assert expect_quarantined == report.quarantined
        assert b"body 4\r\n" == await spool.read_body(ids[4])
        await spool.close()

    await check(1)
    assert 1 == len(corrupt_files(tmp_path))
    await check(0)  # neutralised in place: not reported again


async def test_missing_spill_file_is_dropped_and_reported_once(tmp_path: Path) -> None:
    """A message whose body file vanished is logged, counted as missing and forgotten."""

    async def main() -> None:
        spool, _ = await reopen(tmp_path, spill_bytes=16)
        keep = await put(spool, b"short\r\n")
        gone = await put(spool, b"x" * 100 + b"\r\n")
        await spool.close()
        (tmp_path / "bodies" / gone.id).unlink()
        spool, report = await reopen(tmp_path, spill_bytes=16)
        assert 1 == report.missing
        assert [keep.id] == [m.id for m in spool.messages()]
        await spool.close()
        spool, report = await reopen(tmp_path, spill_bytes=16)
        assert 0 == report.missing
        await spool.close()

    await main()


async def test_orphaned_body_files_are_removed_at_open(tmp_path: Path) -> None:
    """Spill files of messages never committed (a crash during DATA) do not accumulate."""

    async def main() -> None:
        spool, _ = await reopen(tmp_path, spill_bytes=16)
        w = spool.begin()
        w.write(b"y" * 100)
        # the spill thread writes it: poll that thread's work (not time) every millisecond
        wait_for((tmp_path / "bodies" / w.id).exists, interval=0.001, what="the spill file")
        await spool.close()
        spool, _ = await reopen(tmp_path, spill_bytes=16)
        assert [] == list((tmp_path / "bodies").iterdir())
        await spool.close()

    await main()


# --- bodies --------------------------------------------------------------------


async def test_large_body_is_spilled_with_bounded_memory(tmp_path: Path) -> None:
    """A 25 MiB body written in 64 KiB chunks keeps < 2 MiB allocated and reads back exactly."""
    chunk = os.urandom(65534) + b"\r\n"
    count = 25 * 16

    async def main() -> None:
        spool, _ = await reopen(tmp_path)
        tracemalloc.start()
        try:
            w = spool.begin()
            for _ in range(count):
                w.write(chunk)
            e = env("r@example.net")
            msg = await spool.commit(w, e, initial_units(e.recipients))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2 * 1024 * 1024, f"peak {peak} bytes"
        assert count * len(chunk) == msg.envelope.size
        assert (tmp_path / "bodies" / msg.id).stat().st_size == msg.envelope.size
        await spool.close()
        spool, _ = await reopen(tmp_path)
        h = hashlib.sha256()
        n = 0
        async for part in spool.iter_body(msg.id):
            h.update(part)
            n += len(part)
        assert count * len(chunk) == n
        assert hashlib.sha256(chunk * count).hexdigest() == h.hexdigest()
        await spool.remove(msg.id)
        assert not (tmp_path / "bodies" / msg.id).exists()
        await spool.close()

    await main()


async def test_body_write_error_surfaces_at_commit_and_keeps_nothing(tmp_path: Path) -> None:
    """BodyWriter.write never raises; the error becomes a SpoolError at commit."""

    async def main() -> None:
        spool, _ = await reopen(tmp_path, spill_bytes=16)
        w = spool.begin()
        (tmp_path / "bodies" / w.id).mkdir()  # the spill file cannot be created
        w.write(b"z" * 100)
        with pytest.raises(SpoolError):
            await spool.commit(w, env("r@example.net"), initial_units(["r@example.net"]))
        assert 0 == len(spool)
        await spool.close()

    await main()


async def test_aborted_body_cannot_be_committed(tmp_path: Path) -> None:
    async def main() -> None:
        spool, _ = await reopen(tmp_path, spill_bytes=16)
        w = spool.begin()
        w.write(b"z" * 100)
        w.abort()
        w.abort()
        wait_for(lambda: not (tmp_path / "bodies" / w.id).exists(), what="the discard")
        with pytest.raises(SpoolError):
            await spool.commit(w, env("r@example.net"), initial_units(["r@example.net"]))
        await spool.close()

    await main()


# --- failures of the log itself -------------------------------------------------


class FlakySync:
    """An fdatasync hook that fails the next ``n`` calls with ``err``."""

    def __init__(self) -> None:
        self.fail = 0
        self.err = errno.ENOSPC
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.fail > 0:
            self.fail -= 1
            raise OSError(self.err, os.strerror(self.err))
        os.fdatasync(fd)


async def test_failed_flush_raises_full_and_leaves_nothing(tmp_path: Path) -> None:
    """ENOSPC during a flush -> SpoolFullError, the record is cut off, the spool keeps working."""
    sync = FlakySync()

    async def main() -> None:
        spool, _ = await reopen(tmp_path, fdatasync=sync)
        ok = await put(spool, b"ok\r\n")
        sync.fail = 1
        with pytest.raises(SpoolFullError):
            await put(spool, b"lost\r\n")
        sync.err = errno.EIO
        sync.fail = 1
        with pytest.raises(SpoolError) as info:
            await put(spool, b"lost too\r\n")
        assert not isinstance(info.value, SpoolFullError)
        after = await put(spool, b"after\r\n")
        await spool.close()
        spool, report = await reopen(tmp_path)
        assert [ok.id, after.id] == [m.id for m in spool.messages()]
        assert 0 == report.quarantined
        await spool.close()

    await main()


async def test_untruncatable_failed_batch_is_discarded_by_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a failed batch cannot be cut off, the writer rotates and recovery ignores that tail."""
    sync = FlakySync()

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "truncate refused")

    async def main() -> None:
        spool, _ = await reopen(tmp_path, fdatasync=sync)
        ok = await put(spool, b"ok\r\n")
        monkeypatch.setattr(os, "ftruncate", no_truncate)  # as empath.spool.writer calls it
        sync.fail = 1
        with pytest.raises(SpoolFullError):
            await put(spool, b"lost\r\n")  # written, not synced, not truncatable
        after = await put(spool, b"after\r\n")  # heals by rotating to a new segment
        monkeypatch.undo()
        assert 2 == len(segments(tmp_path))
        await spool.close()
        spool, report = await reopen(tmp_path)
        assert [ok.id, after.id] == [m.id for m in spool.messages()]
        assert 1 == report.quarantined
        await spool.close()

    await main()


# --- compaction ----------------------------------------------------------------


async def test_compaction_keeps_live_messages_and_reclaims_finished(tmp_path: Path) -> None:
    """Old segments whose messages finished are deleted; live ones move forward intact."""

    async def main() -> None:
        spool, _ = await reopen(tmp_path, segment_bytes=4096, spill_bytes=200)
        msgs = [await put(spool, b"%04d" % i + b"x" * 150 + b"\r\n") for i in range(60)]
        big = await put(spool, b"B" * 1000 + b"\r\n")
        live = {m.id for m in msgs[::10]} | {big.id}
        for m in msgs:
            if m.id not in live:
                await spool.remove(m.id)
            else:
                await spool.update(m.id, (replace(m.units[0], attempts=3),))
        before = len(segments(tmp_path))
        freed = await spool.compact()
        assert freed > 0
        assert len(segments(tmp_path)) < before
        assert sorted(live) == sorted(m.id for m in spool.messages())
        await spool.close()
        spool, report = await reopen(tmp_path, segment_bytes=4096, spill_bytes=200)
        assert sorted(live) == [m.id for m in spool.messages()]
        assert 0 == report.quarantined
        for m in [*msgs, big]:
            if m.id in live:
                assert 3 == spool.get(m.id).units[0].attempts or m.id == big.id
                size = m.envelope.size
                assert size == len(await spool.read_body(m.id))
        assert b"B" * 1000 + b"\r\n" == await spool.read_body(big.id)
        await spool.close()

    await main()


async def test_close_waits_for_a_compaction_under_way(tmp_path: Path) -> None:
    """Shutdown during a compaction lets it finish its segment, starts no other, and
    then closes the spool (it once iterated the segments while compaction removed one:
    "dictionary changed size during iteration")."""

    async def main() -> None:
        spool, _ = await reopen(tmp_path, segment_bytes=4096, spill_bytes=200)
        msgs = [await put(spool, b"%04d" % i + b"x" * 150 + b"\r\n") for i in range(60)]
        for m in msgs[1:]:
            await spool.remove(m.id)
        copying = asyncio.Event()
        release = asyncio.Event()
        copy_forward = spool._copy_forward
        victims: list[int] = []

        async def paused_copy(writer: Any, seg: Any) -> int:
            victims.append(seg.seq)
            copying.set()
            await release.wait()
            return await copy_forward(writer, seg)

        spool._copy_forward = paused_copy  # type: ignore[method-assign]
        compaction = asyncio.ensure_future(spool.compact())
        await copying.wait()
        closing = asyncio.ensure_future(spool.close())
        for _ in range(5000):  # loop turns in which close (and its writer thread) could end
            await asyncio.sleep(0)
        assert not closing.done()  # close waits for the segment being compacted
        release.set()
        freed = await compaction
        await closing
        assert freed > 0
        assert 1 == len(victims)  # no further segment was started once close began
        spool, report = await reopen(tmp_path, segment_bytes=4096, spill_bytes=200)
        assert [msgs[0].id] == [m.id for m in spool.messages()]
        assert 0 == report.quarantined
        await spool.close()

    await main()


async def test_usage_counts_log_and_spilled_bytes(tmp_path: Path) -> None:
    async def main() -> None:
        spool, _ = await reopen(tmp_path, spill_bytes=16)
        empty = spool.usage().size_bytes
        await put(spool, b"q" * 1000)
        u = spool.usage()
        assert u.size_bytes >= empty + 1000
        assert 0 < u.free_bytes <= u.total_bytes
        await spool.close()

    await main()


# --- the protocol's shape ------------------------------------------------------


async def test_compact_is_part_of_the_spool_protocol_for_both_backends(tmp_path: Path) -> None:
    """The app calls ``Spool.compact`` without asking whether the backend has one."""

    async def compact_all(spools: list[Spool]) -> list[int]:
        for spool in spools:
            await spool.open()
        freed = [await spool.compact() for spool in spools]
        for spool in spools:
            await spool.close()
        return freed

    assert [0, 0] == await compact_all([FileSpool(tmp_path), MemorySpool()])


async def test_repr_and_body_states_are_informative(tmp_path: Path) -> None:
    async def main() -> None:
        spool, _ = await reopen(tmp_path, spill_bytes=16)
        await put(spool, b"one\r\n")
        text = repr(spool)
        assert text.startswith(f"<FileSpool {str(tmp_path)!r} open messages=1 segments=1 ")
        assert "active=0000000001-" in text and "records_written=1" in text
        w = spool.begin()
        assert BodyState.OPEN is w.state
        w.write(b"z" * 100)
        assert w.spilled
        w.abort()
        assert BodyState.ABORTED is w.state
        await spool.close()
        assert f"<FileSpool {str(tmp_path)!r} closed messages=1>" == repr(spool)

    await main()


async def test_a_segment_that_does_not_fit_is_reported_again_while_the_disk_stays_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk that stays stuck keeps saying so: the warning that a segment's live
    mail does not fit in the free space is repeated every UNFIT_WARN_EVERY_S, not said
    once per segment for ever (a long full disk went silent after its first minute)."""
    clock = FakeClock()
    spool, _ = await reopen(tmp_path, clock=clock, segment_bytes=12_000)
    msgs = [await put(spool, b"m %d\r\n" % i + b"x" * 5000) for i in range(4)]
    await spool.remove(msgs[0].id)  # dead bytes in the first segment, live mail too
    spool._free_total = lambda: (0, 1 << 30)  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="empath")

    async def warnings_after_compacting() -> int:
        spool._reserve.release()  # the disk is full: what compaction gives back is taken
        await spool.compact(include_active=True)
        return sum(r.getMessage().startswith("Spool segment not compacted") for r in caplog.records)

    assert 1 == await warnings_after_compacting()
    clock.advance(1.0)
    assert 1 == await warnings_after_compacting()  # not every second
    clock.advance(UNFIT_WARN_EVERY_S)
    assert 2 == await warnings_after_compacting()
    await spool.close()
