"""The control server's limits, over a real Unix socket with a small command table:
per-request timeouts, idle and non-reading clients, the connection cap, streaming."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from empath.control.server import Args, Command, ControlServer
from empath.testing.clock import FakeClock


async def _ping(_args: Args) -> dict[str, Any]:
    return {"pong": True}


CLOCK = FakeClock()  # the server's clock in the tests that need time to pass


async def _slow(_args: Args) -> dict[str, Any]:
    await CLOCK.sleep(30)
    return {}


async def _many(_args: Args) -> AsyncIterator[list[Any]]:
    for i in range(10_000):
        yield [["x" * 100, i]] * 100


TABLE = {
    "ping": Command("ping", unary=_ping),
    "slow": Command("slow", unary=_slow),
    "many": Command("many", stream=_many),
}


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cmd: str
) -> dict[str, Any]:
    writer.write(json.dumps({"v": 1, "id": 1, "cmd": cmd}).encode() + b"\n")
    await writer.drain()
    frame: dict[str, Any] = json.loads(await reader.readline())
    return frame


def _serve(tmp_path: Path, **limits: Any) -> ControlServer:
    return ControlServer(str(tmp_path / "c.sock"), TABLE, clock=CLOCK, **limits)


async def _until_waiting(timers: int) -> None:
    """Let the loop run (socket I/O included) until the server waits on ``timers``
    timers of the virtual clock."""
    for _ in range(10_000):
        if CLOCK.pending() >= timers:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"the server never waited on {timers} timers ({CLOCK!r})")


def test_a_slow_command_times_out_and_the_connection_stays_usable(tmp_path: Path) -> None:
    async def go() -> None:
        server = _serve(tmp_path, request_timeout_s=0.2)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(server.path)
            base = CLOCK.pending()
            writer.write(json.dumps({"v": 1, "id": 1, "cmd": "slow"}).encode() + b"\n")
            await _until_waiting(base + 2)  # the request's deadline and the command's sleep
            CLOCK.advance(0.2)
            frame = json.loads(await reader.readline())
            assert ("timeout", False) == (frame["error"]["code"], frame["ok"])
            assert {"pong": True} == (await _request(reader, writer, "ping"))["data"]
            writer.close()
        finally:
            await server.close()

    asyncio.run(go())


def test_silent_clients_are_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    async def go() -> None:
        server = _serve(tmp_path, idle_timeout_s=0.2)
        await server.start()
        try:
            base = CLOCK.pending()
            reader, writer = await asyncio.open_unix_connection(server.path)
            writer.write(b'{"v": 1, "cmd": "pi')  # half a request, then nothing
            await _until_waiting(base + 1)  # the idle deadline
            CLOCK.advance(0.2)
            assert b"" == await asyncio.wait_for(reader.read(), 5)
            writer.close()
        finally:
            await server.close()

    asyncio.run(go())


def test_a_client_that_stops_reading_is_dropped_and_blocks_nobody(tmp_path: Path) -> None:
    async def go() -> None:
        server = _serve(tmp_path, write_timeout_s=0.3)
        await server.start()
        try:
            stuck_r, stuck_w = await asyncio.open_unix_connection(server.path)
            stuck_w.write(b'{"v": 1, "id": 1, "cmd": "many"}\n')  # ~100 MB, never read
            await stuck_w.drain()
            reader, writer = await asyncio.open_unix_connection(server.path)
            for _ in range(20):
                assert (await _request(reader, writer, "ping"))["ok"] is True
            await CLOCK.run_for(3.0, step=0.1)  # still not reading: past the write timeouts
            # the stuck client was disconnected when a chunk could not drain in time
            got = 0
            while True:
                data = await asyncio.wait_for(stuck_r.read(1 << 20), 10)
                if not data:
                    break
                got += len(data)
            assert got < 50_000_000  # far from the 110 MB the command would send
            writer.close()
            stuck_w.close()
        finally:
            await server.close()

    asyncio.run(go())


def test_connections_past_the_cap_get_busy(tmp_path: Path) -> None:
    async def go() -> None:
        server = _serve(tmp_path, max_connections=2)
        await server.start()
        try:
            kept = [await asyncio.open_unix_connection(server.path) for _ in range(2)]
            for r, w in kept:
                assert (await _request(r, w, "ping"))["ok"] is True
            r3, w3 = await asyncio.open_unix_connection(server.path)
            frame = json.loads(await r3.readline())
            assert "busy" == frame["error"]["code"]
            assert b"" == await r3.read()
            for _r, w in kept:
                w.close()
            w3.close()
        finally:
            await server.close()

    asyncio.run(go())


def test_empathctl_does_not_import_the_daemon() -> None:
    """Start-up time: the CLI path loads neither asyncio nor the daemon's packages, nor
    typing, pathlib, shutil (argparse's terminal size) or the native build's checks."""
    code = (
        "import sys, empath.cli.empathctl as m, empath.control.client\n"
        "m.build_parser(m.named_command(['queue', 'stats']))\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    heavy = {"asyncio", "empath.app", "empath.queue", "empath.spool", "empath.smtp", "dns"}
    heavy |= {"dataclasses", "orjson", "inspect", "importlib.abc"}  # see control.protocol
    heavy |= {"typing", "pathlib", "shutil", "hashlib", "sysconfig"}  # see empath/__init__
    assert set() == heavy & set(out)
    assert not [m for m in out if m.startswith(("empath.config.model", "empath.delivery"))]
