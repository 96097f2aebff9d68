"""The message history (`empathctl message log`) is as durable as the queue: an event is
fdatasync'd, by the spool's writer thread, before the spool change recorded after it
is written; a batch of new mail alone never waits for the history (DESIGN §3)."""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path

from empath.spool.fs import FileSpool
from empath.spool.journal import MessageJournal
from empath.spool.model import Envelope, MessageState, UnitStatus, initial_units
from empath.testing.clock import FakeClock


class Syncs:
    """An fdatasync that notes which file it synced, its size then and the thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def __call__(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        self.calls.append((path, os.fstat(fd).st_size, threading.current_thread().name))
        os.fdatasync(fd)

    def of(self, part: str) -> list[int]:
        return [i for i, (path, _n, _t) in enumerate(self.calls) if f"/{part}/" in path]


def _read(path: str) -> str:
    return Path(path).read_text()


async def commit(spool: FileSpool, rcpt: str) -> MessageState:
    w = spool.begin()
    w.write(b"Subject: x\r\n\r\nbody\r\n")
    env = Envelope("s@origin.test", (rcpt,), 1_700_000_000.0)
    return await spool.commit(w, env, initial_units(env.recipients, 1.0))


async def spool_with_history(tmp_path: Path, syncs: Syncs) -> tuple[FileSpool, MessageJournal]:
    """An open spool whose writer syncs the history first, both fdatasyncs noted."""
    spool = FileSpool(tmp_path / "spool", fdatasync=syncs)
    journal = MessageJournal(str(tmp_path / "journal"), 3600.0, FakeClock(), fdatasync=syncs)
    spool.sync_before_state(journal.sync)
    await spool.open()
    return spool, journal


async def test_an_event_is_on_disk_before_the_state_change_recorded_after_it(
    tmp_path: Path,
) -> None:
    syncs = Syncs()
    spool, journal = await spool_with_history(tmp_path, syncs)
    try:
        msg = await commit(spool, "a@x.test")
        journal.record(msg.id, "attempt", domain="x.test", text="250 ok")
        syncs.calls.clear()
        done = replace(msg.units[0], status=UnitStatus.DELIVERED, attempts=1)
        await spool.update(msg.id, (done,))
        (j,) = syncs.of("journal")
        first_log = syncs.of("log")[0]
        assert j < first_log  # the history first, then the state record
        path, synced_bytes, thread = syncs.calls[j]
        text = _read(path)
        assert synced_bytes == len(text.encode()) > 0  # the whole line, synced
        assert msg.id in text
        assert thread != threading.current_thread().name  # the writer thread, not the loop

        journal.record(msg.id, "left", reason="delivered")
        syncs.calls.clear()
        await spool.remove(msg.id)  # a tombstone syncs the history first too
        assert syncs.of("journal") and syncs.of("journal")[0] < syncs.of("log")[0]

        journal.record(msg.id, "operator", action="note")
        syncs.calls.clear()
        await commit(spool, "b@x.test")  # new mail alone: no history sync on its way
        assert [] == syncs.of("journal")
        assert ["attempt", "left", "operator"] == [e["event"] for e in journal.lookup(msg.id)]
    finally:
        await spool.close()
        journal.close()


async def test_nothing_recorded_means_no_history_sync(tmp_path: Path) -> None:
    syncs = Syncs()
    spool, journal = await spool_with_history(tmp_path, syncs)
    try:
        msg = await commit(spool, "a@x.test")
        await spool.update(msg.id, (replace(msg.units[0], attempts=1),))
        await spool.remove(msg.id)
        assert [] == syncs.of("journal")
    finally:
        await spool.close()
        journal.close()


async def test_new_mail_does_not_wait_for_the_history_while_a_tombstone_is_pending(
    tmp_path: Path,
) -> None:
    """A delivered message's tombstone is gathered and written later in a batch of its
    own, after the history sync; the new mail committed meanwhile syncs only the log."""
    syncs = Syncs()
    spool, journal = await spool_with_history(tmp_path, syncs)
    try:
        msg = await commit(spool, "a@x.test")
        journal.record(msg.id, "left", reason="delivered")
        await spool.remove(msg.id, durable=False)
        syncs.calls.clear()
        await commit(spool, "b@x.test")
        assert [] == syncs.of("journal")
        assert syncs.of("log")
    finally:
        await spool.close()
        journal.close()
    # closing wrote the tombstone, the history of the message before it
    assert syncs.of("journal") and syncs.of("journal")[0] < syncs.of("log")[-1]
    assert ["left"] == [e["event"] for e in journal.lookup(msg.id)]
