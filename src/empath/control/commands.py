"""The daemon side of every control command: one table, name → handler (SPEC §5).

Handlers read and steer the running daemon through :class:`Daemon` (what
``App`` offers them); each returns plain JSON data (or, for ``queue.list``,
yields chunks of rows) and raises :class:`~empath.control.server.CommandError`
for a failure the operator should see (exit 1).  To add a command, write a
handler and add one :class:`~empath.control.server.Command` to the table that
:func:`command_table` returns (``empathctl`` has a matching table).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import empath
from empath.config.model import Config
from empath.control import queue as q
from empath.control.protocol import ErrorCode, RequestError
from empath.control.server import Args, Command, CommandError
from empath.errors import UnknownMessageError
from empath.observability.stats import RunnerStats, Window
from empath.policy.breaker import BreakerState
from empath.policy.state import PolicyState
from empath.queue.runner import DeliveryRunner
from empath.queue.scheduler import Scheduler
from empath.spool.store import Spool
from empath.transport.listener import SmtpServerGroup

VIEW_HEAD_BYTES: Final = 64 * 1024  # headers shown by `queue view` come from this much
VIEW_PREVIEW_BYTES: Final = 2048


@dataclass(frozen=True, slots=True)
class ReloadRecord:
    """The last config reload (SIGHUP or `config reload`), for `system status`."""

    at: float  # wall clock
    ok: bool
    error: str = ""


class Daemon(Protocol):
    """What the control commands need from the running daemon (``App``)."""

    @property
    def config(self) -> Config: ...
    @property
    def spool(self) -> Spool: ...
    @property
    def scheduler(self) -> Scheduler: ...
    @property
    def runner(self) -> DeliveryRunner: ...
    @property
    def policy(self) -> PolicyState: ...
    @property
    def listeners(self) -> SmtpServerGroup: ...
    @property
    def runner_stats(self) -> RunnerStats: ...
    @property
    def started_at(self) -> float: ...
    @property
    def last_reload(self) -> ReloadRecord | None: ...

    def reload(self) -> str | None: ...


# --- argument helpers ----------------------------------------------------------


def _str(args: Args, name: str, *, required: bool = False) -> str | None:
    value = args.get(name)
    if value is None:
        if required:
            raise RequestError(ErrorCode.BAD_REQUEST, f"missing argument {name!r}")
        return None
    if not isinstance(value, str) or not value:
        raise RequestError(ErrorCode.BAD_REQUEST, f"argument {name!r} must be a non-empty string")
    return value


def _status(args: Args) -> str | None:
    status = _str(args, "status")
    if status is not None and status not in q.STATUSES:
        raise RequestError(
            ErrorCode.BAD_REQUEST, f"unknown status {status!r}; one of {', '.join(q.STATUSES)}"
        )
    return status


def _limit(args: Args) -> int | None:
    value = args.get("limit")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(ErrorCode.BAD_REQUEST, "argument 'limit' must be a positive integer")
    return value


def _bool(args: Args, name: str) -> bool:
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(ErrorCode.BAD_REQUEST, f"argument {name!r} must be true or false")
    return value


# --- handlers --------------------------------------------------------------------


class Handlers:
    """The handlers, bound to one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._window: Window | None = None  # delivered/failed over about rate_window_secs

    def _in_flight(self) -> set[tuple[str, str]]:
        return set(self.d.runner.in_flight_keys())

    # system

    async def ping(self, _args: Args) -> dict[str, Any]:
        return {"pong": True, "pid": os.getpid(), "version": empath.__version__}

    async def status(self, _args: Args) -> dict[str, Any]:
        d = self.d
        now = time.time()
        counts = await self._counts()
        cache = d.runner.router.cache
        lookups = cache.hits + cache.misses
        usage = d.spool.usage()
        breakers = d.policy.snapshot().breakers
        last = d.last_reload
        return {
            "version": empath.__version__,
            "pid": os.getpid(),
            "uptime_s": round(now - d.started_at, 3),
            "compiled": empath.NATIVE,
            "hostname": d.config.hostname,
            "listeners": [
                {"name": name, "active_sessions": st.connections_active}
                for name, st in d.listeners.stats.items()
            ],
            "queue": dict(counts.by_status),
            "messages": counts.messages,
            "in_flight": d.scheduler.in_flight,
            "dns_cache": {
                "entries": len(cache),
                "hits": cache.hits,
                "misses": cache.misses,
                "hit_rate": round(cache.hits / lookups, 4) if lookups else None,
            },
            "open_breakers": sorted(
                name for name, info in breakers.items() if info.state is not BreakerState.CLOSED
            ),
            "spool": {
                "path": d.config.spool.path,
                "type": d.config.spool.type,
                "free_bytes": usage.free_bytes,
                "size_bytes": usage.size_bytes,
            },
            "config": {
                "file": d.config.source_path,
                "last_reload_at": last.at if last else None,
                "last_reload_ok": last.ok if last else None,
                "last_reload_error": last.error if last else None,
            },
        }

    # queue

    async def _counts(self) -> q.QueueCounts:
        counts = q.new_counts()
        in_flight = self._in_flight()
        batch: list[Any] = []
        for msg in self.d.spool.messages():
            batch.append(msg)
            if len(batch) >= q.SCAN_CHUNK:
                q.count_messages(counts, batch, in_flight)
                batch.clear()
                await asyncio.sleep(0)
        q.count_messages(counts, batch, in_flight)
        return counts

    async def queue_list(self, args: Args) -> AsyncIterator[list[q.Row]]:
        flt = q.ListFilter(_status(args), _str(args, "domain"), _limit(args))
        rows = q.list_rows(self.d.spool.messages(), flt, time.time(), self._in_flight())
        for chunk in rows:
            yield chunk

    async def queue_stats(self, _args: Args) -> dict[str, Any]:
        now = time.time()
        counts = await self._counts()
        window_s = self.d.config.metrics.rate_window_secs
        if self._window is None or self._window.window_s != window_s:
            self._window = Window(window_s, self.d.runner.clock.monotonic(), 2)
        st = self.d.runner_stats
        delivered, failed = self._window.delta(
            self.d.runner.clock.monotonic(), (st.units_delivered, st.attempts_failed)
        )
        return {
            "by_status": dict(counts.by_status),
            "messages": counts.messages,
            "top_domains": counts.domains.most_common(q.TOP_DOMAINS),
            "oldest_id": counts.oldest_id,
            "oldest_age_s": None if counts.oldest_at is None else round(now - counts.oldest_at, 3),
            "in_flight": self.d.scheduler.in_flight,
            "window_s": window_s,
            "delivered_in_window": delivered,
            "failed_attempts_in_window": failed,
            "delivered_per_min": round(delivered * 60.0 / window_s, 2),
            "failed_per_min": round(failed * 60.0 / window_s, 2),
        }

    def _message(self, args: Args) -> Any:
        msg_id = _str(args, "id", required=True)
        assert msg_id is not None
        try:
            return self.d.spool.get(msg_id)
        except UnknownMessageError:
            raise CommandError(ErrorCode.NOT_FOUND, f"no message {msg_id} in the queue") from None

    async def queue_view(self, args: Args) -> dict[str, Any]:
        msg = self._message(args)
        data = q.view(msg, self._in_flight(), time.time())
        head = b""
        try:
            async for chunk in self.d.spool.iter_body(msg.id):
                head += chunk
                if len(head) >= VIEW_HEAD_BYTES:
                    break
        except (OSError, UnknownMessageError) as exc:
            data["body_error"] = str(exc)
        headers, preview, truncated = q.split_preview(head[:VIEW_HEAD_BYTES], VIEW_PREVIEW_BYTES)
        data["headers"] = headers
        data["body_preview"] = preview
        data["body_truncated"] = truncated or msg.envelope.size > len(head)
        return data


def command_table(daemon: Daemon) -> Mapping[str, Command]:
    """Every control command, by wire name."""
    h = Handlers(daemon)
    entries: list[tuple[str, Callable[[Args], Any], bool]] = [
        ("system.ping", h.ping, False),
        ("system.status", h.status, False),
        ("queue.list", h.queue_list, True),
        ("queue.stats", h.queue_stats, False),
        ("queue.view", h.queue_view, False),
    ]
    table: dict[str, Command] = {}
    for name, fn, streaming in entries:
        table[name] = Command(name, stream=fn) if streaming else Command(name, unary=fn)
    return table
