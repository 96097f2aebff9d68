"""A cluster node's background loop: heartbeat, lease renewal, breaker mirror, fallback.

One task, ticking every :data:`TICK_S`:

* while Redis answers: refresh the breaker mirror (every tick, so a breaker
  opened by another node stops this one within a second) and the suspended
  domains (`queue suspend` on any node), give idle reserved
  leases back, renew held leases and Half-Open probe claims every
  ``lease_secs / 4``, and write the node's heartbeat (queue sizes, in-flight
  deliveries, fallback flag) every
  ``heartbeat_secs``, learning the number of live nodes from it;
* in fallback: ping Redis every tick; the first answer ends the fallback (after
  the held leases were re-asserted, in case Redis restarted empty).

Any failed call puts the policy state in fallback.  A node whose ``node_id``'s
last heartbeat came from another process instance logs an error once: two
nodes must not share a ``node_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from empath.clock import Clock, SystemClock, deadline
from empath.cluster.backend import RedisBackend, RedisUnavailableError
from empath.cluster.state import SharedPolicyState
from empath.logs import get_logger
from empath.queue.suspend import Suspension, Suspensions
from empath.supervisor import Spawn

log = get_logger("cluster", __name__)

TICK_S: Final = 0.25
NODE_LIVE_FACTOR: Final = 5.0  # a node is live while its heartbeat is younger than 5 beats
NODE_FORGET_S: Final = 86400.0  # a node silent this long leaves the node list


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One node as ``empathctl cluster status`` shows it."""

    node_id: str
    alive: bool
    heartbeat_age_s: float
    pid: int
    host: str
    fallback: bool
    in_flight: int
    queue: Mapping[str, int]

    def to_json(self) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "alive": self.alive,
            "heartbeat_age_s": round(self.heartbeat_age_s, 3),
            "pid": self.pid,
            "host": self.host,
            "fallback": self.fallback,
            "in_flight": self.in_flight,
            "queue": dict(self.queue),
        }


class ClusterNode:
    """Runs the loop above for one :class:`SharedPolicyState`."""

    def __init__(
        self,
        state: SharedPolicyState,
        backend: RedisBackend,
        *,
        node_id: str,
        heartbeat_s: float,
        lease_s: float,
        queue_sizes: Callable[[], Mapping[str, int]],
        in_flight: Callable[[], int],
        suspensions: Suspensions | None = None,
        clock: Clock | None = None,
    ) -> None:
        """``clock`` times the loop (the same clock as ``state``'s; virtual in tests)."""
        self.clock: Clock = clock or SystemClock()
        self.state = state
        self.backend = backend
        self.node_id = node_id
        self.heartbeat_s = heartbeat_s
        self.lease_s = lease_s
        self._queue_sizes = queue_sizes
        self._in_flight = in_flight
        self.suspensions = suspensions
        self._task: asyncio.Task[None] | None = None
        self._started = self.clock.now()
        self._warned_duplicate = False
        self.redis_up = False
        self.heartbeats = 0

    def start(self, spawn: Spawn) -> None:
        """Start the heartbeat loop under the daemon's supervisor."""
        self._task = spawn(self._run(), name="empath-cluster", essential=True)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.state.close()
        with contextlib.suppress(Exception):
            async with deadline(self.clock, self.backend.timeout_s * 2):
                await self.backend.redis.zrem(self.backend.nodes_key, self.node_id)
        await self.backend.close()

    async def _run(self) -> None:
        last_beat = last_renew = -1e9
        while True:
            now = self.clock.monotonic()
            try:
                if self.state.fallback:
                    await self.backend.reset()
                    await self.backend.ping()
                    await self.backend.renew_slots(self.state.held_leases(), self.lease_s)
                    await self._refresh_breakers()
                    self.redis_up = True
                    self.state.leave_fallback()
                    last_beat = last_renew = -1e9
                    continue
                await self._refresh_breakers()
                await self._refresh_suspensions()
                self.state.sweep()
                if now - last_renew >= self.lease_s / 4:
                    last_renew = now
                    await self.backend.renew_slots(self.state.held_leases(), self.lease_s)
                    await self.backend.renew_probes(self.state.held_probes(), self.lease_s)
                if now - last_beat >= self.heartbeat_s:
                    last_beat = now
                    await self._heartbeat()
                self.redis_up = True
            except RedisUnavailableError as exc:
                self.redis_up = False
                self.state.enter_fallback(str(exc))
            except Exception:
                log.exception("Cluster loop failed")
            await self.clock.sleep(TICK_S)

    async def _refresh_breakers(self) -> None:
        asked_at = self.clock.monotonic()
        records, contended = await self.backend.read_breakers(list(self.state.held_leases()))
        self.state.apply_breakers(records, asked_at)
        self.state.contended = contended

    async def _refresh_suspensions(self) -> None:
        """The cluster's suspended domains replace this node's (`queue suspend`)."""
        if self.suspensions is None:
            return
        records: dict[str, Suspension] = {}
        for domain, raw in (await self.backend.read_suspended()).items():
            try:
                records[domain] = Suspension.from_json(json.loads(raw))
            except (ValueError, KeyError, TypeError):
                continue
        now = self.clock.now()
        self.suspensions.replace_all({d: s for d, s in records.items() if s.active(now)})

    async def _heartbeat(self) -> None:
        fields = {
            "node_id": self.node_id,
            "instance": self.state.instance,
            "pid": str(os.getpid()),
            "host": socket.gethostname(),
            "started_at": str(self._started),
            "fallback": "1" if self.state.fallback else "0",
            "in_flight": str(self._in_flight()),
            "queue": json.dumps(dict(self._queue_sizes()), sort_keys=True),
        }
        reply = await self.backend.heartbeat(
            self.node_id,
            fields,
            ttl_s=NODE_FORGET_S,
            live_s=self.heartbeat_s * NODE_LIVE_FACTOR,
            forget_s=NODE_FORGET_S,
        )
        self.heartbeats += 1
        self.state.node_count = max(1, reply.live_nodes)
        if (
            reply.previous_instance
            and reply.previous_instance != self.state.instance
            and self.heartbeats > 1
            and not self._warned_duplicate
        ):
            self._warned_duplicate = True
            log.error(
                "Cluster: another process heartbeats with this node_id; give each node its own",
                node_id=self.node_id,
            )


async def cluster_status(backend: RedisBackend, heartbeat_s: float) -> list[NodeStatus]:
    """Every known node, newest heartbeat first (for ``empathctl cluster status``)."""
    now, records = await backend.nodes()
    out: list[NodeStatus] = []
    for rec in records:
        age = max(0.0, now - int(rec.get("heartbeat_ms", "0")) / 1000.0)
        try:
            queue = {k: int(v) for k, v in json.loads(rec.get("queue", "{}")).items()}
        except ValueError:
            queue = {}
        out.append(
            NodeStatus(
                node_id=rec.get("node_id", "?"),
                alive=age <= heartbeat_s * NODE_LIVE_FACTOR,
                heartbeat_age_s=age,
                pid=int(rec.get("pid", "0") or 0),
                host=rec.get("host", ""),
                fallback=rec.get("fallback") == "1",
                in_flight=int(rec.get("in_flight", "0") or 0),
                queue=queue,
            )
        )
    out.sort(key=lambda n: n.heartbeat_age_s)
    return out
