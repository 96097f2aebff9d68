"""FileSpool start-up: a crash while a segment was being created, a quarantine that cannot be
written, and the directories created the first time (issue 7, defects 2, 7 and 8)."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from empath.spool import codec
from empath.spool.codec import RecordType
from empath.spool.fs import FileSpool
from empath.spool.model import Envelope, MessageState, UnitStatus, initial_units
from empath.spool.recovery import BodyLocation, packed_seg


def env() -> Envelope:
    return Envelope(sender="s@example.org", recipients=("r@example.net",), received_at=1.0)


async def put(spool: FileSpool, body: bytes) -> MessageState:
    w = spool.begin()
    w.write(body)
    e = env()
    return await spool.commit(w, e, initial_units(e.recipients))


async def restart(path: Path) -> tuple[list[str], int]:
    """Open and close the spool once: (live ids, regions quarantined)."""
    spool = FileSpool(path)
    report = await spool.open()
    ids = [m.id for m in spool.messages()]
    await spool.close()
    return ids, report.quarantined


def last_seq(path: Path) -> int:
    seqs = [codec.parse_segment_name(p.name) for p in (path / "log").iterdir()]
    return max(s[0] for s in seqs if s is not None)


@pytest.mark.parametrize("next_segment", ["empty", "torn header"])
def test_crash_while_creating_a_segment_loses_nothing_over_restarts(
    tmp_path: Path, next_segment: str
) -> None:
    """3 committed messages + a next segment that was cut while being created: every later
    restart still has the 3 (the replacement once declared prev_end=0 and the second
    restart quarantined the whole real predecessor)."""

    async def main() -> None:
        spool = FileSpool(tmp_path)
        await spool.open()
        acked = [(await put(spool, b"body %d\r\n" % i)).id for i in range(3)]
        await spool.close()
        seq, seed = last_seq(tmp_path) + 1, 0x1234ABCD
        header = codec.frame(RecordType.SEGMENT, codec.segment_payload(seq, 999, 2.0), seed)
        torn = b"" if next_segment == "empty" else header[:10]
        (tmp_path / "log" / codec.segment_name(seq, seed)).write_bytes(torn)
        for n in range(1, 4):
            ids, quarantined = await restart(tmp_path)
            assert acked == ids, f"restart {n}"
            # only the torn header itself is quarantined, once
            assert (1 if (n == 1 and torn) else 0) == quarantined, f"restart {n}"

    asyncio.run(main())


def test_prev_end_of_a_non_adjacent_segment_is_ignored(tmp_path: Path) -> None:
    """A spool already written by the old code (seg N, then N+2 declaring prev_end=0 after
    an empty N+1 was dropped) keeps seg N's messages."""

    async def main() -> None:
        spool = FileSpool(tmp_path)
        await spool.open()
        acked = [(await put(spool, b"body %d\r\n" % i)).id for i in range(3)]
        await spool.close()
        seq, seed = last_seq(tmp_path) + 2, 0x0BADCAFE
        header = codec.frame(RecordType.SEGMENT, codec.segment_payload(seq, 0, 2.0), seed)
        (tmp_path / "log" / codec.segment_name(seq, seed)).write_bytes(header)
        for n in range(1, 3):
            ids, quarantined = await restart(tmp_path)
            assert acked == ids, f"restart {n}"
            assert 0 == quarantined

    asyncio.run(main())


def test_first_creation_syncs_the_spool_directorys_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new spool directory's entry (and those of missing parents) is made durable by
    fsyncing the directory holding it; a later open creates nothing and syncs no parent."""
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    def ident(p: Path) -> tuple[int, int]:
        st = p.stat()
        return st.st_dev, st.st_ino

    path = tmp_path / "var" / "spool"
    monkeypatch.setattr(os, "fsync", spy)

    async def open_close() -> None:
        spool = FileSpool(path)
        await spool.open()
        await spool.close()

    asyncio.run(open_close())
    for parent in (tmp_path, tmp_path / "var", path):  # the spool's own: its subdirectories
        assert ident(parent) in synced, parent
    synced.clear()
    asyncio.run(open_close())
    assert ident(tmp_path) not in synced
    assert ident(tmp_path / "var") not in synced


def test_spilled_bodies_are_created_and_written_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body past the spill threshold: its file is created and written by another thread
    (the event loop only hands chunks over), and the committed file holds every byte."""
    calls: list[tuple[str, int]] = []  # (syscall, thread)
    body_fds: set[int] = set()
    real_open, real_write = os.open, os.write

    def spy_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        fd = real_open(path, flags, mode, **kw)
        if "bodies" in str(path) and os.path.basename(str(path)) != "bodies":
            calls.append(("open", threading.get_ident()))
            body_fds.add(fd)
        return fd

    def spy_write(fd: int, data: Any) -> int:
        if fd in body_fds:
            calls.append(("write", threading.get_ident()))
        return real_write(fd, data)

    chunk = b"x" * 65534 + b"\r\n"

    async def main() -> None:
        loop_thread = threading.get_ident()
        spool = FileSpool(tmp_path)
        await spool.open()
        monkeypatch.setattr(os, "open", spy_open)
        monkeypatch.setattr(os, "write", spy_write)
        try:
            w = spool.begin()
            for _ in range(40):  # 2.5 MiB, well past the 256 KiB spill threshold
                w.write(chunk)
            e = env()
            msg = await spool.commit(w, e, initial_units(e.recipients))
        finally:
            monkeypatch.undo()
        assert 40 * len(chunk) == (tmp_path / "bodies" / msg.id).stat().st_size
        assert chunk * 40 == await spool.read_body(msg.id)
        assert {"open", "write"} == {what for what, _ in calls}
        on_loop = [what for what, thread in calls if thread == loop_thread]
        assert [] == on_loop, f"{len(on_loop)} of {len(calls)} body syscalls on the loop"
        await spool.close()

    asyncio.run(main())


def test_a_newest_state_in_a_later_segment_is_what_restart_restores(tmp_path: Path) -> None:
    """Recovery reads a message's MSG record and its newest STATE record from different
    segments (it keeps their offsets while scanning, not their JSON)."""

    async def main() -> None:
        spool = FileSpool(tmp_path, segment_bytes=4096)
        await spool.open()
        first = await put(spool, b"first body\r\n")
        for i in range(40):  # fill several segments, so the update lands in a later one
            await put(spool, b"%04d" % i + b"x" * 200 + b"\r\n")
        unit = replace(first.units[0], status=UnitStatus.RETRY, attempts=2, next_attempt_at=9.5)
        await spool.update(first.id, (unit,))
        await spool.close()
        assert last_seq(tmp_path) > 2

        spool = FileSpool(tmp_path, segment_bytes=4096)
        report = await spool.open()
        try:
            assert (41, 0) == (report.messages, report.quarantined)
            assert (unit,) == spool.get(first.id).units
            assert b"first body\r\n" == await spool.read_body(first.id)
        finally:
            await spool.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "loc",
    [
        BodyLocation(seg=1, offset=0, length=0, spilled=False, record_bytes=0),
        BodyLocation(seg=7, offset=64 * 2**20, length=12345, spilled=False, record_bytes=12400),
        BodyLocation(seg=2**31, offset=0, length=2**40 - 1, spilled=True, record_bytes=90),
    ],
)
def test_a_packed_body_location_unpacks_to_itself(loc: BodyLocation) -> None:
    packed = loc.pack()
    assert loc == BodyLocation.unpack(packed)
    assert loc.seg == packed_seg(packed)


def test_a_body_location_beyond_what_packs_is_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        BodyLocation(seg=1, offset=0, length=2**40, spilled=True, record_bytes=1).pack()
