"""AUTH failure counters and address blocks shared by the nodes of a cluster (DESIGN §11, §13).

Theory of operation
-------------------
With ``cluster:`` configured, every node still counts failures in its own
:class:`~empath.policy.authlimit.AuthLimiter` (the answer never waits for Redis when
it does not have to), and also adds each failure to Redis, where one script
(:data:`AUTH_FAILURE`) counts it in the same 1/60-of-the-window buckets for the
client's address key and for the login, and returns both sums over the window: the
counts of the whole cluster.  The node decides with the larger of its own and the
cluster's count, so an attacker spreading guesses over the nodes behind a load
balancer is blocked and slowed as if it had hit one.  A block is written to Redis
too (a key that expires with it) and every node checks it before hashing a
password.  Buckets use the wall clock (nodes' clocks agree well enough for
ten-minute windows).

The hourly message quota is shared the same way, but the state machine asks it
synchronously at MAIL: each node admits against its own count plus what the others
had sent at its last look, and after each message it adds one in Redis and takes the
cluster's total back.  A node so learns the others' messages one message late: the
cluster can overshoot a quota by at most one message per node.

Redis down: every call is bounded by the cluster's ``timeout_ms``; on an error the
node goes on with its local counts alone (logged once per outage) - the limits are
then per node, as without a cluster.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import Final, TypeVar

from redis.exceptions import RedisError

from empath.cluster.backend import RedisBackend
from empath.logs import get_logger

__all__ = ["AUTH_FAILURE", "SharedAuthCounters"]

_HOUR_S: Final = 3600.0

log = get_logger("smtp", __name__)
T = TypeVar("T")

# KEYS: hashes (field = bucket, value = count), e.g. the address's and the login's;
# ARGV[1] this bucket, ARGV[2] the oldest bucket still in the window, ARGV[3] ttl ms.
# Counts one event in each key; returns each key's sum over the window.
AUTH_FAILURE: Final = """
local out = {}
for i = 1, #KEYS do
  redis.call('HINCRBY', KEYS[i], ARGV[1], 1)
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
  local all = redis.call('HGETALL', KEYS[i])
  local sum = 0
  for j = 1, #all, 2 do
    if tonumber(all[j]) < tonumber(ARGV[2]) then
      redis.call('HDEL', KEYS[i], all[j])
    else
      sum = sum + tonumber(all[j + 1])
    end
  end
  out[i] = sum
end
return out
"""


class SharedAuthCounters:
    """See module doc; one per node, over the cluster's Redis."""

    def __init__(self, backend: RedisBackend, window_s: float) -> None:
        self._backend = backend
        self._window_s = window_s
        self._bucket_s = window_s / 60
        self._script = backend.redis.register_script(AUTH_FAILURE)
        self._down = False

    def _key(self, kind: str, name: str) -> str:
        return f"{self._backend.prefix}auth:{kind}:{name}"

    async def _call(self, aw: Awaitable[T]) -> T | None:
        """The answer, or None when Redis cannot give it in time (local counts then)."""
        try:
            result = await asyncio.wait_for(aw, self._backend.timeout_s * 2)
        except (RedisError, OSError, TimeoutError) as exc:
            if not self._down:
                self._down = True
                log.warn("AUTH limits: Redis unreachable, counting failures on this node only",
                         error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            return None
        if self._down:
            self._down = False
            log.info("AUTH limits: Redis reachable again, failures counted cluster-wide")
        return result

    async def failure(self, ip_key: str, login: str, wall: float) -> tuple[int, int] | None:
        """Count one failure; (address count, login count) over the window, cluster-wide."""
        bucket = math.floor(wall / self._bucket_s)
        first = math.floor((wall - self._window_s) / self._bucket_s)
        ttl_ms = int((self._window_s + self._bucket_s) * 1000) + 1000
        keys = [self._key("ip", ip_key), self._key("login", login.lower())]
        got = await self._call(self._script(keys=keys, args=[bucket, first, ttl_ms]))
        if got is None:
            return None
        return int(got[0]), int(got[1])

    async def message(self, user: str, wall: float) -> int | None:
        """Count one message of ``user``; the cluster's total in the last hour."""
        bucket_s = _HOUR_S / 60
        bucket = math.floor(wall / bucket_s)
        first = math.floor((wall - _HOUR_S) / bucket_s)
        ttl_ms = int((_HOUR_S + bucket_s) * 1000) + 1000
        got = await self._call(
            self._script(keys=[self._key("msgs", user)], args=[bucket, first, ttl_ms])
        )
        return None if got is None else int(got[0])

    async def block(self, ip_key: str, block_s: float) -> None:
        redis = self._backend.redis
        await self._call(redis.set(self._key("block", ip_key), "1", px=int(block_s * 1000)))

    async def blocked_for(self, ip_key: str) -> float | None:
        """Seconds the address stays blocked cluster-wide (0: not blocked; None: Redis
        did not answer)."""
        ttl = await self._call(self._backend.redis.pttl(self._key("block", ip_key)))
        if ttl is None:
            return None
        return ttl / 1000 if ttl > 0 else 0.0

    async def unblock(self, key: str) -> bool:
        """Forget a block and the counts of an address or a login; True if any existed."""
        redis = self._backend.redis
        gone = await self._call(
            redis.delete(self._key("block", key), self._key("ip", key), self._key("login", key))
        )
        return bool(gone)

    async def blocked(self) -> dict[str, float]:
        """Every address blocked cluster-wide, with the seconds it has left."""
        redis = self._backend.redis
        prefix = self._key("block", "")

        async def scan() -> dict[str, float]:
            out: dict[str, float] = {}
            async for raw in redis.scan_iter(match=prefix + "*", count=200):
                key = raw.decode() if isinstance(raw, bytes) else str(raw)
                ttl = await redis.pttl(key)
                if ttl > 0:
                    out[key[len(prefix) :]] = ttl / 1000
            return out

        return await self._call(scan()) or {}

    async def close(self) -> None:
        await self._backend.close()
