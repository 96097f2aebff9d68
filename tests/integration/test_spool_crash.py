"""Crash safety of the file spool: a child process commits, updates, removes and compacts in a
loop and reports each operation after it returned; we SIGKILL it at random moments.  After
every kill the spool opens cleanly, every acknowledged message is there byte-exact, every
acknowledged removal stays removed, and nothing corrupt is left unquarantined."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from empath.spool.fs import FileSpool
from tests.helpers import stop_pid, wait_for

CHILD = r"""
import asyncio, hashlib, os, random, sys
from dataclasses import replace
from pathlib import Path
from empath.spool.fs import FileSpool
from empath.spool.model import Envelope, UnitStatus, initial_units

async def main(path, out):
    spool = FileSpool(Path(path), segment_bytes=256 * 1024, spill_bytes=32 * 1024)
    await spool.open()
    live = [m.id for m in spool.messages()]
    rnd = random.Random()

    async def one(n):
        size = rnd.choice([10, 300, 2000, 5000, 70000])
        body = os.urandom(size // 2).hex().encode()[:size] + b"\r\n"
        w = spool.begin()
        for i in range(0, len(body), 4096):
            w.write(body[i:i + 4096])
        e = Envelope("s@example.org", ("a@x.com", "b@y.org"), 1.0)
        msg = await spool.commit(w, e, initial_units(e.recipients, 1.0))
        out.write(f"C {msg.id} {hashlib.sha256(body).hexdigest()}\n")
        live.append(msg.id)
        if n % 3 == 0 and live:
            victim = live.pop(rnd.randrange(len(live)))
            out.write(f"R {victim}\n")  # in flight: may or may not survive a kill
            await spool.remove(victim)
            out.write(f"D {victim}\n")
        elif n % 3 == 1 and live:
            mid = rnd.choice(live)
            units = spool.get(mid).units
            new = (replace(units[0], status=UnitStatus.RETRY, attempts=units[0].attempts + 1),
                   *units[1:])
            await spool.update(mid, new, durable=n % 2 == 0)

    n = 0
    while True:
        await asyncio.gather(*(one(n + i) for i in range(8)))
        n += 8
        if n % 64 == 0:
            await spool.compact()

with open(sys.argv[2], "a", buffering=1) as out:
    asyncio.run(main(sys.argv[1], out))
"""


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text()
    return [line for line in text.split("\n")[:-1] if line]  # only complete lines


def verify_round(
    spool_dir: Path,
    round_no: int,
    committed: dict[str, str],
    removed: set[str],
    maybe_removed: set[str],
) -> None:
    """Acknowledged commits are present byte-exact, acknowledged removals absent."""

    async def verify() -> None:
        spool = FileSpool(spool_dir, segment_bytes=256 * 1024, spill_bytes=32 * 1024)
        await spool.open()
        try:
            present = {m.id for m in spool.messages()}
            for msg_id, digest in committed.items():
                if msg_id in removed:
                    assert msg_id not in present, f"round {round_no}: {msg_id} came back"
                    continue
                if msg_id in maybe_removed and msg_id not in present:
                    continue
                assert msg_id in present, f"round {round_no}: lost {msg_id}"
                body = await spool.read_body(msg_id)
                assert digest == hashlib.sha256(body).hexdigest(), msg_id
                assert len(body) == spool.get(msg_id).envelope.size
        finally:
            await spool.close()
        again = FileSpool(spool_dir, segment_bytes=256 * 1024, spill_bytes=32 * 1024)
        report = await again.open()
        await again.close()
        assert 0 == report.quarantined, "damage must be neutralised by the first recovery"

    asyncio.run(verify())


def test_sigkill_never_loses_an_acknowledged_message(tmp_path: Path) -> None:
    """Eight SIGKILLs at random points: all acknowledged commits/removals hold after recovery."""
    spool_dir = tmp_path / "spool"
    acks = tmp_path / "acks.txt"
    rnd = random.Random(os.getpid())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    for round_no in range(8):
        already = len(_lines(acks))
        target = already + rnd.randrange(50, 1500)
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(spool_dir), str(acks)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def reached(target: int = target, proc: subprocess.Popen[bytes] = proc) -> bool:
            return len(_lines(acks)) >= target or proc.poll() is not None

        try:
            wait_for(
                reached,
                timeout=60,
                what="the child to acknowledge commits",
            )
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            stop_pid(proc)
            if proc.stderr:
                proc.stderr.close()

        committed: dict[str, str] = {}
        removed: set[str] = set()
        removing: set[str] = set()
        for line in _lines(acks):
            kind, msg_id, *rest = line.split()
            if kind == "C":
                committed[msg_id] = rest[0]
            elif kind == "R":
                removing.add(msg_id)
            else:
                removed.add(msg_id)
        verify_round(spool_dir, round_no, committed, removed, removing - removed)
