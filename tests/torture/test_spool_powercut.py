"""Torture, power cut: copies of a spool taken while it is being written, each started from.

A FileSpool (small segments, so they rotate; small spill threshold, so some bodies
have their own file) takes commits, durable updates and removals from several
coroutines.  Meanwhile, at random moments, a thread copies the spool directory as
the files are (the log first, then the bodies: a body is synced before the record
naming it, so the copy never names a body it lacks).  Half of the copies are then cut
like a power cut mid-write: the segment that was being appended to is truncated at a
random offset past everything acknowledged when the copy began (usually inside a
record: a torn tail), and later segments are dropped; in a pre-formatted segment
(spool/preformat.py) the bytes from that offset to the end of the records are zeros
again instead, as the disk still holds the pre-formatting where the write did not land.

Every copy is opened with a fresh FileSpool.  Each message acknowledged before its
copy began is there, its units at least as far along as acknowledged (its body
byte-exact: a sample of 400 per copy); each removal acknowledged before is absent;
every quarantined region is a segment's tail (never a good record), reaching the end of
its records.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from empath.spool.fs import FileSpool
from empath.spool.model import Envelope, initial_units
from tests.torture.conftest import figure, pick

SEGMENT_BYTES = 256 * 1024
SPILL_BYTES = 8 * 1024
WORKERS = 8
BODIES_CHECKED = 400  # per copy, byte for byte (every message's presence is checked)


@dataclass(slots=True)
class Acked:
    """What the workload was told is durable, as the copies must show it."""

    live: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # id -> (body, attempts)
    removing: set[str] = field(default_factory=set)  # removal issued (maybe not durable yet)
    removed: set[str] = field(default_factory=set)  # removal durable
    ops: int = 0


@dataclass(slots=True)
class Copy:
    path: Path
    live: dict[str, tuple[bytes, int]]
    removed: set[str]
    cut: tuple[str, int] | None = None  # (segment name, truncated size)


async def workload(spool: FileSpool, acked: Acked, rng: random.Random, until: int) -> None:
    while acked.ops < until:
        roll = rng.random()
        candidates = [i for i, (b, _) in acked.live.items() if len(b) <= SPILL_BYTES]
        if roll < 0.15 and candidates:
            msg_id = rng.choice(candidates)
            acked.live.pop(msg_id)  # neither required nor forbidden until the DEL is durable
            acked.removing.add(msg_id)
            await spool.remove(msg_id)
            acked.removed.add(msg_id)
        elif roll < 0.35 and acked.live:
            msg_id = rng.choice(list(acked.live))
            body, attempts = acked.live[msg_id]
            unit = spool.get(msg_id).units[0]
            await spool.update(msg_id, (replace(unit, attempts=attempts + 1),))
            if msg_id in acked.live:
                acked.live[msg_id] = (body, attempts + 1)
        else:
            size = rng.choice((120, 700, 3000)) if rng.random() > 0.05 else 20_000
            body = (b"%d " % rng.getrandbits(64)) * (size // 20) + b"\r\n"
            w = spool.begin()
            for i in range(0, len(body), 4096):
                w.write(body[i : i + 4096])
            rcpt = f"r{rng.randrange(5)}@d{rng.randrange(3)}.test"
            env = Envelope("s@power.test", (rcpt,), 1.0)
            msg = await spool.commit(w, env, initial_units(env.recipients))
            acked.live[msg.id] = (body, 0)
        acked.ops += 1


def copy_spool(src: Path, dst: Path) -> None:
    """The files as they are now: log first, then bodies (see the module doc)."""
    for sub in ("log", "bodies"):
        (dst / sub).mkdir(parents=True)
        for entry in sorted(os.scandir(src / sub), key=lambda e: e.name):
            try:
                shutil.copyfile(entry.path, dst / sub / entry.name)
            except FileNotFoundError:  # a body removed meanwhile (never one still named)
                continue


def cut(copy: Copy, active: str, acked_size: int, rng: random.Random) -> None:
    """A power cut mid-write: cut the active segment past ``acked_size``, drop later ones."""
    log_dir = copy.path / "log"
    target = log_dir / active
    data = target.read_bytes()
    end = records_end(data)
    if end <= acked_size:
        return
    at = rng.randrange(acked_size, end)
    if end < len(data):  # pre-formatted: what did not land is zeros
        with target.open("r+b") as f:
            f.seek(at)
            f.write(bytes(end - at))
    else:
        os.truncate(target, at)
    for seg in log_dir.iterdir():
        if seg.name > active:
            seg.unlink()
    copy.cut = (active, at)


async def take_copies(
    spool: FileSpool, acked: Acked, root: Path, count: int, rng: random.Random, until: int
) -> list[Copy]:
    copies: list[Copy] = []
    for n in range(count):
        while acked.ops < (n + 1) * until // (count + 1) + rng.randrange(until // (count + 1)):
            await asyncio.sleep(0.001)
        active, acked_size, _, _ = spool.segment_stats()[-1]  # the newest: being appended to
        copy = Copy(root / f"copy{n}", dict(acked.live), set(acked.removed))
        await asyncio.to_thread(copy_spool, spool.path, copy.path)
        for msg_id in acked.removing & copy.live.keys():  # removed while the copy ran:
            del copy.live[msg_id]  # the copy may have the DEL or not
        if n % 2:
            cut(copy, active, acked_size, rng)
        copies.append(copy)
    return copies


def records_end(data: bytes) -> int:
    """Where a segment's records end: its size, or where its pre-formatted zeros begin."""
    return len(data.rstrip(b"\0"))


async def check(copy: Copy, preformat: bool) -> tuple[int, int]:
    """Open one copy; assert what it must hold.  (messages, torn tails quarantined)."""
    raw = {p.name: p.read_bytes() for p in (copy.path / "log").iterdir()}
    spool = FileSpool(copy.path, segment_bytes=SEGMENT_BYTES, preformat=preformat)
    report = await spool.open()
    try:
        for msg_id, (_, attempts) in copy.live.items():
            msg = spool.get(msg_id)  # raises if an acknowledged message is missing
            assert msg.units[0].attempts >= attempts, msg_id
        for msg_id in random.sample(sorted(copy.live), min(BODIES_CHECKED, len(copy.live))):
            assert copy.live[msg_id][0] == await spool.read_body(msg_id), msg_id
        assert not any(msg_id in spool for msg_id in copy.removed)
        assert 0 == report.missing
        for region in (copy.path / "corrupt").iterdir():
            seg_name, _, offset = region.name[: -len(".bin")].rpartition("-")
            # a tail: only zeros (pre-formatted) follow it in the segment as copied (and cut)
            after = raw[seg_name][int(offset) + region.stat().st_size :]
            assert region.stat().st_size and not after.strip(b"\0"), region.name
        return len(spool), report.quarantined
    finally:
        await spool.close()


@pytest.mark.timeout(pick(300, 3600))
@pytest.mark.parametrize("preformat", [True, False], ids=["pre-formatted", "appended"])
def test_copies_taken_mid_write_recover_every_acknowledged_message(
    tmp_path: Path, preformat: bool
) -> None:
    ops = pick(4_000, 60_000)
    count = pick(10, 30)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))

    async def main() -> tuple[list[Copy], list[tuple[int, int]]]:
        spool = FileSpool(
            tmp_path / "spool",
            segment_bytes=SEGMENT_BYTES,
            spill_bytes=SPILL_BYTES,
            preformat=preformat,
        )
        await spool.open()
        acked = Acked()
        try:
            workers = [
                asyncio.create_task(workload(spool, acked, random.Random(rng.random()), ops))
                for _ in range(WORKERS)
            ]
            copies = await take_copies(spool, acked, tmp_path, count, rng, ops)
            await asyncio.gather(*workers)
        finally:
            await spool.close()
        results = [await check(c, preformat) for c in copies]
        return copies, results

    copies, results = asyncio.run(main())
    cuts = sum(1 for c in copies if c.cut is not None)
    torn = sum(q for _, q in results)
    checked = sum(len(c.live) for c in copies)
    segments = len(list((tmp_path / "spool" / "log").glob("*.seg")))
    figure(
        "power-cut",
        f"{'pre-formatted' if preformat else 'appended'} segments: "
        f"{len(copies)} copies taken during {ops:,} writes ({cuts} also cut mid-write): "
        f"{checked:,} acknowledged messages checked, 0 lost; {torn} torn tails quarantined; "
        f"{segments} segments at the end (rotating every {SEGMENT_BYTES // 1024} KiB)",
    )
    assert torn > 0, "no copy had a torn tail: the test did not test that"
