"""The daemon side of the incident controls (issue 15): breakers, hold/release,
suspend/resume, bulk delete/bounce, `queue summary`, `message log`, `queue view --body`,
`spool status|compact`.

Each handler reads the running daemon through :class:`OpsDaemon` and returns plain
JSON data; the views themselves are the pure functions of
:mod:`empath.control.select`.  Bulk commands act on the units a
:class:`~empath.control.select.UnitFilter` selects (or on one message id); with
``dry_run`` they only count, which is what `empathctl` shows before it asks.
Every command is audit-logged by the control server, as all are.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import heapq
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Protocol

from empath.config.model import Config
from empath.control import select as sel
from empath.control.protocol import ErrorCode, RequestError
from empath.control.server import Args, CommandError
from empath.errors import UnknownMessageError
from empath.policy.breaker import BreakerInfo, BreakerState, CircuitBreaker
from empath.policy.state import PolicyState
from empath.queue.runner import DeliveryRunner
from empath.queue.scheduler import Scheduler
from empath.queue.suspend import Suspensions
from empath.spool.index import MessageView
from empath.spool.model import MessageState, UnitStatus
from empath.spool.store import Spool

BATCH: Final = 256  # messages changed concurrently by a bulk command (one group commit)
BODY_CHUNK: Final = 65536
SCAN_MESSAGES: Final = 2000  # messages looked at between yields to the event loop
ROWS: Final = 2000  # breaker rows built between yields
DUTY: Final = 0.05  # share of the event loop a view may take while SMTP sessions are open


MAX_PAUSE_S: Final = 0.5  # longest single pause (the view must end well within its timeout)


class Breather:
    """Yield to the event loop between chunks of a long view; while mail flows (an SMTP
    session is open) sleep so the view takes at most :data:`DUTY` of the loop, as a
    streamed `queue list` does (ingest first, the operator's answer a little later).
    The chunk's cost is the loop thread's CPU time, not wall time: on a loaded machine
    wall time would overstate it and stretch the pauses past the request timeout."""

    def __init__(
        self,
        busy: Callable[[], bool],
        sleep: Callable[[float], Awaitable[None]],
        cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self._busy = busy
        self._sleep = sleep  # the daemon clock's (every wait goes through the Clock)
        self._cpu = cpu
        self._t0 = cpu()

    async def __call__(self) -> None:
        spent = self._cpu() - self._t0
        pause = min(MAX_PAUSE_S, spent * (1.0 - DUTY) / DUTY) if self._busy() else 0.0
        await self._sleep(pause)
        self._t0 = self._cpu()


_ACTIONS: Final = ("hold", "release", "delete", "bounce")


class BreakerLookup(Mapping[str, BreakerInfo]):
    """The local breaker's entries one domain at a time (a summary shows 50 domains of
    perhaps 10,000 with a breaker); iterating takes the full snapshot."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._all: dict[str, BreakerInfo] | None = None

    def __getitem__(self, domain: str) -> BreakerInfo:
        info = self._breaker.info(domain)
        if info is None:
            raise KeyError(domain)
        return info

    def _snapshot(self) -> dict[str, BreakerInfo]:
        if self._all is None:
            self._all = self._breaker.snapshot()
        return self._all

    def __iter__(self) -> Iterator[str]:
        return iter(self._snapshot())

    def __len__(self) -> int:
        return len(self._snapshot())


class OpsDaemon(Protocol):
    """What these handlers need from ``App``."""

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
    def suspensions(self) -> Suspensions: ...
    @property
    def last_compaction(self) -> tuple[float, int] | None: ...

    async def compact_now(self, *, include_active: bool = False) -> int: ...
    def smtp_busy(self) -> bool: ...


# --- arguments -------------------------------------------------------------------------


def _str(args: Args, name: str, *, required: bool = False) -> str | None:
    value = args.get(name)
    if value is None:
        if required:
            raise RequestError(ErrorCode.BAD_REQUEST, f"missing argument {name!r}")
        return None
    if not isinstance(value, str) or not value:
        raise RequestError(ErrorCode.BAD_REQUEST, f"argument {name!r} must be a non-empty string")
    return value


def _num(args: Args, name: str) -> float | None:
    value = args.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise RequestError(ErrorCode.BAD_REQUEST, f"argument {name!r} must be a positive number")
    return float(value)


def _domain(args: Args) -> str:
    domain = _str(args, "domain", required=True)
    assert domain is not None
    if any(c.isspace() or c in ",;<>\"'" for c in domain) or len(domain) > 253:
        raise RequestError(ErrorCode.BAD_REQUEST, f"not a domain: {domain!r}")
    return domain.lower().rstrip(".")


def _limit(args: Args) -> int | None:
    limit = args.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise RequestError(ErrorCode.BAD_REQUEST, "argument 'limit' must be a positive integer")
    return limit


def unit_filter(args: Args) -> sel.UnitFilter:
    status = _str(args, "status")
    statuses = tuple(s.value for s in UnitStatus)
    if status is not None and status not in statuses:
        raise RequestError(
            ErrorCode.BAD_REQUEST, f"unknown status {status!r}; one of {', '.join(statuses)}"
        )
    domain = _str(args, "domain")
    return sel.UnitFilter(
        domain=domain.lower() if domain else None,
        sender=args.get("sender") if isinstance(args.get("sender"), str) else None,
        status=status,
        older_than_s=_num(args, "older_than_s"),
    )


# --- handlers ----------------------------------------------------------------------------


class OpsHandlers:
    def __init__(self, daemon: OpsDaemon) -> None:
        self.d = daemon

    def _in_flight(self) -> set[tuple[str, str]]:
        return set(self.d.runner.in_flight_keys())

    def context(self, *, full_breakers: bool = False) -> sel.WaitContext:
        d = self.d
        policy = d.policy
        limiter = getattr(policy, "limiter", None)
        limit_for: Callable[[str], Any] = (
            limiter.limit_for if limiter is not None else policy.limit_for  # type: ignore[attr-defined]
        )

        def tokens(domain: str) -> float | None:
            return None if limiter is None else float(limiter.tokens(domain))

        local = getattr(policy, "breaker", None)  # the cluster's mirror has no look-up
        breakers: Mapping[str, BreakerInfo] = (
            BreakerLookup(local)
            if isinstance(local, CircuitBreaker) and not full_breakers
            else policy.snapshot().breakers
        )

        return sel.WaitContext(
            now=time.time(),
            mono=d.runner.clock.monotonic(),
            in_flight=self._in_flight(),
            suspensions=d.suspensions.active(),
            breakers=breakers,
            blocked=d.scheduler.blocked,
            limit_for=limit_for,
            tokens=tokens,
            connections=policy.connections,
            max_connections=lambda dom: d.runner.settings.domain_policy(dom).max_connections,
        )

    # breakers

    async def breaker_list(self, args: Args) -> dict[str, Any]:
        """Breakers that are open, half-open or counting failures: half-open first, then
        open, then closed ones with failures, by domain; at most ``limit`` rows (every
        one without), ``count`` says how many there are; ``domain`` picks one."""
        limit = _limit(args)
        only = _domain(args) if args.get("domain") is not None else None
        local = getattr(self.d.policy, "breaker", None)
        ctx = self.context(full_breakers=not isinstance(local, CircuitBreaker))
        activity = self.d.runner.activity
        breakers = ctx.breakers
        if only is not None:
            breakers = {only: breakers[only]} if only in breakers else {}
        if only is None and isinstance(local, CircuitBreaker):
            keys = local.noteworthy()  # ranks without a BreakerInfo for every domain
        else:
            closed, half_open = BreakerState.CLOSED, BreakerState.HALF_OPEN
            keys = [  # identity tests and plain tuples: 10,000 breakers sort in a few ms
                (0 if st is half_open else 1 if st is not closed else 2, domain)
                for domain, info in breakers.items()
                if (st := info.state) is not closed or info.failures
            ]
        top = sorted(keys) if limit is None else heapq.nsmallest(limit, keys)
        breathe = Breather(self.d.smtp_busy, self.d.runner.clock.sleep)
        rows: list[dict[str, Any]] = []
        for i, (_rank, domain) in enumerate(top):
            info = breakers[domain]
            if i % ROWS == ROWS - 1:
                await breathe()
            rows.append(
                {
                    "domain": domain,
                    "state": info.state.value,
                    "since": None if info.since is None else ctx.wall(info.since),
                    "reopens_at": None if info.open_until is None else ctx.wall(info.open_until),
                    "failures": info.failures,
                    "trips_total": info.trips_total,
                    "last_error": activity.last_error(domain),
                }
            )
        return {
            "breakers": rows,
            "count": len(keys),
            "clustered": self.d.config.cluster is not None,
        }

    async def breaker_reset(self, args: Args) -> dict[str, Any]:
        domain = _domain(args)
        was = await self._shared(self.d.policy.breaker_reset(domain))
        self.d.runner.wake(domain)
        return {"domain": domain, "was": was.value, "state": "Closed"}

    async def breaker_probe(self, args: Args) -> dict[str, Any]:
        domain = _domain(args)
        was = await self._shared(self.d.policy.breaker_probe(domain))
        self.d.runner.wake(domain)
        return {"domain": domain, "was": was.value, "probing": was.value == "Open"}

    @staticmethod
    async def _shared(aw: Any) -> Any:
        from empath.cluster.backend import RedisUnavailableError

        try:
            return await aw
        except RedisUnavailableError as exc:
            raise CommandError(ErrorCode.FAILED, f"Redis unreachable: {exc}") from None

    # suspend / resume

    async def queue_suspend(self, args: Args) -> dict[str, Any]:
        domain = _domain(args)
        for_s = _num(args, "for_s")
        reason = args.get("reason") if isinstance(args.get("reason"), str) else ""
        s = self.d.suspensions.suspend(domain, for_s, str(reason)[:200])
        shared = await self._publish(domain, s.to_json())
        self.d.runner.wake(domain)
        return {**s.to_json(), "cluster": shared}

    async def queue_resume(self, args: Args) -> dict[str, Any]:
        domain = _domain(args)
        s = self.d.suspensions.resume(domain)
        shared = await self._publish(domain, None)
        self.d.runner.wake(domain)
        return {"domain": domain, "was_suspended": s is not None, "cluster": shared}

    async def _publish(self, domain: str, record: dict[str, Any] | None) -> bool:
        """Write the suspension to Redis for the other nodes; False without a cluster."""
        backend = getattr(self.d.policy, "backend", None)
        if backend is None:
            return False
        import json

        await self._shared(
            backend.write_suspended(domain, None if record is None else json.dumps(record))
        )
        return True

    # hold / release / delete / bounce

    def _targets(self, args: Args, action: str) -> tuple[list[tuple[MessageView, list[str]]], str]:
        msg_id = _str(args, "id")
        flt = unit_filter(args)
        if (msg_id is None) == flt.empty:
            raise RequestError(ErrorCode.BAD_REQUEST, "give either 'id' or a filter")
        if msg_id is not None:
            try:
                msg = self.d.spool.get(msg_id)
            except UnknownMessageError:
                raise CommandError(
                    ErrorCode.NOT_FOUND, f"no message {msg_id} in the queue"
                ) from None
            if action == "release":
                domains = [u.domain for u in msg.units if u.status is UnitStatus.HELD]
            elif action == "hold":
                domains = [u.domain for u in msg.units if not u.status.terminal]
            else:
                domains = [u.domain for u in msg.units]
            return [(msg, domains)], f"message {msg_id}"
        if action == "release" and flt.status not in (None, "held"):
            raise RequestError(ErrorCode.BAD_REQUEST, "release acts on held units only")
        if action == "release":
            flt = sel.UnitFilter(flt.domain, flt.sender, "held", flt.older_than_s)
        now = time.time()
        picked = list(sel.select(self.d.spool.views(), flt, now, self._in_flight()))
        if action == "hold":
            picked = _only(
                picked, lambda u: not u.status.terminal and u.status is not UnitStatus.HELD
            )
        return picked, flt.describe()

    async def bulk(self, args: Args, action: str) -> dict[str, Any]:
        picked, what = self._targets(args, action)
        units = sum(len(domains) for _m, domains in picked)
        out: dict[str, Any] = {"action": action, "filter": what, "messages": len(picked)}
        if args.get("dry_run") is True:
            return {**out, "units": units, "dry_run": True}
        runner = self.d.runner
        restart = args.get("restart_expiry") is True
        done = 0
        dsns = 0
        for i in range(0, len(picked), BATCH):
            batch = picked[i : i + BATCH]
            last = i + BATCH >= len(picked)

            async def one(msg: MessageView, domains: list[str], durable: bool) -> int:
                nonlocal dsns
                with contextlib.suppress(UnknownMessageError):
                    if action == "hold":
                        return len(await runner.hold(msg.id, domains, durable=durable))
                    if action == "release":
                        return len(
                            await runner.release(
                                msg.id, domains, durable=durable, restart_expiry=restart
                            )
                        )
                    dsn = await runner.delete_units(
                        msg.id, domains, bounce=action == "bounce", durable=durable
                    )
                    dsns += dsn is not None
                    return len(domains)
                return 0

            results = await asyncio.gather(
                *(one(m, ds, last and j == len(batch) - 1) for j, (m, ds) in enumerate(batch))
            )
            done += sum(results)
        return {**out, "units": done, "dsns": dsns}

    async def queue_hold(self, args: Args) -> dict[str, Any]:
        return await self.bulk(args, "hold")

    async def queue_release(self, args: Args) -> dict[str, Any]:
        return await self.bulk(args, "release")

    async def queue_bulk_delete(self, args: Args) -> dict[str, Any]:
        return await self.bulk(args, "bounce" if args.get("bounce") is True else "delete")

    # retry / process-now: what will really happen

    def attempt_report(self, units: Iterable[tuple[str, Any]]) -> dict[str, Any]:
        sch = self.d.scheduler
        free = max(0, sch.max_concurrent_deliveries - sch.in_flight)
        now_n, stay = sel.attempt_counts(units, self.context(), free)
        return {"attempted_now": now_n, "waiting": stay}

    # views

    async def queue_summary(self, args: Args) -> dict[str, Any]:
        limit = _limit(args)
        ctx = self.context()
        index = self.d.spool.index
        domains = index.domains()
        got = sel.shapes(
            domains,
            ctx.now,
            self._in_flight(),
            index.view,
            limit,
            status_counts=index.status_counts(),
            minutes=index.minutes(),
        )
        listed = sel.shown(got.ranked, domains, ctx.suspensions, limit)
        delivered = self.d.runner.activity.per_domain(ctx.mono)
        breathe = Breather(self.d.smtp_busy, self.d.runner.clock.sleep)
        rows: list[dict[str, Any]] = []
        for i in range(0, len(listed), ROWS):  # `--all`: thousands of rows, in slices
            if i:
                await breathe()
            rows += sel.summary_rows(listed[i : i + ROWS], ctx, delivered)
        return {
            "domains": rows,
            "domain_count": got.domain_count,
            "units": got.total[0],
            "total": {
                "by_status": dict(zip(sel.SUMMARY_STATUSES[:4], got.total[1:5], strict=True)),
                "ages": got.total[5:],
            },
            "age_buckets": list(sel.AGE_LABELS),
        }

    def why(self, msg: MessageState) -> dict[str, list[dict[str, Any]]]:
        ctx = self.context()
        return {u.domain: [r.to_json() for r in sel.waiting_for(msg.id, u, ctx)] for u in msg.units}

    async def message_log(self, args: Args) -> dict[str, Any]:
        from empath.control.history import message_story

        msg_id = _str(args, "id", required=True)
        assert msg_id is not None
        try:
            live: MessageState | None = self.d.spool.get(msg_id)
        except UnknownMessageError:
            live = None
        events = self.d.runner.journal.lookup(msg_id)
        if live is None and not events:
            raise CommandError(
                ErrorCode.NOT_FOUND,
                f"no message {msg_id} in the queue or in its history "
                f"(kept {self.d.config.delivery.failed_retention_secs:g}s after it leaves)",
            )
        return message_story(msg_id, live, events)

    async def queue_body(self, args: Args) -> AsyncIterator[list[Any]]:
        msg_id = _str(args, "id", required=True)
        assert msg_id is not None
        try:
            self.d.spool.get(msg_id)
        except UnknownMessageError:
            raise CommandError(ErrorCode.NOT_FOUND, f"no message {msg_id} in the queue") from None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        async for chunk in self.d.spool.iter_body(msg_id, BODY_CHUNK):
            yield [decoder.decode(chunk)]
        tail = decoder.decode(b"", final=True)
        if tail:
            yield [tail]

    # spool

    async def spool_status(self, _args: Args) -> dict[str, Any]:
        d = self.d
        usage = d.spool.usage()
        stats_fn = getattr(d.spool, "segment_stats", None)
        segments = [
            {"name": n, "bytes": size, "live_bytes": live, "live_messages": msgs}
            for n, size, live, msgs in (stats_fn() if stats_fn is not None else [])
        ]
        log_bytes = sum(s["bytes"] for s in segments)
        live_bytes = sum(s["live_bytes"] for s in segments)
        last = d.last_compaction
        return {
            "path": d.config.spool.path,
            "type": d.config.spool.type,
            "segments": segments,
            "log_bytes": log_bytes,
            "live_bytes": live_bytes,
            "reclaimable_bytes": usage.reclaimable_bytes,
            "reserve_bytes": usage.reserve_bytes,
            "reserve_in_use": usage.reserve_released,
            "size_bytes": usage.size_bytes,
            "preformatted_bytes": usage.preformatted_bytes,
            "free_bytes": usage.free_bytes,
            "total_bytes": usage.total_bytes,
            "messages": len(d.spool),
            "last_compaction_at": None if last is None else last[0],
            "last_compaction_freed": None if last is None else last[1],
            "history": dict(d.runner.journal.usage()),
        }

    async def spool_compact(self, _args: Args) -> dict[str, Any]:
        before = self.d.spool.usage()
        freed = await self.d.compact_now(include_active=True)
        after = self.d.spool.usage()
        return {
            "freed_bytes": freed,
            "size_before": before.size_bytes,
            "size_after": after.size_bytes,
            "free_bytes": after.free_bytes,
        }


def _only(
    picked: list[tuple[MessageView, list[str]]], keep: Callable[[Any], bool]
) -> list[tuple[MessageView, list[str]]]:
    out = []
    for msg, domains in picked:
        ds = [u.domain for u in msg.units if u.domain in domains and keep(u)]
        if ds:
            out.append((msg, ds))
    return out


def entries(daemon: OpsDaemon) -> tuple[OpsHandlers, list[tuple[str, Any, bool]]]:
    """The commands of this module for the control table: (name, handler, streaming)."""
    h = OpsHandlers(daemon)
    return h, [
        ("breaker.list", h.breaker_list, False),
        ("breaker.reset", h.breaker_reset, False),
        ("breaker.probe", h.breaker_probe, False),
        ("queue.hold", h.queue_hold, False),
        ("queue.release", h.queue_release, False),
        ("queue.suspend", h.queue_suspend, False),
        ("queue.resume", h.queue_resume, False),
        ("queue.bounce", lambda a: h.bulk(a, "bounce"), False),
        ("queue.summary", h.queue_summary, False),
        ("queue.body", h.queue_body, True),
        ("message.log", h.message_log, False),
        ("spool.status", h.spool_status, False),
        ("spool.compact", h.spool_compact, False),
    ]
