"""A cluster node's local view of the shared (Redis) policy state (DESIGN §11): pure.

Theory of operation
-------------------
The scheduler asks its policy synchronously, on the hot path, and the event loop
must never wait for Redis.  So :class:`ClusterView` (with its breaker mirror,
cluster/breakers.py) answers every question of the
:class:`~empath.policy.state.PolicyState` protocol from what this node last learnt,
and when it needs Redis it says so: the question is answered "not yet" and an
:class:`~empath.cluster.asks.Ask` (plain data: which Lua script, with which
arguments) joins the view's outbox.  The asker (cluster/asker.py) is the only part
that talks to Redis: it takes the asks, runs them, and hands each answer back to the
view (``*_answered``), which edits its fields and says what to wake.  Nothing here
does I/O, starts a task or sets a timer; time is the injected
:class:`~empath.clock.Clock`'s ``monotonic()``, so every rule below is a
synchronous unit test (tests/unit/test_cluster_view.py).

* **Tokens**: the domain's GCRA bucket lives in Redis.  A node takes tokens in
  batches (:func:`batch_size`: one for slow domains, up to a tenth of a second's
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
  other nodes get their turn.  The reserve also covers the pooled connection's
  idle life: in cluster mode the outbound pool closes idle connections after
  :data:`CLUSTER_POOL_IDLE_S`, before the lease goes back, so the peer never sees
  more than ``max_connections`` sessions from the whole cluster.  A refused ask is
  repeated every :data:`SLOT_RETRY_S` while the domain has demand (no event
  crosses nodes when a remote lease ends).  ``try_acquire_connection`` also says
  "not yet" while the domain's token ask is out, so a slot is never taken just to
  be handed back.
* **Breakers**: a shared record per non-Closed domain, mirrored here by
  :class:`~empath.cluster.breakers.BreakerMirror` (``view.breakers``; its module doc
  says how trips and the Half-Open probe are shared).
* **Fallback**: when a call fails the node switches to a
  :class:`~empath.policy.state.LocalPolicyState` whose rates and connection caps
  are divided by the last known number of live nodes, and switches back when the
  node's loop reaches Redis again.  Breakers known to be Open stay Open locally
  until their end.  Connection leases taken in fallback are local only; leases
  taken from Redis stay counted there until released or expired, so the shared
  count is never too low after Redis comes back.  An ask that fails after the
  node came back from fallback (sent in an older *epoch*) does not send it back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from empath.clock import Clock
from empath.cluster.asks import (
    AcquireSlots,
    Ask,
    ClaimProbe,
    CountFailure,
    ProbeOutcome,
    ReleaseSlots,
    TakeTokens,
)
from empath.cluster.breakers import ASK_WAIT_S, BreakerMirror
from empath.policy.breaker import TransitionCallback
from empath.policy.ratelimit import GRANTED, RateDecision, RateLimit, Wait
from empath.policy.state import LocalPolicyState, PolicySettings, PolicySnapshot

TOKEN_HOLD_S: Final = 1.0  # unspent batch tokens are dropped after this
BATCH_HORIZON_S: Final = 0.1  # a batch is at most this much of the domain's rate
MAX_BATCH: Final = 64
RESERVE_IDLE_S: Final = 0.3  # an unused reserved lease goes back to Redis after this
CLUSTER_POOL_IDLE_S: Final = 0.1  # cluster mode: idle outbound connections close (< above)
LEASE_REUSE_S: Final = 2.0  # a lease older than this is given back, not reused
SLOT_RETRY_S: Final = 0.05  # refused slot ask: ask again after this, while in demand
DEMAND_S: Final = 6.0  # a domain is "in demand" this long after the scheduler asked

Waker = Callable[[str], None]


# --- the view's own state ------------------------------------------------------------


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


class ClusterView:
    """A node's mirror of the shared policy state; see module doc."""

    def __init__(
        self,
        clock: Clock,
        settings: PolicySettings,
        *,
        member_prefix: str,
        lease_s: float,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        self.clock = clock
        self._mono = clock.monotonic
        self.member_prefix = member_prefix
        self.lease_s = lease_s
        self._default = settings.default_rate
        self._overrides = {d.lower(): r for d, r in settings.rate_overrides.items()}
        self._on_transition = on_transition
        self._waker: Waker | None = None
        self._notify: Callable[[], None] | None = None
        self.asks: list[Ask] = []  # the outbox: taken by the asker (take_asks)
        self._domains: dict[str, _Domain] = {}
        self._members = itertools.count(1)
        self._rate_limited: dict[str, int] = {}
        # fallback
        self.node_count = 1  # last known live nodes (this one included)
        self.fallback = False
        self.fallback_since = 0.0
        self.fallback_entries = 0
        self.local: LocalPolicyState | None = None  # the fallback's state
        self.epoch = 0  # + 1 at each return from fallback
        self.contended: set[str] = set()  # domains another node waits for (node loop)
        self.breakers = BreakerMirror(self, settings.breaker, on_transition)

    # -- wiring -------------------------------------------------------------------------

    def set_waker(self, waker: Waker) -> None:
        """``waker(domain)``: re-check that domain's line now (the runner's wake)."""
        self._waker = waker

    def set_notify(self, notify: Callable[[], None]) -> None:
        """``notify()``: an ask joined the outbox (the asker's doorbell)."""
        self._notify = notify

    def take_asks(self) -> list[Ask]:
        """Empty the outbox."""
        asks = self.asks
        self.asks = []
        return asks

    def reconfigure(self, settings: PolicySettings) -> None:
        self.breakers.settings = settings.breaker
        self._default = settings.default_rate
        self._overrides = {d.lower(): r for d, r in settings.rate_overrides.items()}
        if self.local is not None:
            self.local.reconfigure(self._scaled_settings())

    def limit_for(self, domain: str) -> RateLimit:
        return self._overrides.get(domain, self._default)

    # -- circuit breaker ----------------------------------------------------------------

    # -- rate limit ---------------------------------------------------------------------

    def acquire_token(self, domain: str) -> RateDecision:
        if self.local is not None:
            return self.local.acquire_token(domain)
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

    # -- connection slots ---------------------------------------------------------------

    def try_acquire_connection(self, domain: str, max_connections: int) -> bool:
        d = self._dom(domain)
        now = self._mono()
        d.demand_at = now
        if self.local is not None:
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
        """End of a delivery: its lease goes to the reserve; :meth:`sweep` gives it back
        to Redis after :data:`RESERVE_IDLE_S`, so the lease outlives the pooled
        connection's idle time (``CLUSTER_POOL_IDLE_S``)."""
        d = self._domains.get(domain)
        if d is None or not d.in_use:
            return
        lease = d.in_use.pop()
        if lease.member and self.local is None:
            d.reserve.append((lease, self._mono()))
        # a local (fallback) slot is just forgotten; a Redis lease held across the
        # fallback expires in Redis by itself

    def connections(self, domain: str) -> int:
        d = self._domains.get(domain)
        return 0 if d is None else len(d.in_use)

    # -- housekeeping -------------------------------------------------------------------

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
        if self.local is not None:
            self.local.prune()

    def sweep(self) -> None:
        """Give idle or old reserved leases back to Redis (called by the node's loop)."""
        if self.local is not None:
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
                self.ask(ReleaseSlots(domain, tuple(give), self.epoch))

    def held_leases(self) -> dict[str, list[str]]:
        """Every Redis lease this node holds (in use or reserved), for renewal."""
        out: dict[str, list[str]] = {}
        for domain, d in self._domains.items():
            members = [x.member for x in d.in_use if x.member]
            members += [x.member for x, _ in d.reserve]
            if members:
                out[domain] = members
        return out

    def forget_leases(self) -> dict[str, list[str]]:
        """Shutting down: every Redis lease held, forgotten here (to give back)."""
        held = self.held_leases()
        self._domains.clear()
        return held

    def snapshot(self) -> PolicySnapshot:
        local = self.local.snapshot().breakers if self.local is not None else {}
        return PolicySnapshot(
            breakers=self.breakers.infos(local),
            rate_limited_total=dict(self._rate_limited),
            connections={k: len(d.in_use) for k, d in self._domains.items() if d.in_use},
        )

    # -- fallback -----------------------------------------------------------------------

    def enter_fallback(self) -> bool:
        """Redis cannot be reached: local limits from now on.  False if already so."""
        if self.local is not None:
            return False
        self.fallback = True
        self.fallback_since = self._mono()
        self.fallback_entries += 1
        self.local = LocalPolicyState(
            self.clock, self._scaled_settings(), on_transition=self._on_transition
        )
        self.breakers.fallback_entered()
        for domain, d in self._domains.items():
            d.reserve.clear()
            d.asking_slots = d.asking_tokens = False
            d.tokens = 0
            d.next_token_at = 0.0
            self.wake(domain)
        return True

    def leave_fallback(self) -> float | None:
        """Redis answers again: shared state resumes.  The seconds spent in fallback,
        or None if there was none."""
        if self.local is None:
            return None
        seconds = self._mono() - self.fallback_since
        self.local = None
        self.fallback = False
        self.epoch += 1
        for domain in list(self._domains):
            self.wake(domain)
        return seconds

    def _scaled_settings(self) -> PolicySettings:
        n = max(1, self.node_count)
        return PolicySettings(
            self.breakers.settings,
            scaled(self._default, n),
            {d: scaled(r, n) for d, r in self._overrides.items()},
        )

    # -- the answers to asks (from the asker) -------------------------------------------

    def tokens_answered(self, ask: TakeTokens, got: int, wait_s: float) -> None:
        d = self._domains.get(ask.domain)
        if d is None:
            return
        d.asking_tokens = False
        if self.local is not None:
            return
        now = self._mono()
        if got > 0:
            d.tokens = (d.tokens if now < d.tokens_expire else 0) + got
            d.tokens_expire = now + TOKEN_HOLD_S
            d.next_token_at = 0.0
        else:
            d.next_token_at = now + wait_s

    def slots_answered(self, ask: AcquireSlots, added: int) -> float | None:
        """``added`` of the asked leases were granted.  Returns the seconds after which
        to call :meth:`retry_slots` (the ask was refused), or None."""
        got = ask.members[:added]
        if self.local is not None:
            d = self._domains.get(ask.domain)
            if d is not None:
                d.asking_slots = False
            if got:
                self.ask(ReleaseSlots(ask.domain, got, self.epoch))
            return None
        d = self._dom(ask.domain)
        d.asking_slots = False
        now = self._mono()
        for member in got:
            d.reserve.append((_Lease(member, now), now))
        if got:
            return None
        d.slot_retry_at = now + SLOT_RETRY_S
        return SLOT_RETRY_S

    def retry_slots(self, domain: str) -> None:
        """The retry time of a refused slot ask has come."""
        d = self._domains.get(domain)
        if d is None or self.local is not None or d.asking_slots:
            return
        if self._mono() - d.demand_at < DEMAND_S and not d.reserve:
            # The retry time has come, whatever the clock says: a timer may fire a hair
            # before it, and a "not yet" then would end the polling until the
            # scheduler's own re-check seconds later.
            d.slot_retry_at = 0.0
            self.wake(domain)  # the scheduler asks again (and so do we)

    def ask_failed(self, ask: Ask) -> bool:
        """The ask got no answer (Redis unreachable, or a bug): forget it was out.
        True when the node should enter fallback (the ask is of the current epoch)."""
        if isinstance(ask, TakeTokens | AcquireSlots):
            d = self._domains.get(ask.domain)
            if d is not None:
                if isinstance(ask, TakeTokens):
                    d.asking_tokens = False
                else:
                    d.asking_slots = False
        elif isinstance(ask, ClaimProbe):
            self.breakers.claim_failed(ask.domain)
        return ask.epoch == self.epoch

    # -- internals ----------------------------------------------------------------------

    def wake(self, domain: str) -> None:
        if self._waker is not None:
            self._waker(domain)

    def new_member(self, kind: str = "") -> str:
        """A new name for a lease (``kind`` ""), a probe claim ("p") or a failure ("f")."""
        return f"{self.member_prefix}{kind}{next(self._members)}"

    def ask(self, ask: Ask) -> None:
        """Put ``ask`` in the outbox and ring the asker."""
        self.asks.append(ask)
        if self._notify is not None:
            self._notify()

    def _ask_tokens(self, domain: str, d: _Domain, limit: RateLimit) -> None:
        d.asking_tokens = True
        self.ask(
            TakeTokens(
                domain, limit.messages_per_second, limit.burst_size, batch_size(limit),
                self.epoch,
            )
        )  # fmt: skip

    def _ask_slots(self, domain: str, d: _Domain, max_connections: int) -> None:
        d.asking_slots = True
        held = len(d.in_use) + len(d.reserve)
        want = max(1, min(held, 8, max_connections - held))
        members = tuple(self.new_member() for _ in range(want))
        self.ask(AcquireSlots(domain, max_connections, self.lease_s, members, self.epoch))

    def _dom(self, domain: str) -> _Domain:
        d = self._domains.get(domain)
        if d is None:
            d = self._domains[domain] = _Domain()
        return d


__all__ = [
    "AcquireSlots",
    "Ask",
    "ClaimProbe",
    "ClusterView",
    "CountFailure",
    "ProbeOutcome",
    "ReleaseSlots",
    "TakeTokens",
    "batch_size",
    "scaled",
]
