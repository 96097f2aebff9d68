"""A cluster node's mirror of the shared circuit breakers (DESIGN §11): pure.

Part of the node's local view (cluster/view.py, whose module doc has the whole
picture).  A breaker that is not Closed has a shared record in Redis; this node keeps
a mirror of each (:class:`_Mirror`), refreshed by the node's loop (:meth:`BreakerMirror.apply`)
and by the answers to its own asks.  Failures are counted in Redis, so a trip on any
node opens the breaker for all, and the node whose script call made a transition
reports it (``on_transition``), so it is logged once in the cluster.  The Half-Open
probe is claimed atomically in Redis (:class:`~empath.cluster.asks.ClaimProbe`), so
exactly one node probes; the claim is a lease the holder's loop renews while its probe
runs (:meth:`BreakerMirror.held_probes`), so a SIGKILLed holder's claim lapses within
a lease and another node probes.  In fallback the local breaker of the view's
:class:`~empath.policy.state.LocalPolicyState` decides, except that a breaker known to
be Open stays Open until its end.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from empath.cluster.asks import BreakerRecord, ClaimProbe, CountFailure, ProbeOutcome
from empath.policy.breaker import (
    ADMIT,
    Admit,
    BreakerDecision,
    BreakerInfo,
    BreakerSettings,
    BreakerState,
    BreakerTransition,
    Deny,
    TransitionCallback,
)

if TYPE_CHECKING:
    from empath.cluster.view import ClusterView

ASK_WAIT_S: Final = 1.0  # "look again" while an ask is out (its completion wakes earlier)

SHARED_STATE: Final = {
    "closed": BreakerState.CLOSED,
    "open": BreakerState.OPEN,
    "half": BreakerState.HALF_OPEN,
}


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


class BreakerMirror:
    """The shared breakers as this node knows them; see module doc."""

    def __init__(
        self,
        view: ClusterView,
        settings: BreakerSettings,
        on_transition: TransitionCallback | None,
    ) -> None:
        self._view = view  # its fallback state, outbox, epoch and waker
        self._mono = view.clock.monotonic
        self.settings = settings
        self._on_transition = on_transition
        self._mirror: dict[str, _Mirror] = {}
        self._claiming: set[str] = set()
        self._probe_ready: dict[str, int] = {}  # domain -> ticket claimed, not handed out
        self._probe_out: dict[str, float] = {}  # domain -> deadline of our probe in flight
        self._tickets: dict[int, _Ticket] = {}
        self._ticket_ids = itertools.count(1)
        self._trips: dict[str, int] = {}

    def allow(self, domain: str) -> BreakerDecision:
        now = self._mono()
        m = self._mirror.get(domain)
        if m is not None and m.state is BreakerState.OPEN and now < m.open_until:
            return Deny(m.open_until, BreakerState.OPEN)
        if self._view.local is not None:
            d = self._view.local.breaker_allow(domain)
            if isinstance(d, Admit) and d.probe:
                return Admit(self._new_ticket(_Ticket(domain, "", d.probe)))
            return d
        if m is None:
            return ADMIT
        ticket = self._probe_ready.pop(domain, None)
        if ticket is not None:
            self._probe_out[domain] = now + self.settings.probe_timeout_s
            return Admit(ticket)
        out = self._probe_out.get(domain)
        if out is not None and now < out:
            return Deny(out, BreakerState.HALF_OPEN)
        if m.busy_until > now:
            return Deny(m.busy_until, BreakerState.HALF_OPEN)
        if domain not in self._claiming:
            self._claiming.add(domain)
            token = self._view.new_member("p")
            self._view.ask(ClaimProbe(domain, token, self._view.lease_s, self._view.epoch))
        return Deny(now + ASK_WAIT_S, BreakerState.HALF_OPEN)

    def success(self, domain: str, probe: int) -> None:
        t = self._tickets.pop(probe, None) if probe else None
        if t is None:
            return  # a Closed-state success: nothing shared to record
        if not t.token:
            if self._view.local is not None:
                self._view.local.breaker_success(domain, t.local)
            return
        self._probe_out.pop(domain, None)
        self._ask_outcome(domain, t.token, success=True)

    def failure(self, domain: str, probe: int) -> None:
        t = self._tickets.pop(probe, None) if probe else None
        if t is not None and not t.token:
            if self._view.local is not None:
                self._view.local.breaker_failure(domain, t.local)
            return
        if t is not None:
            self._probe_out.pop(domain, None)
        if self._view.local is not None:
            self._view.local.breaker_failure(domain, 0)
            return
        s = self.settings
        self._view.ask(
            CountFailure(
                domain, self._view.new_member("f"),
                t.token if t is not None else "",
                s.failure_threshold, s.failure_window_s, s.timeout_s, self._view.epoch,
            )
        )  # fmt: skip

    def release(self, domain: str, probe: int) -> None:
        t = self._tickets.pop(probe, None) if probe else None
        if t is None:
            return
        if not t.token:
            if self._view.local is not None:
                self._view.local.breaker_release(domain, t.local)
            return
        self._probe_out.pop(domain, None)
        self._ask_outcome(domain, t.token, success=False)

    def state(self, domain: str) -> BreakerState:
        m = self._mirror.get(domain)
        if m is not None:
            if m.state is BreakerState.OPEN and self._mono() < m.open_until:
                return BreakerState.OPEN
            return BreakerState.HALF_OPEN
        if self._view.local is not None:
            return self._view.local.breaker_state(domain)
        return BreakerState.CLOSED

    def local_reset(self, domain: str) -> BreakerState:
        """Operator reset, the fallback breaker's part (before Redis is asked)."""
        return (
            self._view.local.breaker.reset(domain)
            if self._view.local is not None
            else BreakerState.CLOSED
        )

    def local_probe(self, domain: str) -> BreakerState | None:
        """Operator probe in fallback (None: ask Redis)."""
        local = self._view.local
        return local.breaker.probe_now(domain) if local is not None else None

    def reset_answered(self, domain: str, shared: BreakerState) -> None:
        """Redis closed the shared breaker (it was ``shared``)."""
        self._mirror.pop(domain, None)
        self._probe_ready.pop(domain, None)
        self._probe_out.pop(domain, None)
        if shared is not BreakerState.CLOSED:
            self._transition(domain, shared, BreakerState.CLOSED)
        self._view.wake(domain)

    def probe_answered(self, domain: str, old: BreakerState) -> None:
        """Redis made the shared breaker Half-Open (it was ``old``)."""
        if old is BreakerState.OPEN:
            now = self._mono()
            self._mirror[domain] = _Mirror(BreakerState.HALF_OPEN, now, 0.0, now)
            self._transition(domain, BreakerState.OPEN, BreakerState.HALF_OPEN)
            self._view.wake(domain)

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

    def apply(self, records: Mapping[str, BreakerRecord], asked_at: float) -> None:
        """Replace the mirror with Redis's view read at ``asked_at`` (monotonic)."""
        now = self._mono()
        for domain, old in list(self._mirror.items()):
            if domain not in records and old.updated_at <= asked_at:
                del self._mirror[domain]
                self._view.wake(domain)
        for domain, rec in records.items():
            m = self._mirror.get(domain)
            if m is not None and m.updated_at > asked_at:
                continue  # a local transition newer than this read
            state = BreakerState.HALF_OPEN if rec.half_open else BreakerState.OPEN
            new = _Mirror(state, now + rec.open_left_s, now + rec.probe_left_s, asked_at)
            if m is None or m.state is not state:
                self._view.wake(domain)
            self._mirror[domain] = new

    def claim_answered(self, ask: ClaimProbe, code: int, left_s: float, moved: bool) -> None:
        """Redis's answer to a probe claim: 0 Closed, 1 ours, -1 still Open for
        ``left_s``, else another node's probe is out for ``left_s``."""
        self._claiming.discard(ask.domain)
        if self._view.local is not None:
            if code == 1:  # not ours to use any more: give it back as a failed probe
                self._ask_outcome(ask.domain, ask.token, success=False)
            return
        now = self._mono()
        domain = ask.domain
        if moved:
            self._transition(domain, BreakerState.OPEN, BreakerState.HALF_OPEN)
        if code == 0:
            self._mirror.pop(domain, None)
        elif code == 1:
            self._mirror[domain] = _Mirror(BreakerState.HALF_OPEN, now, 0.0, now)
            self._probe_ready[domain] = self._new_ticket(_Ticket(domain, ask.token, 0))
        elif code == -1:
            self._mirror[domain] = _Mirror(BreakerState.OPEN, now + left_s, 0.0, now)
        else:
            self._mirror[domain] = _Mirror(BreakerState.HALF_OPEN, now, now + left_s, now)

    def outcome_answered(self, ask: ProbeOutcome, closed: bool) -> None:
        if closed:
            self._mirror.pop(ask.domain, None)
            self._transition(ask.domain, BreakerState.HALF_OPEN, BreakerState.CLOSED)

    def failure_answered(self, ask: CountFailure, code: int, open_s: float) -> None:
        """0: counted; 1: this failure opened the breaker; else: the probe failed."""
        if code == 0:
            return
        now = self._mono()
        domain = ask.domain
        self._mirror[domain] = _Mirror(BreakerState.OPEN, now + open_s, 0.0, now)
        self._trips[domain] = self._trips.get(domain, 0) + 1
        old = BreakerState.CLOSED if code == 1 else BreakerState.HALF_OPEN
        self._transition(domain, old, BreakerState.OPEN)

    def _new_ticket(self, t: _Ticket) -> int:
        ticket = next(self._ticket_ids)
        self._tickets[ticket] = t
        return ticket

    def _ask_outcome(self, domain: str, token: str, *, success: bool) -> None:
        threshold = self.settings.success_threshold
        self._view.ask(ProbeOutcome(domain, token, success, threshold, self._view.epoch))

    def _transition(self, domain: str, old: BreakerState, new: BreakerState) -> None:
        if self._on_transition is not None:
            self._on_transition(
                BreakerTransition(domain, old, new, self._mono(), self._trips.get(domain, 0))
            )

    def claim_failed(self, domain: str) -> None:
        """A probe claim got no answer: it may be asked again."""
        self._claiming.discard(domain)

    def fallback_entered(self) -> None:
        """Claims not handed out, or still out, are the local breaker's business now."""
        self._probe_ready.clear()
        self._claiming.clear()

    def infos(self, local: Mapping[str, BreakerInfo]) -> dict[str, BreakerInfo]:
        """Every breaker that is not Closed or has tripped, for the snapshot: the shared
        ones over ``local`` (the fallback breaker's)."""
        now = self._mono()
        breakers = dict(local)
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
        return breakers


__all__ = ["ASK_WAIT_S", "SHARED_STATE", "BreakerMirror"]
