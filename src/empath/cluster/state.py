"""The shared (Redis) :class:`~empath.policy.state.PolicyState` of a cluster node (DESIGN §11).

Theory of operation
-------------------
The scheduler asks its policy synchronously, on the hot path, and the event
loop must never wait for Redis.  So this state answers every question from a
**local view** and fills that view with asynchronous *asks* (tasks calling the
Lua scripts of :mod:`empath.cluster.lua`).  An ask that is still out answers
"not yet": the scheduler parks the domain's line, and the ask's completion wakes
that line (``waker(domain)``, wired to the runner) whatever its result.

* **Tokens**: the domain's GCRA bucket lives in Redis.  A node takes tokens in
  batches (``batch_size``: one for slow domains, up to a tenth of a second's
  worth for fast ones), spends them locally and drops what it did not spend
  within :data:`TOKEN_HOLD_S`, so the sum over all nodes never exceeds the
  configured rate (leftovers are lost, never added).  When Redis says "no token
  before *t*", that is a real rate-limit deferral (``Wait(t)``).
* **Connection slots**: a lease per connection in the domain's sorted set, with
  an expiry renewed by :class:`~empath.cluster.node.ClusterNode` while held, so
  ``max_connections`` holds cluster-wide and a dead node's leases come back
  within ``lease_secs``.  A finished delivery keeps its lease in a small local
  *reserve* for :data:`RESERVE_IDLE_S` so the next unit of the domain reuses it
  without a round trip (as a connection pool would); while another node waits
  for a lease of that domain (it was refused one in the last 2 s: *contended*),
  a lease older than :data:`LEASE_REUSE_S` is not reused but given back, so
  other nodes get their turn.
  The reserve also covers the pooled connection's idle life: in cluster mode
  the outbound pool closes idle connections after :data:`CLUSTER_POOL_IDLE_S`, before
  the lease goes back, so the peer never sees more than ``max_connections``
  sessions from the whole cluster.  A
  refused ask is repeated every :data:`SLOT_RETRY_S` while the domain has
  demand (no event crosses nodes when a remote lease ends).
  ``try_acquire_connection`` also says "not yet" while the domain's token ask is
  out, so a slot is never taken just to be handed back.
* **Breaker**: a shared record per non-Closed domain.  Failures are counted in
  Redis (a trip on any node opens it for all); the node whose script call makes
  a transition logs and counts it (``on_transition``), so it is logged once in
  the cluster.  The local mirror is refreshed by the node's loop every
  :data:`~empath.cluster.node.BREAKER_REFRESH_S`; the Half-Open probe is claimed
  atomically, so exactly one node probes.  The claim is a lease (``lease_secs``)
  that the holder's loop renews while its probe runs (up to ``probe_timeout_s``):
  a SIGKILLed holder's claim lapses within a lease and another node probes, where
  a claim for the whole ``probe_timeout_s`` (15 minutes) stalled the domain
  cluster-wide for that long.
* **Fallback**: when a call fails or times out the node switches to a
  :class:`~empath.policy.state.LocalPolicyState` whose rates and connection caps
  are divided by the last known number of live nodes, says so once at ERROR,
  and switches back (once, at WARN) when the node's loop reaches Redis again.
  Breakers known to be Open stay Open locally until their end.

Why this module is longer than 600 lines: the local view and the asks that
fill it are one state machine (each ask's completion edits the fields the
synchronous answers read), so they are kept in one class, read side by side.

Connection leases taken in fallback are local only; leases taken from Redis
stay counted there until released or expired, so the shared count is never too
low after Redis comes back.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final

from empath.clock import Clock, SystemClock
from empath.cluster.backend import BreakerRecord, RedisBackend, RedisUnavailableError
from empath.logs import get_logger
from empath.policy.breaker import (
    ADMIT,
    Admit,
    BreakerDecision,
    BreakerInfo,
    BreakerState,
    BreakerTransition,
    Deny,
    TransitionCallback,
)
from empath.policy.ratelimit import GRANTED, RateDecision, RateLimit, Wait
from empath.policy.state import LocalPolicyState, PolicySettings, PolicySnapshot
from empath.supervisor import Spawn

log = get_logger("cluster", __name__)

TOKEN_HOLD_S: Final = 1.0  # unspent batch tokens are dropped after this
BATCH_HORIZON_S: Final = 0.1  # a batch is at most this much of the domain's rate
MAX_BATCH: Final = 64
ASK_WAIT_S: Final = 1.0  # "look again" while an ask is out (its completion wakes earlier)
RESERVE_IDLE_S: Final = 0.3  # an unused reserved lease goes back to Redis after this
CLUSTER_POOL_IDLE_S: Final = 0.1  # cluster mode: idle outbound connections close (< above)
LEASE_REUSE_S: Final = 2.0  # a lease older than this is given back, not reused
SLOT_RETRY_S: Final = 0.05  # refused slot ask: ask again after this, while in demand
DEMAND_S: Final = 6.0  # a domain is "in demand" this long after the scheduler asked


@dataclass(frozen=True, slots=True)
class _Lease:
    member: str  # "" for a local (fallback) slot
    taken_at: float  # monotonic


class _Domain:
    """Local view of one domain (internal)."""

    __slots__ = (
        "asking_slots",
        "asking_tokens",
        "demand_at",
        "in_use",
        "next_token_at",
        "reserve",
        "slot_retry_at",
        "tokens",
        "tokens_expire",
    )

    def __init__(self) -> None:
        self.tokens = 0
        self.tokens_expire = 0.0
        self.next_token_at = 0.0
        self.asking_tokens = False
        self.in_use: list[_Lease] = []
        self.reserve: list[tuple[_Lease, float]] = []  # (lease, released at)
        self.asking_slots = False
        self.slot_retry_at = 0.0
        self.demand_at = 0.0


@dataclass(slots=True)
class _Mirror:
    """What this node last knew of a non-Closed shared breaker (internal)."""

    state: BreakerState
    open_until: float  # monotonic, while OPEN
    busy_until: float  # monotonic: another node's probe is out until then
    updated_at: float


@dataclass(frozen=True, slots=True)
class _Ticket:
    domain: str
    token: str  # Redis probe token; "" for a local (fallback) breaker ticket
    local: int  # the local breaker's ticket when token == ""


def batch_size(limit: RateLimit) -> int:
    """Tokens to take per ask: at most a tenth of a second's worth, the burst, 64."""
    return max(
        1, min(limit.burst_size, MAX_BATCH, int(limit.messages_per_second * BATCH_HORIZON_S))
    )


def scaled(limit: RateLimit, nodes: int) -> RateLimit:
    """A limit divided among ``nodes`` (fallback mode)."""
    if limit.unlimited or nodes <= 1:
        return limit
    return RateLimit(limit.messages_per_second / nodes, max(1, limit.burst_size // nodes))


Waker = Callable[[str], None]
_SHARED_STATE: Final = {
    "closed": BreakerState.CLOSED,
    "open": BreakerState.OPEN,
    "half": BreakerState.HALF_OPEN,
}


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
        """``clock`` times every wait and retry; ``spawn`` starts the asks to Redis
        under the daemon's supervisor (plain tasks without one)."""
        self.backend = backend
        self._spawn_task = spawn
        self.node_id = node_id
        self.instance = instance
        self.member_prefix = f"{node_id}/{instance}/"
        self.lease_s = lease_s
        self._breaker_settings = settings.breaker
        self._default = settings.default_rate
        self._overrides = {d.lower(): r for d, r in settings.rate_overrides.items()}
        self._on_transition = on_transition
        self._clock: Clock = clock or SystemClock()
        self._mono = self._clock.monotonic
        self._waker: Waker | None = None
        self._domains: dict[str, _Domain] = {}
        self._mirror: dict[str, _Mirror] = {}
        self._claiming: set[str] = set()
        self._probe_ready: dict[str, int] = {}  # domain -> ticket claimed, not handed out
        self._probe_out: dict[str, float] = {}  # domain -> deadline of our probe in flight
        self._tickets: dict[int, _Ticket] = {}
        self._ticket_ids = itertools.count(1)
        self._members = itertools.count(1)
        self._trips: dict[str, int] = {}
        self._rate_limited: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # fallback
        self.node_count = 1  # last known live nodes (this one included)
        self.fallback = False
        self.fallback_since = 0.0
        self.fallback_entries = 0
        self._local: LocalPolicyState | None = None
        self._epoch = 0  # + 1 at each return from fallback
        self.contended: set[str] = set()  # domains another node waits for (node loop)

    # -- wiring -----------------------------------------------------------------

    def set_waker(self, waker: Waker) -> None:
        """``waker(domain)``: re-check that domain's line now (the runner's wake)."""
        self._waker = waker

    def reconfigure(self, settings: PolicySettings) -> None:
        self._breaker_settings = settings.breaker
        self._default = settings.default_rate
        self._overrides = {d.lower(): r for d, r in settings.rate_overrides.items()}
        if self._local is not None:
            self._local.reconfigure(self._scaled_settings())

    def limit_for(self, domain: str) -> RateLimit:
        return self._overrides.get(domain, self._default)

    # -- circuit breaker ----------------------------------------------------------

    def breaker_allow(self, domain: str) -> BreakerDecision:
        now = self._mono()
        m = self._mirror.get(domain)
        if m is not None and m.state is BreakerState.OPEN and now < m.open_until:
            return Deny(m.open_until, BreakerState.OPEN)
        if self._local is not None:
            d = self._local.breaker_allow(domain)
            if isinstance(d, Admit) and d.probe:
                return Admit(self._new_ticket(_Ticket(domain, "", d.probe)))
            return d
        if m is None:
            return ADMIT
        ticket = self._probe_ready.pop(domain, None)
        if ticket is not None:
            self._probe_out[domain] = now + self._breaker_settings.probe_timeout_s
            return Admit(ticket)
        out = self._probe_out.get(domain)
        if out is not None and now < out:
            return Deny(out, BreakerState.HALF_OPEN)
        if m.busy_until > now:
            return Deny(m.busy_until, BreakerState.HALF_OPEN)
        if domain not in self._claiming:
            self._claiming.add(domain)
            self._spawn(self._claim(domain), domain)
        return Deny(now + ASK_WAIT_S, BreakerState.HALF_OPEN)

    def breaker_success(self, domain: str, probe: int) -> None:
        t = self._tickets.pop(probe, None) if probe else None
        if t is None:
            return  # a Closed-state success: nothing shared to record
        if not t.token:
            if self._local is not None:
                self._local.breaker_success(domain, t.local)
            return
        self._probe_out.pop(domain, None)
        self._spawn(self._probe_outcome(domain, t.token, success=True), domain)

    def breaker_failure(self, domain: str, probe: int) -> None:
        t = self._tickets.pop(probe, None) if probe else None
        if t is not None and not t.token:
            if self._local is not None:
                self._local.breaker_failure(domain, t.local)
            return
        if t is not None:
            self._probe_out.pop(domain, None)
        if self._local is not None:
            self._local.breaker_failure(domain, 0)
            return
        token = t.token if t is not None else ""
        member = f"{self.member_prefix}f{next(self._members)}"
        self._spawn(self._failure(domain, member, token), domain)

    def breaker_release(self, domain: str, probe: int) -> None:
        t = self._tickets.pop(probe, None) if probe else None
        if t is None:
            return
        if not t.token:
            if self._local is not None:
                self._local.breaker_release(domain, t.local)
            return
        self._probe_out.pop(domain, None)
        self._spawn(self._probe_outcome(domain, t.token, success=False), domain)

    def breaker_state(self, domain: str) -> BreakerState:
        m = self._mirror.get(domain)
        if m is not None:
            if m.state is BreakerState.OPEN and self._mono() < m.open_until:
                return BreakerState.OPEN
            return BreakerState.HALF_OPEN
        if self._local is not None:
            return self._local.breaker_state(domain)
        return BreakerState.CLOSED

    async def breaker_reset(self, domain: str) -> BreakerState:
        """Closed in Redis (for every node) and here; raises RedisUnavailableError when
        Redis cannot be reached (a fallback breaker is reset locally first)."""
        old = BreakerState.CLOSED
        if self._local is not None:
            old = self._local.breaker.reset(domain)
        shared = _SHARED_STATE[await self.backend.operator_breaker(domain, "reset")]
        self._mirror.pop(domain, None)
        self._probe_ready.pop(domain, None)
        self._probe_out.pop(domain, None)
        if shared is not BreakerState.CLOSED:
            old = shared
            self._transition(domain, shared, BreakerState.CLOSED)
        self._wake(domain)
        return old

    async def breaker_probe(self, domain: str) -> BreakerState:
        """Half-Open now in Redis: the first node to claim the probe sends it."""
        if self._local is not None:
            return self._local.breaker.probe_now(domain)
        old = _SHARED_STATE[await self.backend.operator_breaker(domain, "probe")]
        if old is BreakerState.OPEN:
            now = self._mono()
            self._mirror[domain] = _Mirror(BreakerState.HALF_OPEN, now, 0.0, now)
            self._transition(domain, BreakerState.OPEN, BreakerState.HALF_OPEN)
            self._wake(domain)
        return old

    # -- rate limit -----------------------------------------------------------------

    def acquire_token(self, domain: str) -> RateDecision:
        if self._local is not None:
            return self._local.acquire_token(domain)
        limit = self.limit_for(domain)
        if limit.unlimited:
            return GRANTED
        d = self._dom(domain)
        now = self._mono()
        if d.tokens > 0 and now < d.tokens_expire:
            d.tokens -= 1
            batch = batch_size(limit)
            # refill a fast domain's batch ahead of need; a slow domain (batch 1) asks
            # when a unit wants to go, so no token is taken just to expire unused
            if batch > 1 and d.tokens * 2 < batch and not d.asking_tokens:
                self._ask_tokens(domain, d, limit)
            return GRANTED
        d.tokens = 0
        if d.next_token_at > now:
            return Wait(d.next_token_at)
        if not d.asking_tokens:
            self._ask_tokens(domain, d, limit)
        return Wait(now + ASK_WAIT_S)

    def note_rate_limited(self, domain: str, count: int = 1) -> None:
        self._rate_limited[domain] = self._rate_limited.get(domain, 0) + count

    # -- connection slots -----------------------------------------------------------

    def try_acquire_connection(self, domain: str, max_connections: int) -> bool:
        d = self._dom(domain)
        now = self._mono()
        d.demand_at = now
        if self._local is not None:
            cap = max(1, max_connections // max(1, self.node_count))
            if len(d.in_use) >= cap:
                return False
            d.in_use.append(_Lease("", now))
            return True
        limit = self.limit_for(domain)
        if (
            not limit.unlimited
            and (d.tokens <= 0 or now >= d.tokens_expire)
            and d.next_token_at <= now
            and not d.asking_tokens
        ):
            self._ask_tokens(domain, d, limit)
        if len(d.in_use) >= max_connections:
            return False
        usable = self._usable_reserve(d, now, domain in self.contended)
        if usable is None:
            if not d.asking_slots and now >= d.slot_retry_at:
                self._ask_slots(domain, d, max_connections)
            return False
        if d.asking_tokens:
            return False  # keep the reserved lease until the token answer is in
        lease, _ = d.reserve.pop(usable)
        d.in_use.append(lease)
        return True

    @staticmethod
    def _usable_reserve(d: _Domain, now: float, contended: bool) -> int | None:
        """Index of the newest reserved lease that may be reused, or None: any lease,
        unless another node waits for one (then only those younger than
        :data:`LEASE_REUSE_S`; the old ones go back at the next sweep)."""
        for i in range(len(d.reserve) - 1, -1, -1):
            if not contended or now - d.reserve[i][0].taken_at < LEASE_REUSE_S:
                return i
        return None

    def release_connection(self, domain: str) -> None:
        """End of a delivery: its lease goes to the reserve; the node loop's
        :meth:`sweep` gives it back to Redis after :data:`RESERVE_IDLE_S`, so the
        lease outlives the pooled connection's idle time (``CLUSTER_POOL_IDLE_S``)."""
        d = self._domains.get(domain)
        if d is None or not d.in_use:
            return
        lease = d.in_use.pop()
        if lease.member and self._local is None:
            d.reserve.append((lease, self._mono()))
        # a local (fallback) slot is just forgotten; a Redis lease held across the
        # fallback expires in Redis by itself

    def connections(self, domain: str) -> int:
        d = self._domains.get(domain)
        return 0 if d is None else len(d.in_use)

    # -- housekeeping -----------------------------------------------------------------

    def prune(self) -> None:
        now = self._mono()
        for domain in [
            name
            for name, d in self._domains.items()
            if not d.in_use
            and not d.reserve
            and not d.asking_slots
            and not d.asking_tokens
            and now - d.demand_at > DEMAND_S
            and (d.tokens <= 0 or now >= d.tokens_expire)
            and d.next_token_at <= now
        ]:
            del self._domains[domain]
        if self._local is not None:
            self._local.prune()

    def sweep(self) -> None:
        """Give idle or old reserved leases back to Redis (called by the node's loop)."""
        if self._local is not None:
            return
        now = self._mono()
        for domain, d in self._domains.items():
            if not d.reserve or d.asking_tokens:
                continue
            keep: list[tuple[_Lease, float]] = []
            give: list[str] = []
            for lease, released_at in d.reserve:
                if now - released_at > RESERVE_IDLE_S:
                    give.append(lease.member)
                else:
                    keep.append((lease, released_at))
            if give:
                d.reserve = keep
                self._spawn(self._release(give, domain), None)

    def held_probes(self) -> dict[str, str]:
        """This node's live probe claims, domain -> token, for renewal: claimed and not
        yet handed out, or out for less than ``probe_timeout_s`` (a probe whose outcome
        never came is not kept alive: its claim lapses)."""
        now = self._mono()
        ready = set(self._probe_ready.values())
        out: dict[str, str] = {}
        for ticket, t in self._tickets.items():
            if t.token and (ticket in ready or now < self._probe_out.get(t.domain, 0.0)):
                out[t.domain] = t.token
        return out

    def held_leases(self) -> dict[str, list[str]]:
        """Every Redis lease this node holds (in use or reserved), for renewal."""
        out: dict[str, list[str]] = {}
        for domain, d in self._domains.items():
            members = [x.member for x in d.in_use if x.member]
            members += [x.member for x, _ in d.reserve]
            if members:
                out[domain] = members
        return out

    def snapshot(self) -> PolicySnapshot:
        now = self._mono()
        breakers: dict[str, BreakerInfo] = {}
        if self._local is not None:
            breakers.update(self._local.snapshot().breakers)
        for domain, m in self._mirror.items():
            open_now = m.state is BreakerState.OPEN and now < m.open_until
            breakers[domain] = BreakerInfo(
                BreakerState.OPEN if open_now else BreakerState.HALF_OPEN,
                self._trips.get(domain, 0),
                m.open_until if open_now else None,
            )
        for domain, trips in self._trips.items():
            info = breakers.get(domain)
            if info is None:
                breakers[domain] = BreakerInfo(BreakerState.CLOSED, trips, None)
            elif info.trips_total != trips:
                breakers[domain] = BreakerInfo(info.state, trips, info.open_until)
        return PolicySnapshot(
            breakers=breakers,
            rate_limited_total=dict(self._rate_limited),
            connections={k: len(d.in_use) for k, d in self._domains.items() if d.in_use},
        )

    # -- mirror refresh (called by the node's loop) ---------------------------------

    def apply_breakers(self, records: Mapping[str, BreakerRecord], asked_at: float) -> None:
        """Replace the mirror with Redis's view read at ``asked_at`` (monotonic)."""
        now = self._mono()
        for domain, old in list(self._mirror.items()):
            if domain not in records and old.updated_at <= asked_at:
                del self._mirror[domain]
                self._wake(domain)
        for domain, rec in records.items():
            m = self._mirror.get(domain)
            if m is not None and m.updated_at > asked_at:
                continue  # a local transition newer than this read
            state = BreakerState.HALF_OPEN if rec.half_open else BreakerState.OPEN
            new = _Mirror(state, now + rec.open_left_s, now + rec.probe_left_s, asked_at)
            if m is None or m.state is not state:
                self._wake(domain)
            self._mirror[domain] = new

    # -- fallback ----------------------------------------------------------------------

    def enter_fallback(self, reason: str) -> None:
        if self._local is not None:
            return
        self.fallback = True
        self.fallback_since = self._mono()
        self.fallback_entries += 1
        self._local = LocalPolicyState(
            self._clock,
            self._scaled_settings(),
            on_transition=self._on_transition,
        )
        log.error(
            "Cluster: Redis unreachable, falling back to local limits scaled by 1/node count",
            nodes=self.node_count,
            error=reason,
        )
        self._probe_ready.clear()
        self._claiming.clear()
        for domain, d in self._domains.items():
            d.reserve.clear()
            d.asking_slots = d.asking_tokens = False
            d.tokens = 0
            d.next_token_at = 0.0
            self._wake(domain)

    def leave_fallback(self) -> None:
        if self._local is None:
            return
        seconds = self._mono() - self.fallback_since
        self._local = None
        self.fallback = False
        self._epoch += 1
        log.warn(
            "Cluster: Redis reachable again, shared policy state resumed",
            nodes=self.node_count,
            fallback_s=round(seconds, 3),
        )
        for domain in list(self._domains):
            self._wake(domain)

    def _scaled_settings(self) -> PolicySettings:
        n = max(1, self.node_count)
        return PolicySettings(
            self._breaker_settings,
            scaled(self._default, n),
            {d: scaled(r, n) for d, r in self._overrides.items()},
        )

    # -- asks ------------------------------------------------------------------------

    def _dom(self, domain: str) -> _Domain:
        d = self._domains.get(domain)
        if d is None:
            d = self._domains[domain] = _Domain()
        return d

    def _new_ticket(self, t: _Ticket) -> int:
        ticket = next(self._ticket_ids)
        self._tickets[ticket] = t
        return ticket

    def _wake(self, domain: str) -> None:
        if self._waker is not None:
            self._waker(domain)

    def _spawn(self, coro: Coroutine[Any, Any, None], domain: str | None) -> None:
        guarded = self._guard(coro, domain, self._epoch)
        name = f"empath-cluster-ask-{domain or '-'}"
        if self._spawn_task is not None:
            task = self._spawn_task(guarded, name=name)
        else:
            task = asyncio.get_running_loop().create_task(guarded, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, coro: Coroutine[Any, Any, None], domain: str | None, epoch: int) -> None:
        try:
            await coro
        except RedisUnavailableError as exc:
            if epoch == self._epoch:  # not a late failure from before the last recovery
                self.enter_fallback(str(exc))
        except Exception:
            log.exception("Cluster policy call failed", domain=domain)
        finally:
            if domain is not None:
                self._wake(domain)

    def _ask_tokens(self, domain: str, d: _Domain, limit: RateLimit) -> None:
        d.asking_tokens = True
        self._spawn(self._take_tokens(domain, d, limit), domain)

    async def _take_tokens(self, domain: str, d: _Domain, limit: RateLimit) -> None:
        try:
            got, wait_s = await self.backend.take_tokens(
                domain, limit.messages_per_second, limit.burst_size, batch_size(limit)
            )
        finally:
            d.asking_tokens = False
        if self._local is not None:
            return
        now = self._mono()
        if got > 0:
            d.tokens = (d.tokens if now < d.tokens_expire else 0) + got
            d.tokens_expire = now + TOKEN_HOLD_S
            d.next_token_at = 0.0
        else:
            d.next_token_at = now + wait_s

    def _ask_slots(self, domain: str, d: _Domain, max_connections: int) -> None:
        d.asking_slots = True
        held = len(d.in_use) + len(d.reserve)
        want = max(1, min(held, 8, max_connections - held))
        members = [f"{self.member_prefix}{next(self._members)}" for _ in range(want)]
        self._spawn(self._acquire(domain, d, max_connections, members), domain)

    async def _acquire(
        self, domain: str, d: _Domain, max_connections: int, members: list[str]
    ) -> None:
        try:
            added = await self.backend.acquire_slots(domain, max_connections, self.lease_s, members)
        finally:
            d.asking_slots = False
        now = self._mono()
        if self._local is not None:
            if added:
                await self.backend.release_slots(domain, members[:added])
            return
        for member in members[:added]:
            d.reserve.append((_Lease(member, now), now))
        if not added:
            d.slot_retry_at = now + SLOT_RETRY_S
            self._clock.call_later(SLOT_RETRY_S, lambda: self._retry_slots(domain))

    def _retry_slots(self, domain: str) -> None:
        d = self._domains.get(domain)
        if d is None or self._local is not None or d.asking_slots:
            return
        if self._mono() - d.demand_at < DEMAND_S and not d.reserve:
            # The retry time has come, whatever the clock says: a timer may fire a hair
            # before it, and a "not yet" then would end the polling until the
            # scheduler's own re-check seconds later.
            d.slot_retry_at = 0.0
            self._wake(domain)  # the scheduler asks again (and so do we)

    async def _release(self, members: list[str], domain: str) -> None:
        await self.backend.release_slots(domain, members)

    async def _claim(self, domain: str) -> None:
        token = f"{self.member_prefix}p{next(self._members)}"
        settings = self._breaker_settings
        try:
            code, left_s, moved = await self.backend.claim_probe(
                domain, token, self.lease_s, self.member_prefix
            )
        finally:
            self._claiming.discard(domain)
        now = self._mono()
        if self._local is not None:
            if code == 1:
                await self.backend.probe_outcome(domain, token, False, settings.success_threshold)
            return
        if moved:
            self._transition(domain, BreakerState.OPEN, BreakerState.HALF_OPEN)
        if code == 0:
            self._mirror.pop(domain, None)
        elif code == 1:
            self._mirror[domain] = _Mirror(BreakerState.HALF_OPEN, now, 0.0, now)
            self._probe_ready[domain] = self._new_ticket(_Ticket(domain, token, 0))
        elif code == -1:
            self._mirror[domain] = _Mirror(BreakerState.OPEN, now + left_s, 0.0, now)
        else:
            self._mirror[domain] = _Mirror(BreakerState.HALF_OPEN, now, now + left_s, now)

    async def _probe_outcome(self, domain: str, token: str, *, success: bool) -> None:
        closed = await self.backend.probe_outcome(
            domain, token, success, self._breaker_settings.success_threshold
        )
        if closed:
            self._mirror.pop(domain, None)
            self._transition(domain, BreakerState.HALF_OPEN, BreakerState.CLOSED)

    async def _failure(self, domain: str, member: str, token: str) -> None:
        s = self._breaker_settings
        code, open_s = await self.backend.breaker_failure(
            domain, member, token, s.failure_threshold, s.failure_window_s, s.timeout_s
        )
        if code == 0:
            return
        now = self._mono()
        self._mirror[domain] = _Mirror(BreakerState.OPEN, now + open_s, 0.0, now)
        self._trips[domain] = self._trips.get(domain, 0) + 1
        old = BreakerState.CLOSED if code == 1 else BreakerState.HALF_OPEN
        self._transition(domain, old, BreakerState.OPEN)

    def _transition(self, domain: str, old: BreakerState, new: BreakerState) -> None:
        if self._on_transition is not None:
            self._on_transition(
                BreakerTransition(domain, old, new, self._mono(), self._trips.get(domain, 0))
            )

    async def close(self) -> None:
        """Give back every lease (best effort) and wait for asks still out."""
        held = self.held_leases()
        self._domains.clear()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.backend.timeout_s * 4)
        if self._local is None:
            for domain, members in held.items():
                try:
                    await self.backend.release_slots(domain, members)
                except RedisUnavailableError:
                    break


__all__ = ["SharedPolicyState", "batch_size", "scaled"]
