"""The asker: the one part of a node's shared policy state that talks to Redis.

Theory of operation
-------------------
:class:`~empath.cluster.view.ClusterView` answers the scheduler from memory and puts
what it needs from Redis in its outbox as :data:`~empath.cluster.view.Ask` data.
:class:`RedisAsker` is one task (started under the daemon's supervisor at the first
ask) that empties the outbox whenever the view rings (``notify``), runs each ask as a
child of that task (asks to different domains must not queue behind each other), and
hands the answer back to the view.  Every ask ends with a wake of its domain, answered
or not, so the scheduler looks again.

A refused slot ask is asked again after :data:`~empath.cluster.view.SLOT_RETRY_S`: the
child sleeps on the injected :class:`~empath.clock.Clock` (virtual in tests) and tells
the view its retry time came.  An ask that fails with
:class:`~empath.errors.RedisUnavailableError` puts the node in fallback (unless it was
sent before the node last came back from one); any other failure is logged.

The operator's breaker commands (``breaker_reset``/``breaker_probe``) are asks too, but
awaited by their caller, so they run in the caller's task.
"""

from __future__ import annotations

import asyncio
import contextlib

from empath.clock import Clock, deadline
from empath.cluster.asks import (
    AcquireSlots,
    Ask,
    ClaimProbe,
    CountFailure,
    ProbeOutcome,
    ReleaseSlots,
    TakeTokens,
)
from empath.cluster.backend import RedisBackend, RedisUnavailableError
from empath.cluster.breakers import SHARED_STATE
from empath.cluster.view import ClusterView
from empath.logs import get_logger
from empath.policy.breaker import BreakerState
from empath.supervisor import Spawn, untracked

log = get_logger("cluster", __name__)

__all__ = ["RedisAsker", "log_fallback_entered", "log_fallback_left"]


def log_fallback_entered(view: ClusterView, reason: str) -> None:
    log.error(
        "Cluster: Redis unreachable, falling back to local limits scaled by 1/node count",
        nodes=view.node_count,
        error=reason,
    )


def log_fallback_left(view: ClusterView, seconds: float) -> None:
    log.warn(
        "Cluster: Redis reachable again, shared policy state resumed",
        nodes=view.node_count,
        fallback_s=round(seconds, 3),
    )


class RedisAsker:
    """Runs the view's asks against Redis; see module doc."""

    def __init__(
        self, view: ClusterView, backend: RedisBackend, clock: Clock, spawn: Spawn | None
    ) -> None:
        self.view = view
        self.backend = backend
        self.clock = clock
        self._spawn = spawn
        self._task: asyncio.Task[None] | None = None
        self._bell = asyncio.Event()
        self._children: set[asyncio.Task[None]] = set()
        view.set_notify(self._ring)

    @property
    def asks_out(self) -> int:
        """Asks waiting in the outbox or running."""
        return len(self.view.asks) + len(self._children)

    def _ring(self) -> None:
        self._bell.set()
        if self._task is None:
            name = "empath-cluster-asker"
            if self._spawn is not None:
                self._task = self._spawn(self._run(), name=name, essential=True)
            else:
                self._task = untracked(self._run(), name=name)

    async def _run(self) -> None:
        # The asks are this task's children: cancelling it (shutdown) cancels them.
        async with asyncio.TaskGroup() as children:
            while True:
                await self._bell.wait()
                self._bell.clear()
                for ask in self.view.take_asks():
                    child = children.create_task(
                        self._guarded(ask), name=f"empath-cluster-ask-{ask.domain}"
                    )
                    self._children.add(child)
                    child.add_done_callback(self._children.discard)

    async def _guarded(self, ask: Ask) -> None:
        view = self.view
        try:
            retry_s = await self._send(ask)
            if retry_s is not None:
                await self.clock.sleep(retry_s)
                view.retry_slots(ask.domain)
        except RedisUnavailableError as exc:
            if view.ask_failed(ask) and view.enter_fallback():
                log_fallback_entered(view, str(exc))
        except Exception:
            view.ask_failed(ask)
            log.exception("Cluster policy call failed", domain=ask.domain)
        finally:
            if not isinstance(ask, ReleaseSlots):
                view.wake(ask.domain)

    async def _send(self, ask: Ask) -> float | None:
        """One ask to Redis; returns the seconds after which a refused slot ask is due
        again, else None."""
        b = self.backend
        view = self.view
        if isinstance(ask, TakeTokens):
            got, wait_s = await b.take_tokens(ask.domain, ask.rate, ask.burst, ask.batch)
            view.tokens_answered(ask, got, wait_s)
        elif isinstance(ask, AcquireSlots):
            added = await b.acquire_slots(
                ask.domain, ask.max_connections, ask.lease_s, list(ask.members)
            )
            return view.slots_answered(ask, added)
        elif isinstance(ask, ReleaseSlots):
            await b.release_slots(ask.domain, list(ask.members))
        elif isinstance(ask, ClaimProbe):
            code, left_s, moved = await b.claim_probe(
                ask.domain, ask.token, ask.lease_s, view.member_prefix
            )
            view.breakers.claim_answered(ask, code, left_s, moved)
        elif isinstance(ask, ProbeOutcome):
            closed = await b.probe_outcome(
                ask.domain, ask.token, ask.success, ask.success_threshold
            )
            view.breakers.outcome_answered(ask, closed)
        elif isinstance(ask, CountFailure):
            code, open_s = await b.breaker_failure(
                ask.domain, ask.member, ask.token, ask.threshold, ask.window_s, ask.open_s
            )
            view.breakers.failure_answered(ask, code, open_s)
        return None

    # -- the operator's commands (awaited by their caller) ------------------------------

    async def breaker_reset(self, domain: str) -> BreakerState:
        """Closed in Redis (for every node) and here; raises RedisUnavailableError when
        Redis cannot be reached (a fallback breaker is reset locally first)."""
        old = self.view.breakers.local_reset(domain)
        shared = SHARED_STATE[await self.backend.operator_breaker(domain, "reset")]
        self.view.breakers.reset_answered(domain, shared)
        return shared if shared is not BreakerState.CLOSED else old

    async def breaker_probe(self, domain: str) -> BreakerState:
        """Half-Open now in Redis: the first node to claim the probe sends it."""
        local = self.view.breakers.local_probe(domain)
        if local is not None:
            return local
        old = SHARED_STATE[await self.backend.operator_breaker(domain, "probe")]
        self.view.breakers.probe_answered(domain, old)
        return old

    async def close(self, *, timeout_s: float) -> None:
        """Let the asks that are out finish (at most ``timeout_s`` on the clock), then
        stop the task and give back every lease (best effort)."""
        held = self.view.forget_leases()
        if self._children:
            with contextlib.suppress(TimeoutError):
                async with deadline(self.clock, timeout_s):
                    await asyncio.wait(list(self._children))
        task = self._task
        if task is not None:
            task.cancel()  # and the asks still out with it
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self.view.fallback:
            for domain, members in held.items():
                try:
                    await self.backend.release_slots(domain, members)
                except RedisUnavailableError:
                    break
