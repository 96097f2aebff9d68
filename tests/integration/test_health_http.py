"""The health/metrics HTTP server over real loopback sockets: routes and its connection cap."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from empath.observability.health import Check, HealthServer


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_ready_names_each_check_and_answers_503_when_one_fails() -> None:
    checks = [Check("listeners", True, True), Check("pending_units", True, 3)]

    async def go() -> None:
        server = HealthServer("127.0.0.1", 0, lambda: list(checks))
        await server.start()
        try:
            status, body = await _get(server.port, "/health/ready")
            assert 200 == status
            checks[1] = Check("pending_units", False, 12)
            status, body = await _get(server.port, "/health/ready")
            assert 503 == status
            doc = json.loads(body)
            assert {"ok": False, "value": 12} == doc["checks"]["pending_units"]
            assert "not_ready" == doc["status"]
            assert (200, b'{"status":"live"}\n') == await _get(server.port, "/health/live")
        finally:
            await server.close()

    asyncio.run(go())


async def _until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_silent_connections_are_pushed_out_by_new_ones_and_liveness_stays_200() -> None:
    """Issue 14 defect 7: with every slot held by a silent connection, a probe is served
    (the silent connection that waited longest is closed for it), as is a scrape."""

    async def go() -> None:
        server = HealthServer(
            "127.0.0.1", 0, list, lambda: (b"up 1\n", "text/plain"), max_connections=3
        )
        await server.start()
        idle = []
        try:
            for _ in range(3):
                idle.append(await asyncio.open_connection("127.0.0.1", server.port))
            await _until(lambda: server.active == 3, "three silent connections")
            assert (200, b'{"status":"live"}\n') == await asyncio.wait_for(
                _get(server.port, "/health/live"), 3
            )
            assert (200, b"up 1\n") == await asyncio.wait_for(_get(server.port, "/metrics"), 3)
            assert server.evicted >= 1
            assert 0 == server.refused
            # The oldest silent connection was the one closed.
            assert b"" == await asyncio.wait_for(idle[0][0].read(), 3)
        finally:
            for _, w in idle:
                w.close()
            await _until(lambda: server.active == 0, "the silent connections to end")
            await server.close()

    asyncio.run(go())


def test_when_every_slot_is_answering_readiness_is_refused_but_liveness_is_not() -> None:
    """Slots busy sending a large scrape to clients that do not read it: a readiness
    probe gets 503 (it could not be served), a liveness probe still gets 200."""
    big = b"x" * (32 * 1024 * 1024)

    async def go() -> None:
        server = HealthServer("127.0.0.1", 0, list, lambda: (big, "text/plain"), max_connections=2)
        await server.start()
        stuck = []
        try:
            for _ in range(2):
                r, w = await asyncio.open_connection("127.0.0.1", server.port)
                w.write(b"GET /metrics HTTP/1.1\r\n\r\n")
                stuck.append((r, w))
            await _until(lambda: server.active == 2 and not server._waiting, "busy slots")
            assert 200 == (await asyncio.wait_for(_get(server.port, "/health/live"), 5))[0]
            assert 503 == (await asyncio.wait_for(_get(server.port, "/health/ready"), 5))[0]
            assert 0 == server.evicted
        finally:
            for _, w in stuck:
                w.transport.abort()
            await _until(lambda: server.active == 0, "the stuck connections to end")
            await server.close()

    asyncio.run(go())
