"""Health endpoints (DESIGN §7) on a tiny asyncio HTTP/1.1 server.

`GET /health/live` → 200 while the process serves.  `GET /health/ready` → 200 when
every check passes, else 503; both answer a JSON body naming each check and its
value.  `/metrics` is served from a pluggable renderer (the metrics module).

The server reads one request per connection, answers, and closes: health probes
and scrapes are rare, so simplicity wins over keep-alive.

Idle-connection floods (issue 14, defect 7: 64 silent TCP connections once made
``/health/live`` and ``/metrics`` answer 503 for 10 s, so an orchestrator restarted
a healthy MTA).  A request's header must arrive within ``REQUEST_TIMEOUT_S`` (2 s:
probes and scrapers send theirs at once).  At most ``max_connections`` (256)
connections are held; when a new one finds them all taken, the connection that has
waited longest *without sending a request* is closed to make room - a silent
client can only ever push out other silent clients.  Only when every slot is
busy answering a request is the newcomer refused with ``503`` - and even then a
``GET /health/live`` is answered ``200``: liveness never fails because of other
clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from empath.logs import get_logger

log = get_logger("health", __name__)

MAX_REQUEST_BYTES = 8192
MAX_CONNECTIONS = 256
REQUEST_TIMEOUT_S = 2.0
REFUSE_READ_S = 1.0
_LIVE: Final = b'{"status":"live"}\n'


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    value: Any


MIN_SPOOL_FREE_RATIO: Final = 0.01  # DESIGN §7: the spool has at least 1 % free
MAX_HEARTBEAT_AGE_S: Final = 10.0  # DESIGN §7: the delivery scheduler ticked within 10 s


@dataclass(frozen=True, slots=True)
class ReadinessInputs:
    """What readiness judges, read at one instant (by the composition root)."""

    listeners_bound: bool
    spool_writable: bool
    spool_free_ratio: float
    heartbeat_age_s: float
    # Units waiting for this node itself (Scheduler.backlog: in flight, due with no
    # delivery slot yet), counted up to max_queue_size; units waiting to retry or held
    # by their destination (breaker, rate limit) are not: what the node can still take in.
    pending_units: int
    max_queue_size: int


def readiness_checks(inputs: ReadinessInputs) -> list[Check]:
    """DESIGN §7's checks, each with the value it judged."""
    i = inputs
    return [
        Check("listeners", i.listeners_bound, i.listeners_bound),
        Check("spool_writable", i.spool_writable, i.spool_writable),
        Check(
            "spool_free_ratio",
            i.spool_free_ratio >= MIN_SPOOL_FREE_RATIO,
            round(i.spool_free_ratio, 4),
        ),
        Check(
            "scheduler_heartbeat_age_s",
            i.heartbeat_age_s <= MAX_HEARTBEAT_AGE_S,
            round(i.heartbeat_age_s, 3),
        ),
        Check("pending_units", i.pending_units < i.max_queue_size, i.pending_units),
    ]


ReadinessProbe = Callable[[], list[Check]]
MetricsRenderer = Callable[[], tuple[bytes, str]]  # (body, content type)


def _response(status: int, body: bytes, content_type: str) -> bytes:
    reason = {
        200: "OK",
        404: "Not Found",
        405: "Method Not Allowed",
        400: "Bad Request",
        503: "Service Unavailable",
    }.get(status, "OK")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        readiness: ReadinessProbe,
        metrics: MetricsRenderer | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._host = host
        self._port = port
        self._readiness = readiness
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self.max_connections = max_connections
        self.active = 0
        self.refused = 0
        self.evicted = 0  # silent connections closed to make room for a new one
        # Connections still waiting for their request header, oldest first.
        self._waiting: dict[int, asyncio.StreamWriter] = {}
        self._next_key = 0

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("Health endpoint listening", address=f"{self._host}:{self.port}")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def route(self, method: str, path: str) -> bytes:
        path = path.split("?", 1)[0]
        if method != "GET":
            return _response(405, b"method not allowed\n", "text/plain")
        if path == "/health/live":
            return _response(200, _LIVE, "application/json")
        if path == "/health/ready":
            checks = self._readiness()
            ok = all(c.ok for c in checks)
            body = {
                "status": "ready" if ok else "not_ready",
                "checks": {c.name: {"ok": c.ok, "value": c.value} for c in checks},
            }
            return _response(
                200 if ok else 503, json.dumps(body).encode() + b"\n", "application/json"
            )
        if path == "/metrics" and self._metrics is not None:
            body_bytes, ctype = self._metrics()
            return _response(200, body_bytes, ctype)
        return _response(404, b"not found\n", "text/plain")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.max_connections and not self._evict_silent():
            self.refused += 1
            await self._refuse(reader, writer)
            return
        self.active += 1
        key = self._next_key = self._next_key + 1
        self._waiting[key] = writer
        try:
            await self._serve(reader, writer, key)
        finally:
            self._waiting.pop(key, None)
            self.active -= 1

    def _evict_silent(self) -> bool:
        """Close the connection that has waited longest without sending a request."""
        if not self._waiting:
            return False
        oldest = next(iter(self._waiting))
        writer = self._waiting.pop(oldest)
        writer.transport.abort()
        self.evicted += 1
        return True

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Every slot is answering a request: 503 after at most a second of reading the
        request (closing a socket with unread input would reset it and lose the answer),
        except for liveness, which is answered: the process is alive."""
        head = b""
        with contextlib.suppress(Exception):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=REFUSE_READ_S)
        parts = head.split(b"\r\n", 1)[0].split()
        live = len(parts) == 3 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/health/live"
        try:
            if live:
                writer.write(_response(200, _LIVE, "application/json"))
            else:
                writer.write(_response(503, b"too many connections\n", "text/plain"))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: int
    ) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=REQUEST_TIMEOUT_S)
            self._waiting.pop(key, None)  # answering now: never evicted
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3:
                writer.write(_response(400, b"bad request\n", "text/plain"))
            else:
                writer.write(self.route(parts[0], parts[1]))
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ValueError,
            ConnectionError,
        ):
            pass
        except Exception:  # a probe must never take the daemon down
            log.exception("Health request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
