"""The daemon side of every control command: one table, name → handler (DESIGN §5).

Handlers read and steer the running daemon through :class:`Daemon` (what
``App`` offers them); each returns plain JSON data (or, for ``queue.list``,
yields chunks of rows) and raises :class:`~empath.control.server.CommandError`
for a failure the operator should see (exit 1).  To add a command, write a
handler and add one :class:`~empath.control.server.Command` to the table that
:func:`command_table` returns (``empathctl`` has a matching table).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import empath
from empath.compiled import compiled_modules
from empath.config.reload import config_changes
from empath.control import queue as q
from empath.control.ops import OpsDaemon, OpsHandlers
from empath.control.ops import entries as ops_table
from empath.control.output import list_line_items
from empath.control.protocol import ErrorCode, RequestError
from empath.control.server import Args, Command, CommandError
from empath.dkim.service import DkimService
from empath.dns.cache import CacheEntryInfo
from empath.dns.resolver import normalize_name
from empath.errors import ConfigError, DeliveryError, UnknownMessageError
from empath.modules.host import ModuleHost
from empath.observability.health import MAX_HEARTBEAT_AGE_S
from empath.policy.breaker import BreakerState
from empath.spool.model import UnitState, UnitStatus
from empath.stats import RunnerStats, Window
from empath.transport.admission import per_ip_key
from empath.transport.listener import SmtpServerGroup

if TYPE_CHECKING:
    from empath.submission.authenticator import Authenticator

VIEW_HEAD_BYTES: Final = 64 * 1024  # headers shown by `queue view` come from this much
VIEW_PREVIEW_BYTES: Final = 2048


@dataclass(frozen=True, slots=True)
class ReloadRecord:
    """The last config reload (SIGHUP or `config reload`), for `system status`."""

    at: float  # wall clock
    ok: bool
    error: str = ""
    changes: tuple[str, ...] = ()  # what it applied (config_changes lines)


class Daemon(OpsDaemon, Protocol):
    """What the control commands need from the running daemon (``App``): the incident
    controls' needs (config, spool, scheduler, runner, policy, ...) and these."""

    @property
    def listeners(self) -> SmtpServerGroup: ...
    @property
    def runner_stats(self) -> RunnerStats: ...
    @property
    def started_at(self) -> float: ...
    @property
    def last_reload(self) -> ReloadRecord | None: ...
    @property
    def pending_restart(self) -> tuple[str, ...]: ...
    def dns_recent(self) -> tuple[float, int, int]: ...

    @property
    def modules(self) -> ModuleHost: ...
    @property
    def authenticators(self) -> Mapping[str, Authenticator]: ...

    @property
    def dkim(self) -> DkimService: ...

    def reload(self) -> str | None: ...
    async def cluster_status(self) -> dict[str, Any] | None: ...


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


def _list_format(args: Args) -> str:
    """``rows`` (the default: one JSON array per unit, see control/queue.py) or ``lines``
    (the plain `queue list` lines, rendered here: what the CLI prints as it comes)."""
    fmt = _str(args, "format") or "rows"
    if fmt not in ("rows", "lines"):
        raise RequestError(ErrorCode.BAD_REQUEST, "argument 'format' must be rows or lines")
    return fmt


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
        self.ops: OpsHandlers | None = None  # the incident controls (control/ops.py)

    def _in_flight(self) -> set[tuple[str, str]]:
        return set(self.d.runner.in_flight_keys())

    # system

    async def ping(self, _args: Args) -> dict[str, Any]:
        return {"pong": True, "pid": os.getpid(), "version": empath.__version__}

    async def status(self, _args: Args) -> dict[str, Any]:
        d = self.d
        now = time.time()
        counts = self._counts()
        cache = d.runner.router.cache
        lookups = cache.hits + cache.misses
        dns_window_s, window_hits, window_misses = d.dns_recent()
        window_lookups = window_hits + window_misses
        heartbeat_age = d.runner.heartbeat_age_s()
        usage = d.spool.usage()
        breakers = d.policy.snapshot().breakers
        last = d.last_reload
        cluster = await d.cluster_status()
        return {
            "version": empath.__version__,
            "pid": os.getpid(),
            "uptime_s": round(now - d.started_at, 3),
            "compiled": bool(compiled_modules()),
            "hostname": d.config.hostname,
            "listeners": [
                {"name": name, "active_sessions": st.connections_active}
                for name, st in d.listeners.stats.items()
            ],
            "queue": dict(counts.by_status),
            "messages": counts.messages,
            "in_flight": d.scheduler.in_flight,
            "scheduler": {
                "heartbeat_age_s": round(heartbeat_age, 3),
                "heartbeat_ok": heartbeat_age <= MAX_HEARTBEAT_AGE_S,
            },
            "dns_cache": {
                "entries": len(cache),
                # over the last window_s (what DnsCacheHitRateLow judges) ...
                "window_s": round(dns_window_s, 3),
                "window_hits": window_hits,
                "window_misses": window_misses,
                "window_hit_rate": (
                    round(window_hits / window_lookups, 4) if window_lookups else None
                ),
                # ... and since the daemon started
                "hits": cache.hits,
                "misses": cache.misses,
                "hit_rate": round(cache.hits / lookups, 4) if lookups else None,
            },
            "open_breakers": sorted(
                name for name, info in breakers.items() if info.state is not BreakerState.CLOSED
            ),
            "suspended": self._suspended(),
            "spool": {
                "path": d.config.spool.path,
                "type": d.config.spool.type,
                "free_bytes": usage.free_bytes,
                "size_bytes": usage.size_bytes,
                "reclaimable_bytes": usage.reclaimable_bytes,
                "reserve_bytes": usage.reserve_bytes,
                "reserve_released": usage.reserve_released,
            },
            "cluster": cluster,
            "modules": d.modules.status(),
            "config": {
                "file": d.config.source_path,
                "last_reload_at": last.at if last else None,
                "last_reload_ok": last.ok if last else None,
                "last_reload_error": last.error if last else None,
                "restart_pending": list(d.pending_restart),
            },
        }

    # cluster

    async def cluster_status(self, _args: Args) -> dict[str, Any]:
        data = await self.d.cluster_status()
        return {"enabled": False} if data is None else {"enabled": True, **data}

    # queue

    def _counts(self) -> q.QueueCounts:
        """From the counts the spool's index keeps (no scan of the queue)."""
        counts = q.index_counts(self.d.spool.index)
        q.count_in_flight(counts, self._in_flight(), self.d.spool.index.view)
        return counts

    async def queue_list(self, args: Args) -> AsyncIterator[list[Any]]:
        flt = q.ListFilter(_status(args), _str(args, "domain"), _limit(args))
        lines = _list_format(args) == "lines"
        rows = q.list_rows(self.d.spool.views(), flt, time.time(), self._in_flight())
        for chunk in rows:
            yield list_line_items(chunk) if lines and chunk else chunk

    async def queue_stats(self, _args: Args) -> dict[str, Any]:
        now = time.time()
        counts = self._counts()
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
            "top_domains": [[d, n] for d, n in counts.domains.most_common(q.TOP_DOMAINS) if n > 0],
            "oldest_id": counts.oldest_id,
            "oldest_age_s": None if counts.oldest_at is None else round(now - counts.oldest_at, 3),
            "in_flight": self.d.scheduler.in_flight,
            "window_s": window_s,
            "delivered_in_window": delivered,
            "failed_attempts_in_window": failed,
            "delivered_per_min": round(delivered * 60.0 / window_s, 2),
            "failed_per_min": round(failed * 60.0 / window_s, 2),
            "suspended": self._suspended(),
        }

    def _suspended(self) -> list[dict[str, Any]]:
        sus = getattr(self.d, "suspensions", None)
        return [] if sus is None else [s.to_json() for s in sus.active().values()]

    def _message(self, args: Args) -> Any:
        msg_id = _str(args, "id", required=True)
        assert msg_id is not None
        try:
            return self.d.spool.get(msg_id)
        except UnknownMessageError:
            raise CommandError(ErrorCode.NOT_FOUND, f"no message {msg_id} in the queue") from None

    # SMTP AUTH users (DESIGN §13): the file is edited by empathctl itself; the daemon
    # knows the runtime side (last login, failures, blocks).

    async def user_status(self, _args: Args) -> dict[str, Any]:
        users: dict[str, dict[str, object]] = {}
        blocked: dict[str, float] = {}
        for path, auth in self.d.authenticators.items():
            for row in auth.status():
                users[str(row["user"])] = {**row, "users_file": path}
            for ip, left in (await auth.blocked_everywhere()).items():
                blocked[ip] = round(max(blocked.get(ip, 0.0), left), 1)
        return {"users": list(users.values()), "blocked_ips": blocked}

    async def user_unblock(self, args: Args) -> dict[str, Any]:
        key = _str(args, "key", required=True)
        assert key is not None
        keys = {key, per_ip_key(key)}  # an IPv6 address is blocked by its /64
        hit = False
        for auth in self.d.authenticators.values():
            for k in keys:
                hit = auth.unblock(k) or hit
                hit = await auth.unblock_shared(k) or hit  # cluster mode: in Redis too
        if not hit:
            raise CommandError(ErrorCode.NOT_FOUND, f"{key} is neither blocked nor slowed down")
        return {"unblocked": key}

    async def queue_view(self, args: Args) -> dict[str, Any]:
        msg = self._message(args)
        data = q.view(msg, self._in_flight(), time.time())
        if self.ops is not None:
            why = self.ops.why(msg)
            for unit in data["units"]:
                unit["waiting_for"] = why.get(unit["domain"], [])
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

    async def queue_retry(self, args: Args) -> dict[str, Any]:
        msg_id = _str(args, "id")
        status = _status(args)
        domain = _str(args, "domain")
        if (msg_id is None) == (status is None):
            raise RequestError(ErrorCode.BAD_REQUEST, "give either 'id' or 'status'")
        if msg_id is not None:
            msg = self._message(args)
            targets = {
                msg.id: [u.domain for u in msg.units if u.status is not UnitStatus.DELIVERED]
            }
        else:
            targets = await self._select(status, domain)
        # Reopen failed/expired units first: persisted before they are scheduled (the
        # last write durable, so every earlier one in the log is too).
        now = time.time()
        reopened: list[tuple[str, tuple[UnitState, ...]]] = []
        for mid, domains in targets.items():
            try:
                current = self.d.spool.get(mid)
            except UnknownMessageError:
                continue
            if any(u.status.terminal and u.domain in domains for u in current.units):
                units = tuple(
                    q.reopen(u, now) if u.domain in domains and u.status in _REOPENABLE else u
                    for u in current.units
                )
                reopened.append((mid, units))
        for i, (mid, units) in enumerate(reopened):
            with contextlib.suppress(UnknownMessageError):
                await self.d.spool.update(mid, units, durable=i == len(reopened) - 1)
        count = 0
        made_due: list[tuple[str, UnitState]] = []
        for mid, domains in targets.items():
            with contextlib.suppress(UnknownMessageError):
                count += self.d.runner.retry_now(mid, domains)
                made_due += [(mid, u) for u in self.d.spool.get(mid).units if u.domain in domains]
        out: dict[str, Any] = {"units": count, "reopened": len(reopened)}
        if self.ops is not None:
            out.update(self.ops.attempt_report(made_due))
        if msg_id is not None:
            self.d.runner.journal.record(msg_id, "operator", action="retry")
        return out

    async def _select(self, status: str | None, domain: str | None) -> dict[str, list[str]]:
        """Message id → domains of the units with ``status`` (and ``domain``)."""
        out: dict[str, list[str]] = {}
        flt = q.ListFilter(status, domain)
        for chunk in q.list_rows(self.d.spool.views(), flt, time.time(), self._in_flight()):
            for r in chunk:
                out.setdefault(r[0], []).append(r[1])
            await asyncio.sleep(0)
        return out

    async def queue_delete(self, args: Args) -> dict[str, Any]:
        if args.get("id") is None and self.ops is not None:
            return await self.ops.queue_bulk_delete(args)  # by filter
        msg = self._message(args)
        bounce = _bool(args, "bounce")
        try:
            done = await self.d.runner.delete(msg.id, bounce=bounce)
        except UnknownMessageError:
            raise CommandError(ErrorCode.NOT_FOUND, f"no message {msg.id} in the queue") from None
        return {
            "id": msg.id,
            "dsn_id": done.dsn_id,
            "dsn_to": msg.envelope.sender if done.dsn_id else None,
            # recipients a delivery attempt in flight delivered first (never bounced)
            "delivered": list(done.delivered),
            "already_delivered": done.gone,  # nothing was left to delete
            "pending": done.pending,  # still being delivered: deleted when the attempt ends
        }

    async def queue_process_now(self, _args: Args) -> dict[str, Any]:
        units = self.d.runner.process_now()
        out: dict[str, Any] = {"units": units}
        if self.ops is not None:
            out.update(
                self.ops.attempt_report((m.id, u) for m in self.d.spool.views() for u in m.units)
            )
        return out

    # dns

    async def dns_list_cache(self, _args: Args) -> dict[str, Any]:
        entries = self.d.runner.router.cache.entries()
        return {"entries": [_entry_json(e) for e in entries], "lines": [e.line() for e in entries]}

    async def dns_clear_cache(self, _args: Args) -> dict[str, Any]:
        return {"entries": self.d.runner.router.cache.clear()}

    async def dns_refresh(self, args: Args) -> dict[str, Any]:
        domain = _str(args, "domain", required=True)
        assert domain is not None
        cache = self.d.runner.router.cache
        try:
            resolution = await cache.refresh(domain)
        except DeliveryError as exc:
            raise CommandError(ErrorCode.FAILED, f"{domain}: {exc}") from None
        name = normalize_name(domain)
        entries = [e for e in cache.entries() if e.name == name]
        lines = [e.line() for e in entries] or [
            f"{name} MX {x.preference} {x.host} [{','.join(x.addresses)}]"
            for x in resolution.exchangers
        ]
        return {"domain": name, "entries": [_entry_json(e) for e in entries], "lines": lines}

    # config

    async def config_reload(self, _args: Args) -> dict[str, Any]:
        error = self.d.reload()
        if error is not None:
            raise CommandError(ErrorCode.FAILED, f"reload failed, old config kept: {error}")
        last = self.d.last_reload
        pending = self.d.pending_restart
        return {
            "file": self.d.config.source_path,
            "changes": list(last.changes) if last else [],
            "pending_restart": list(pending),
            "need_restart": [line.split(":", 1)[0] for line in pending],
        }

    async def config_check(self, _args: Args) -> dict[str, Any]:
        from empath.config.load import load_config

        path = self.d.config.source_path
        if path is None:
            raise CommandError(ErrorCode.FAILED, "the running config was not loaded from a file")
        try:
            new = load_config(path)
            self.d.dkim.prepare(new)  # the DKIM key files, as a reload would load them
        except ConfigError as exc:
            raise CommandError(ErrorCode.FAILED, str(exc)) from None
        changes, restart = config_changes(self.d.config, new)
        return {"file": path, "ok": True, "changes": changes, "need_restart": restart}


_REOPENABLE: Final = frozenset({UnitStatus.FAILED, UnitStatus.EXPIRED})


def _entry_json(e: CacheEntryInfo) -> dict[str, Any]:
    return {
        "name": e.name,
        "kind": e.kind.value,
        "ttl_remaining_s": round(e.ttl_remaining_s, 3),
        "negative": e.negative,
        "error": e.error,
        "exchangers": [
            {"preference": x.preference, "host": x.host, "addresses": list(x.addresses)}
            for x in e.exchangers
        ],
    }


def command_table(daemon: Daemon) -> Mapping[str, Command]:
    """Every control command, by wire name."""
    h = Handlers(daemon)
    h.ops, ops_entries = ops_table(daemon)
    entries: list[tuple[str, Callable[[Args], Any], bool]] = [
        ("system.ping", h.ping, False),
        ("system.status", h.status, False),
        ("cluster.status", h.cluster_status, False),
        ("queue.list", h.queue_list, True),
        ("queue.stats", h.queue_stats, False),
        ("queue.view", h.queue_view, False),
        ("queue.retry", h.queue_retry, False),
        ("queue.delete", h.queue_delete, False),
        ("queue.process-now", h.queue_process_now, False),
        ("dns.list-cache", h.dns_list_cache, False),
        ("dns.clear-cache", h.dns_clear_cache, False),
        ("dns.refresh", h.dns_refresh, False),
        ("config.reload", h.config_reload, False),
        ("config.check", h.config_check, False),
        ("user.status", h.user_status, False),
        ("user.unblock", h.user_unblock, False),
        *ops_entries,
    ]
    from empath.control.dkim import dkim_entries

    entries += dkim_entries(daemon)
    table: dict[str, Command] = {}
    for name, fn, streaming in entries:
        table[name] = Command(name, stream=fn) if streaming else Command(name, unary=fn)
    return table
