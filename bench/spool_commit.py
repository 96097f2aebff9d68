"""Micro-benchmark of FileSpool.commit: N concurrent committers of small bodies for T seconds.

    .venv/bin/python bench/spool_commit.py [--committers 20] [--seconds 3] [--body 1024] [--uvloop]

Prints commits/s, fdatasync calls (batches) and mean batch size.  Every counted
commit returned, i.e. its record was fdatasync'd.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from empath.spool.fs import FileSpool
from empath.spool.model import Envelope, initial_units


async def run(committers: int, seconds: float, body_bytes: int, where: Path) -> None:
    syncs = 0

    def counting_sync(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        os.fdatasync(fd)

    spool = FileSpool(where, fdatasync=counting_sync)
    await spool.open()
    body = (b"x" * (body_bytes - 2)) + b"\r\n"
    env = Envelope("sender@example.org", ("rcpt@example.net",), time.time(), size=len(body))
    units = initial_units(env.recipients)
    done = 0
    deadline = time.monotonic() + seconds

    async def committer() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            w = spool.begin()
            w.write(body)
            await spool.commit(w, env, units)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(committer() for _ in range(committers)))
    elapsed = time.monotonic() - started
    await spool.close()
    print(
        f"committers={committers} body={body_bytes}B: {done / elapsed:,.0f} commits/s, "
        f"{syncs} fdatasyncs ({done / max(syncs, 1):.1f} commits/sync) in {elapsed:.2f}s"
    )
    t0 = time.monotonic()
    spool = FileSpool(where)
    report = await spool.open()
    await spool.close()
    print(
        f"reopen: {report.messages} messages, {report.records} records in "
        f"{time.monotonic() - t0:.2f}s"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--committers", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--body", type=int, default=1024)
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--dir", type=Path, default=None, help="spool directory (default: a tmp dir)")
    args = ap.parse_args()
    where = args.dir or Path(tempfile.mkdtemp(prefix="empath-bench-", dir=os.getcwd()))
    try:
        coro = run(args.committers, args.seconds, args.body, where)
        if args.uvloop:
            import uvloop

            uvloop.run(coro)
        else:
            asyncio.run(coro)
    finally:
        if args.dir is None:
            shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
