"""Redis I/O for the shared policy state: one connection pool, short timeouts.

Every call goes through :meth:`RedisBackend._call`, which bounds it by the
configured timeout, measures its round trip (for the metrics histogram) and maps
every Redis or socket error to :class:`RedisUnavailableError` — the one exception the
policy state reacts to (by falling back to local limits).  Nothing here decides
anything: the scripts in :mod:`empath.cluster.lua` are the atomic decisions, and
:mod:`empath.cluster.view` interprets their answers (:mod:`empath.cluster.asker` sends them).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from empath.cluster import lua
from empath.cluster.asks import BreakerRecord
from empath.errors import EmpathError
from empath.stats import Histogram

T = TypeVar("T")

# Round-trip histogram buckets (seconds) for empath_cluster_redis_roundtrip_seconds.
RTT_BUCKETS_S: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                        0.1, 0.25, 0.5, 1.0)  # fmt: skip


class RedisUnavailableError(EmpathError):
    """Redis did not answer in time, or refused: the caller falls back to local state."""


@dataclass(slots=True)
class BackendStats:
    """Round trips and errors, read by the metrics collector."""

    rtt: Histogram = field(default_factory=lambda: Histogram(RTT_BUCKETS_S))
    errors: int = 0


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    live_nodes: int
    previous_instance: str


class RedisBackend:
    """The node's Redis client (redis-py asyncio, one pool) and its script calls."""

    def __init__(self, url: str, key_prefix: str, timeout_s: float) -> None:
        self.prefix = key_prefix
        self.timeout_s = timeout_s
        self.stats = BackendStats()
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        r = self.redis
        self._take_tokens = r.register_script(lua.TAKE_TOKENS)
        self._acquire_slots = r.register_script(lua.ACQUIRE_SLOTS)
        self._renew_slots = r.register_script(lua.RENEW_SLOTS)
        self._breaker_failure = r.register_script(lua.BREAKER_FAILURE)
        self._claim_probe = r.register_script(lua.CLAIM_PROBE)
        self._probe_outcome = r.register_script(lua.PROBE_OUTCOME)
        self._renew_probes = r.register_script(lua.RENEW_PROBES)
        self._read_breakers = r.register_script(lua.READ_BREAKERS)
        self._heartbeat = r.register_script(lua.HEARTBEAT)
        self._operator_breaker = r.register_script(lua.OPERATOR_BREAKER)

    # -- keys -------------------------------------------------------------------

    def rate_key(self, domain: str) -> str:
        return f"{self.prefix}rate:{domain}"

    def conn_key(self, domain: str) -> str:
        return f"{self.prefix}conn:{domain}"

    def wait_key(self, domain: str) -> str:
        return f"{self.prefix}wait:{domain}"

    @property
    def breakers_key(self) -> str:
        return f"{self.prefix}breakers"

    def failures_key(self, domain: str) -> str:
        return f"{self.prefix}bfail:{domain}"

    @property
    def suspended_key(self) -> str:
        return f"{self.prefix}suspended"

    @property
    def nodes_key(self) -> str:
        return f"{self.prefix}nodes"

    def node_key(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    # -- calls ------------------------------------------------------------------

    async def _call(self, aw: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(aw, self.timeout_s * 2)
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.errors += 1
            raise RedisUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        self.stats.rtt.observe(time.perf_counter() - started)
        return result

    async def reset(self) -> None:
        """Drop every pooled connection (they may point at a Redis that died)."""
        try:
            await asyncio.wait_for(self.redis.connection_pool.disconnect(), self.timeout_s * 2)
        except (RedisError, OSError, TimeoutError):
            pass

    async def ping(self) -> None:
        await self._call(self.redis.ping())

    async def take_tokens(
        self, domain: str, rate_per_s: float, burst: int, want: int
    ) -> tuple[int, float]:
        """(tokens granted, seconds until the next one when none was)."""
        interval_us = 1_000_000.0 / rate_per_s
        got, wait_us = await self._call(
            self._take_tokens(keys=[self.rate_key(domain)], args=[interval_us, burst, want])
        )
        return int(got), int(wait_us) / 1_000_000.0

    async def acquire_slots(
        self, domain: str, max_connections: int, ttl_s: float, members: Sequence[str]
    ) -> int:
        """How many of ``members`` became leases (a prefix of the list)."""
        added = await self._call(
            self._acquire_slots(
                keys=[self.conn_key(domain), self.wait_key(domain)],
                args=[max_connections, int(ttl_s * 1000), *members],
            )
        )
        return int(added)

    async def release_slots(self, domain: str, members: Sequence[str]) -> None:
        await self._call(self.redis.zrem(self.conn_key(domain), *members))

    async def renew_slots(self, held: Mapping[str, Sequence[str]], ttl_s: float) -> None:
        keys: list[str] = []
        args: list[Any] = [int(ttl_s * 1000)]
        for domain, members in held.items():
            if members:
                keys.append(self.conn_key(domain))
                args.append(len(members))
                args.extend(members)
        if keys:
            await self._call(self._renew_slots(keys=keys, args=args))

    async def breaker_failure(
        self,
        domain: str,
        member: str,
        probe_token: str,
        threshold: int,
        window_s: float,
        timeout_s: float,
    ) -> tuple[int, float]:
        code, ms = await self._call(
            self._breaker_failure(
                keys=[self.breakers_key, self.failures_key(domain)],
                args=[domain, member, threshold, int(window_s * 1000), int(timeout_s * 1000),
                      probe_token],
            )
        )  # fmt: skip
        return int(code), int(ms) / 1000.0

    async def claim_probe(
        self, domain: str, token: str, lease_s: float, own_prefix: str
    ) -> tuple[int, float, bool]:
        """Claim the Half-Open probe for ``lease_s`` (renewed by :meth:`renew_probes`)."""
        code, ms, moved = await self._call(
            self._claim_probe(
                keys=[self.breakers_key],
                args=[domain, token, int(lease_s * 1000), own_prefix],
            )
        )
        return int(code), int(ms) / 1000.0, bool(int(moved))

    async def renew_probes(self, held: Mapping[str, str], lease_s: float) -> None:
        """Extend this node's live probe claims (domain -> token) by ``lease_s``."""
        if not held:
            return
        args: list[Any] = [int(lease_s * 1000)]
        for domain, token in held.items():
            args += [domain, token]
        await self._call(self._renew_probes(keys=[self.breakers_key], args=args))

    async def probe_outcome(
        self, domain: str, token: str, success: bool, success_threshold: int
    ) -> bool:
        closed = await self._call(
            self._probe_outcome(
                keys=[self.breakers_key, self.failures_key(domain)],
                args=[domain, token, "success" if success else "release", success_threshold],
            )
        )
        return bool(int(closed))

    async def read_breakers(
        self, held_domains: Sequence[str] = ()
    ) -> tuple[dict[str, BreakerRecord], set[str]]:
        """Every non-Closed breaker, and which of ``held_domains`` are contended."""
        keys = [self.breakers_key, *(self.wait_key(d) for d in held_domains)]
        raw = await self._call(self._read_breakers(keys=keys))
        now = int(raw[0])
        n = len(held_domains)
        contended = {d for d, flag in zip(held_domains, raw[1 : 1 + n], strict=True) if flag}
        out: dict[str, BreakerRecord] = {}
        for i in range(1 + n, len(raw) - 1, 2):
            domain = raw[i].decode() if isinstance(raw[i], bytes) else str(raw[i])
            st = json.loads(raw[i + 1])
            open_left = max(0.0, (float(st.get("u", 0)) - now) / 1000.0)
            half = st.get("s") == "half" or open_left <= 0
            probe_left = 0.0
            if st.get("p"):
                probe_left = max(0.0, (float(st.get("pu", 0)) - now) / 1000.0)
            out[domain] = BreakerRecord(half, 0.0 if half else open_left, probe_left)
        return out, contended

    async def operator_breaker(self, domain: str, action: str) -> str:
        """`breaker reset|probe` for the whole cluster; the shared state it was in
        ('closed', 'open' or 'half')."""
        raw = await self._call(
            self._operator_breaker(
                keys=[self.breakers_key, self.failures_key(domain)], args=[domain, action]
            )
        )
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def read_suspended(self) -> dict[str, str]:
        """Every suspension (domain -> its JSON), as `queue suspend` wrote it."""
        raw = await self._call(self.redis.hgetall(self.suspended_key))
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): (
                v.decode() if isinstance(v, bytes) else str(v)
            )
            for k, v in raw.items()
        }

    async def write_suspended(self, domain: str, value: str | None) -> None:
        """Suspend (``value``: its JSON) or resume (None) ``domain`` for every node."""
        if value is None:
            await self._call(self.redis.hdel(self.suspended_key, domain))
        else:
            await self._call(self.redis.hset(self.suspended_key, domain, value))

    async def heartbeat(
        self,
        node_id: str,
        fields: Mapping[str, str],
        *,
        ttl_s: float,
        live_s: float,
        forget_s: float,
    ) -> HeartbeatReply:
        args: list[Any] = [node_id, int(ttl_s * 1000), int(live_s * 1000), int(forget_s * 1000)]
        for k, v in fields.items():
            args.extend((k, v))
        _now, live, previous = await self._call(
            self._heartbeat(keys=[self.nodes_key, self.node_key(node_id)], args=args)
        )
        prev = previous.decode() if isinstance(previous, bytes) else str(previous)
        return HeartbeatReply(int(live), prev)

    async def nodes(self) -> tuple[float, list[dict[str, str]]]:
        """(Redis now in seconds, every known node's hash)."""
        ids = await self._call(self.redis.zrange(self.nodes_key, 0, -1))
        now_s, now_us = await self._call(self.redis.time())
        out: list[dict[str, str]] = []
        for raw_id in ids:
            node_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            h = await self._call(self.redis.hgetall(self.node_key(node_id)))
            rec = {
                (k.decode() if isinstance(k, bytes) else str(k)): (
                    v.decode() if isinstance(v, bytes) else str(v)
                )
                for k, v in h.items()
            }
            rec.setdefault("node_id", node_id)
            out.append(rec)
        return now_s + now_us / 1_000_000.0, out

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.redis.aclose(), self.timeout_s * 4)
        except (RedisError, OSError, TimeoutError):
            pass
