"""A delivered message's tombstone is not waited for (DESIGN §3, what a relayed message
writes): the message leaves the index at once, its DEL record rides with the next flush
or is written on its own within LAZY_FLUSH_S, a crash before that finds the message
still queued (delivered again, never lost), and a failed write is retried."""

from __future__ import annotations

import asyncio
import errno
import shutil
from pathlib import Path

import pytest

from empath.errors import UnknownMessageError
from empath.spool import writer as writer_module
from empath.spool.fs import FileSpool
from empath.spool.model import Envelope, MessageState, initial_units


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


async def wait_records(spool: FileSpool, n: int) -> None:
    w = spool._writer
    assert w is not None
    for _ in range(1000):
        if w.records >= n:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"the writer wrote {w.records} records, not {n}")


async def test_the_tombstone_leaves_with_the_next_commit_in_one_batch(tmp_path: Path) -> None:
    spool = await opened(tmp_path)
    a = await put(spool, b"a\r\n")
    w = spool._writer
    assert w is not None
    batches, records = w.batches, w.records
    await spool.remove(a.id, durable=False)
    with pytest.raises(UnknownMessageError):
        spool.get(a.id)  # gone for every reader at once
    assert records == w.records  # nothing written yet: it waits for company
    b = await put(spool, b"b\r\n")
    assert (batches + 1, records + 2) == (w.batches, w.records)
    await spool.close()
    assert [b.id] == await ids_after_reopen(tmp_path)


async def test_a_lone_tombstone_is_written_within_the_lazy_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "LAZY_FLUSH_S", 0.002)
    spool = await opened(tmp_path / "spool")
    a = await put(spool, b"a\r\n")
    keep = await put(spool, b"keep\r\n")
    w = spool._writer
    assert w is not None
    await spool.remove(a.id, durable=False)
    await wait_records(spool, w.records + 1)
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
    w = spool._writer
    assert w is not None
    records = w.records
    fail[0] = True
    await spool.remove(a.id, durable=False)
    await wait_records(spool, records + 1)  # the first try failed and wrote nothing
    assert not fail[0]
    for _ in range(1000):  # the writer counts the record before the loop's batch callback
        if a.id not in spool._removing:
            break
        await asyncio.sleep(0.001)
    assert a.id not in spool._removing
    await spool.close()
    assert [] == await ids_after_reopen(tmp_path)
