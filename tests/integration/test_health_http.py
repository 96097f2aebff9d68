"""The health/metrics HTTP server over real loopback sockets: routes and its connection cap."""

from __future__ import annotations

import asyncio
import json

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


def test_connections_beyond_the_cap_are_answered_503_at_once_and_served_again_later() -> None:
    """Idle sockets hold at most `max_connections` slots; one more gets 503 without waiting."""

    async def go() -> None:
        server = HealthServer("127.0.0.1", 0, list, max_connections=3)
        await server.start()
        idle = []
        try:
            for _ in range(3):
                idle.append(await asyncio.open_connection("127.0.0.1", server.port))
            for _ in range(100):  # wait until the server has taken all three
                if server.active == 3:
                    break
                await asyncio.sleep(0.01)
            assert 3 == server.active
            status, body = await asyncio.wait_for(_get(server.port, "/health/live"), 3)
            assert (503, b"too many connections\n") == (status, body)
            for _, w in idle:
                w.close()
            for _ in range(300):
                if server.active == 0:
                    break
                await asyncio.sleep(0.01)
            assert 200 == (await _get(server.port, "/health/live"))[0]
        finally:
            await server.close()

    asyncio.run(go())
