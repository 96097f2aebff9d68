"""A delivered message's tombstone is not waited for (DESIGN §3, what a relayed message
writes): the message leaves the index at once; the tombstones of LAZY_FLUSH_S (or of
LAZY_MAX messages) are gathered into one DEL record, written in a batch of their own,
never riding with new mail; a crash before that finds the messages still queued
(delivered again, never lost), and a failed write is retried."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from empath.errors import UnknownMessageError
from empath.spool import writer as writer_module
from empath.spool.fs import FileSpool
from empath.spool.model import Envelope, MessageState, initial_units
from empath.spool.writer import LogWriter


async def put(spool: FileSpool, body: bytes) -> MessageState:
    e = Envelope(sender="s@example.org", recipients=("r@example.net",), received_at=1.0, peer="")
    w = spool.begin()
    w.write(body)
    return await spool.commit(w, e, initial_units(e.recipients, 5.0))


async def opened(path: Path, **kw: object) -> FileSpool:
    spool = FileSpool(path, **kw)  # type: ignore[arg-type]
    await spool.open()
    return spool


async def ids_after_reopen(path: Path) -> list[str]:
    spool = await opened(path)
    try:
        return [m.id for m in spool.messages()]
    finally:
        await spool.close()


async def until(done: Callable[[], bool], what: str) -> None:
    """Poll ``done`` (the writer is a real thread) for up to 10 s of wall time: a loaded
    machine may keep the thread from running for a while, and a count of 1 ms sleeps
    (what this used to do) is far less than 1 s when each sleep takes longer."""
    deadline = time.monotonic() + 10.0
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.001)


def writer_of(spool: FileSpool) -> LogWriter:
    w = spool._writer
    assert w is not None
    return w


async def remove_lazily(spool: FileSpool, msgs: Iterable[MessageState]) -> LogWriter:
    """Remove ``msgs`` as delivered mail is removed, then wait for the writer's next record
    (the gathered tombstone, or its failed first try and the retry)."""
    w = writer_of(spool)
    records = w.records
    for m in msgs:
        await spool.remove(m.id, durable=False)
    await until(lambda: w.records > records, f"the writer wrote record {records + 1}")
    return w


async def test_new_mail_does_not_carry_a_pending_tombstone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch with a tombstone syncs the message history first; new mail must not pay
    that (it used to: the tombstone rode with the next commit)."""
    # the window stays open however slowly the next commit runs on a loaded machine
    monkeypatch.setattr(writer_module, "LAZY_FLUSH_S", 3600.0)
    spool = await opened(tmp_path)
    a = await put(spool, b"a\r\n")
    w = writer_of(spool)
    batches, records = w.batches, w.records
    await spool.remove(a.id, durable=False)
    with pytest.raises(UnknownMessageError):
        spool.get(a.id)  # gone for every reader at once
    assert records == w.records  # nothing written yet: it waits for the others
    b = await put(spool, b"b\r\n")
    assert (batches + 1, records + 1) == (w.batches, w.records)  # the MSG alone
    await spool.close()  # closing writes what is gathered
    assert [b.id] == await ids_after_reopen(tmp_path)


async def test_the_tombstones_of_one_window_are_one_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "LAZY_FLUSH_S", 0.005)
    spool = await opened(tmp_path / "spool")
    gone = [await put(spool, b"%d\r\n" % i) for i in range(5)]
    keep = await put(spool, b"keep\r\n")
    records = writer_of(spool).records
    w = await remove_lazily(spool, gone)
    assert ([], None) == (w._lazy, w._lazy_timer)  # nothing left for a second record
    assert records + 1 == w.records
    assert not any(m.id in spool._locs for m in gone)  # every id of the record accounted for
    shutil.copytree(tmp_path / "spool", tmp_path / "copy")  # a crash now
    await spool.close()
    assert [keep.id] == await ids_after_reopen(tmp_path / "copy")


async def test_a_full_window_is_written_without_waiting_for_the_timer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "LAZY_FLUSH_S", 3600.0)
    monkeypatch.setattr(writer_module, "LAZY_MAX", 3)
    spool = await opened(tmp_path)
    msgs = [await put(spool, b"%d\r\n" % i) for i in range(4)]
    w = await remove_lazily(spool, msgs)  # the first three, at once
    assert [msgs[3].id] == [e.msg_id for e in w._lazy]  # the fourth waits
    await spool.close()
    assert [] == await ids_after_reopen(tmp_path)


async def test_a_crash_between_two_windows_brings_back_only_the_unwritten_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is lost; what comes back (to be delivered again) is at most the messages
    delivered since the last gathered record was written."""
    monkeypatch.setattr(writer_module, "LAZY_FLUSH_S", 0.005)
    spool = await opened(tmp_path / "spool")
    first = [await put(spool, b"1-%d\r\n" % i) for i in range(3)]
    second = [await put(spool, b"2-%d\r\n" % i) for i in range(3)]
    keep = await put(spool, b"keep\r\n")
    await remove_lazily(spool, first)
    monkeypatch.setattr(writer_module, "LAZY_FLUSH_S", 3600.0)
    for m in second:
        await spool.remove(m.id, durable=False)
    shutil.copytree(tmp_path / "spool", tmp_path / "copy")  # the crash
    await spool.close()
    expected = sorted(m.id for m in [*second, keep])
    assert expected == sorted(await ids_after_reopen(tmp_path / "copy"))


async def test_a_torn_gathered_tombstone_brings_every_message_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "LAZY_FLUSH_S", 0.005)
    spool = await opened(tmp_path / "spool")
    msgs = [await put(spool, b"%d\r\n" % i) for i in range(4)]
    w = writer_of(spool)
    seg_path, size = w.active.path, w.active.size
    await remove_lazily(spool, msgs)
    await spool.close()
    record_bytes = seg_path.stat().st_size - size
    assert 16 + 30 + 3 * 26 == record_bytes  # header, first id + length, three more ids
    os.truncate(seg_path, size + record_bytes - 10)  # a power cut in the middle of the record
    assert sorted(m.id for m in msgs) == sorted(await ids_after_reopen(tmp_path / "spool"))


async def test_a_lone_tombstone_is_written_within_the_lazy_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "LAZY_FLUSH_S", 0.002)
    spool = await opened(tmp_path / "spool")
    a = await put(spool, b"a\r\n")
    keep = await put(spool, b"keep\r\n")
    await remove_lazily(spool, [a])
    # what a crash now would leave: the copy of the files has the tombstone
    shutil.copytree(tmp_path / "spool", tmp_path / "copy")
    await spool.close()
    assert [keep.id] == await ids_after_reopen(tmp_path / "copy")


async def test_a_crash_before_the_tombstone_is_written_keeps_the_message(
    tmp_path: Path,
) -> None:
    spool = await opened(tmp_path / "spool")
    a = await put(spool, b"a\r\n")
    await spool.remove(a.id, durable=False)
    shutil.copytree(tmp_path / "spool", tmp_path / "copy")  # the crash: nothing flushed
    await spool.close()
    assert [a.id] == await ids_after_reopen(tmp_path / "copy")  # delivered again, not lost
    assert [] == await ids_after_reopen(tmp_path / "spool")


async def test_a_failed_tombstone_write_is_retried_with_the_next_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "LAZY_FLUSH_S", 0.002)
    fail = [False]

    def fdatasync(fd: int) -> None:
        if fail[0]:
            fail[0] = False
            raise OSError(errno.EIO, "Input/output error")

    spool = await opened(tmp_path, fdatasync=fdatasync)
    a = await put(spool, b"a\r\n")
    fail[0] = True
    w = await remove_lazily(spool, [a])  # the first try failed and wrote nothing
    assert not fail[0]
    assert ([], None) == (w._lazy, w._lazy_timer)  # nothing left to retry
    await spool.close()
    assert [] == await ids_after_reopen(tmp_path)


async def test_a_tombstone_the_full_disk_refuses_does_not_keep_its_segment_from_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivered mail's space comes back on a full disk: the segment holding only
    delivered messages is deleted by compaction although their gathered tombstone
    cannot be written (deleting the segment forgets them as well).  It used to count
    them live and "being removed" until the tombstone was durable, which on a full
    disk is never: compaction stopped at that segment for good."""
    monkeypatch.setattr(writer_module, "LAZY_FLUSH_S", 0.002)
    full = [False]
    refused = [0]

    def fdatasync(fd: int) -> None:
        if full[0]:
            refused[0] += 1
            raise OSError(errno.ENOSPC, "No space left on device")

    spool = await opened(tmp_path / "spool", fdatasync=fdatasync, segment_bytes=70_000)
    # enough dead bytes to be worth compacting under space pressure (space.py)
    delivered = [await put(spool, b"%d\r\n" % i + b"x" * 25_000) for i in range(3)]
    w = writer_of(spool)
    first = w.active
    keep = await put(spool, b"keep\r\n")  # in the next segment: the first one is closed
    assert first.seq < w.active.seq and {m.id for m in delivered} == first.refs
    full[0] = True
    for m in delivered:
        await spool.remove(m.id, durable=False)
    # the tombstone's write and its retry were refused
    await until(lambda: refused[0] >= 2, "two writes of the tombstone were refused")
    freed = await spool.compact()
    assert freed >= 3 * 25_000 and not first.path.exists()
    assert [keep.id] == [m.id for m in spool.messages()]
    # a crash, the tombstone unwritten.  The writer keeps retrying it meanwhile, and each
    # retry takes the reserve file back and gives it up again (the disk is only "full"
    # for fdatasync here): copying it could race its removal, and the reopened spool
    # makes a new one anyway, as after a real crash.
    shutil.copytree(tmp_path / "spool", tmp_path / "copy", ignore=shutil.ignore_patterns("reserve"))
    full[0] = False
    await spool.close()
    assert [keep.id] == await ids_after_reopen(tmp_path / "copy")  # nothing comes back
    assert [keep.id] == await ids_after_reopen(tmp_path / "spool")
