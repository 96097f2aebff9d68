"""The shared (Redis) :class:`~empath.policy.state.PolicyState` of a cluster node (DESIGN §11).

:class:`SharedPolicyState` is what the scheduler and the node's loop are given: a
:class:`~empath.cluster.view.ClusterView` (pure: the node's mirror of the shared state,
answering every synchronous question and saying what to ask of Redis) wired to a
:class:`~empath.cluster.asker.RedisAsker` (async: the only part that talks to Redis,
one task under the daemon's supervisor).  The rules live in view.py; the Redis calls
in asker.py; this module only joins them and keeps the names the rest of the daemon
uses.
"""

from __future__ import annotations

from collections.abc import Mapping

from empath.clock import Clock, SystemClock
from empath.cluster.asker import RedisAsker, log_fallback_entered, log_fallback_left
from empath.cluster.asks import BreakerRecord
from empath.cluster.backend import RedisBackend
from empath.cluster.breakers import ASK_WAIT_S
from empath.cluster.view import (
    CLUSTER_POOL_IDLE_S,
    DEMAND_S,
    LEASE_REUSE_S,
    RESERVE_IDLE_S,
    SLOT_RETRY_S,
    TOKEN_HOLD_S,
    ClusterView,
    Waker,
    batch_size,
    scaled,
)
from empath.policy.breaker import BreakerDecision, BreakerState, TransitionCallback
from empath.policy.ratelimit import RateDecision, RateLimit
from empath.policy.state import PolicySettings, PolicySnapshot
from empath.supervisor import Spawn

__all__ = [
    "ASK_WAIT_S",
    "CLUSTER_POOL_IDLE_S",
    "DEMAND_S",
    "LEASE_REUSE_S",
    "RESERVE_IDLE_S",
    "SLOT_RETRY_S",
    "TOKEN_HOLD_S",
    "SharedPolicyState",
    "batch_size",
    "scaled",
]


class SharedPolicyState:
    """A cluster node's policy state: Redis-backed, answered from a local view."""

    def __init__(
        self,
        backend: RedisBackend,
        *,
        node_id: str,
        instance: str,
        settings: PolicySettings,
        lease_s: float,  # cluster.lease_secs
        on_transition: TransitionCallback | None = None,
        clock: Clock | None = None,
        spawn: Spawn | None = None,
    ) -> None:
        """``clock`` times every wait and retry; ``spawn`` starts the asker under the
        daemon's supervisor (a plain task without one)."""
        self.backend = backend
        self.node_id = node_id
        self.instance = instance
        self.lease_s = lease_s
        self.view = view = ClusterView(
            clock or SystemClock(),
            settings,
            member_prefix=f"{node_id}/{instance}/",
            lease_s=lease_s,
            on_transition=on_transition,
        )
        self.asker = RedisAsker(view, backend, view.clock, spawn)

    # -- wiring and the node loop's view of it ------------------------------------------

    def set_waker(self, waker: Waker) -> None:
        self.view.set_waker(waker)

    def reconfigure(self, settings: PolicySettings) -> None:
        self.view.reconfigure(settings)

    def limit_for(self, domain: str) -> RateLimit:
        return self.view.limit_for(domain)

    @property
    def fallback(self) -> bool:
        return self.view.fallback

    @property
    def fallback_entries(self) -> int:
        return self.view.fallback_entries

    @property
    def node_count(self) -> int:
        return self.view.node_count

    @node_count.setter
    def node_count(self, nodes: int) -> None:
        self.view.node_count = nodes

    @property
    def contended(self) -> set[str]:
        return self.view.contended

    @contended.setter
    def contended(self, domains: set[str]) -> None:
        self.view.contended = domains

    @property
    def asks_out(self) -> int:
        return self.asker.asks_out

    def held_leases(self) -> dict[str, list[str]]:
        return self.view.held_leases()

    def held_probes(self) -> dict[str, str]:
        return self.view.breakers.held_probes()

    def sweep(self) -> None:
        self.view.sweep()

    def apply_breakers(self, records: Mapping[str, BreakerRecord], asked_at: float) -> None:
        self.view.breakers.apply(records, asked_at)

    def enter_fallback(self, reason: str) -> None:
        if self.view.enter_fallback():
            log_fallback_entered(self.view, reason)

    def leave_fallback(self) -> None:
        seconds = self.view.leave_fallback()
        if seconds is not None:
            log_fallback_left(self.view, seconds)

    async def close(self) -> None:
        """Give back every lease (best effort) and wait for asks still out."""
        await self.asker.close(timeout_s=self.backend.timeout_s * 4)

    # -- PolicyState ----------------------------------------------------------------------

    def breaker_allow(self, domain: str) -> BreakerDecision:
        return self.view.breakers.allow(domain)

    def breaker_success(self, domain: str, probe: int) -> None:
        self.view.breakers.success(domain, probe)

    def breaker_failure(self, domain: str, probe: int) -> None:
        self.view.breakers.failure(domain, probe)

    def breaker_release(self, domain: str, probe: int) -> None:
        self.view.breakers.release(domain, probe)

    def breaker_state(self, domain: str) -> BreakerState:
        return self.view.breakers.state(domain)

    async def breaker_reset(self, domain: str) -> BreakerState:
        return await self.asker.breaker_reset(domain)

    async def breaker_probe(self, domain: str) -> BreakerState:
        return await self.asker.breaker_probe(domain)

    def acquire_token(self, domain: str) -> RateDecision:
        return self.view.acquire_token(domain)

    def note_rate_limited(self, domain: str, count: int = 1) -> None:
        self.view.note_rate_limited(domain, count)

    def try_acquire_connection(self, domain: str, max_connections: int) -> bool:
        return self.view.try_acquire_connection(domain, max_connections)

    def release_connection(self, domain: str) -> None:
        self.view.release_connection(domain)

    def connections(self, domain: str) -> int:
        return self.view.connections(domain)

    def prune(self) -> None:
        self.view.prune()

    def snapshot(self) -> PolicySnapshot:
        return self.view.snapshot()
