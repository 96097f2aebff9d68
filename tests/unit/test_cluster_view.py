"""A cluster node's local view (cluster/view.py, cluster/breakers.py) without Redis: each
question is answered from memory and what must be asked of Redis comes out as data.
Plain synchronous tests on a FakeClock; the same rules against a real redis-server are
in tests/cluster."""

from __future__ import annotations

import math

from empath.cluster.asks import (
    AcquireSlots,
    Ask,
    BreakerRecord,
    ClaimProbe,
    CountFailure,
    ProbeOutcome,
    ReleaseSlots,
    TakeTokens,
)
from empath.cluster.breakers import ASK_WAIT_S
from empath.cluster.view import (
    DEMAND_S,
    LEASE_REUSE_S,
    RESERVE_IDLE_S,
    SLOT_RETRY_S,
    TOKEN_HOLD_S,
    ClusterView,
    batch_size,
    scaled,
)
from empath.policy.breaker import Admit, BreakerState, BreakerTransition, Deny
from empath.policy.ratelimit import GRANTED, RateLimit, Wait
from empath.policy.state import PolicySettings
from empath.testing.clock import FakeClock
from empath.testing.settings import breaker_settings

UNLIMITED = RateLimit(math.inf, 1)


class Harness:
    """One view on a FakeClock; records wakes, doorbell rings and transitions."""

    def __init__(self, rate: RateLimit = UNLIMITED, **breaker: float) -> None:
        self.clock = FakeClock()
        self.transitions: list[BreakerTransition] = []
        self.view = ClusterView(
            self.clock,
            PolicySettings(breaker_settings(**breaker), rate, {}),
            member_prefix="n1/i1/",
            lease_s=5.0,
            on_transition=self.transitions.append,
        )
        self.woken: list[str] = []
        self.rings = 0
        self.view.set_waker(self.woken.append)
        self.view.set_notify(self._ring)

    def _ring(self) -> None:
        self.rings += 1

    def asks(self) -> list[Ask]:
        return self.view.take_asks()

    def slot_ask(self, domain: str = "d.test", cap: int = 1) -> AcquireSlots:
        """Ask for a slot: not yet, and one AcquireSlots ask out."""
        assert not self.view.try_acquire_connection(domain, cap)
        (ask,) = self.asks()
        assert isinstance(ask, AcquireSlots)
        return ask

    def refused_slot(self, domain: str = "d.test") -> None:
        """Ask for a slot and have Redis refuse it."""
        assert SLOT_RETRY_S == self.view.slots_answered(self.slot_ask(domain), 0)

    def lease(self, domain: str = "d.test", cap: int = 4) -> AcquireSlots:
        """Ask for a slot and have Redis grant every member asked for."""
        ask = self.slot_ask(domain, cap)
        assert self.view.slots_answered(ask, len(ask.members)) is None
        return ask


# --- tokens ------------------------------------------------------------------------


def test_an_unlimited_domain_is_granted_without_asking_redis() -> None:
    h = Harness()
    assert GRANTED == h.view.acquire_token("d.test")
    assert [] == h.asks()


def test_the_first_token_is_not_yet_and_one_batch_is_asked_for() -> None:
    limit = RateLimit(100.0, 20)
    h = Harness(limit)
    now = h.clock.monotonic()
    assert Wait(now + ASK_WAIT_S) == h.view.acquire_token("d.test")
    assert Wait(now + ASK_WAIT_S) == h.view.acquire_token("d.test")  # no second ask
    assert [TakeTokens("d.test", 100.0, 20, batch_size(limit), 0)] == h.asks()
    assert 1 == h.rings


def test_tokens_redis_granted_are_spent_locally_until_they_expire() -> None:
    h = Harness(RateLimit(1.0, 1))  # batch 1: no refill ahead of need
    h.view.acquire_token("d.test")
    (ask,) = h.asks()
    assert isinstance(ask, TakeTokens)
    h.view.tokens_answered(ask, 2, 0.0)
    assert GRANTED == h.view.acquire_token("d.test")
    h.clock.advance(TOKEN_HOLD_S)
    assert isinstance(h.view.acquire_token("d.test"), Wait)  # the second one expired
    assert [TakeTokens("d.test", 1.0, 1, 1, 0)] == h.asks()


def test_no_token_before_a_time_is_a_real_rate_limit_wait_with_no_new_ask() -> None:
    h = Harness(RateLimit(1.0, 1))
    h.view.acquire_token("d.test")
    (ask,) = h.asks()
    assert isinstance(ask, TakeTokens)
    h.view.tokens_answered(ask, 0, 0.7)
    assert Wait(h.clock.monotonic() + 0.7) == h.view.acquire_token("d.test")
    assert [] == h.asks()


def test_a_fast_domain_asks_for_its_next_batch_before_the_last_is_spent() -> None:
    limit = RateLimit(200.0, 100)
    h = Harness(limit)
    h.view.acquire_token("d.test")
    (ask,) = h.asks()
    assert isinstance(ask, TakeTokens)
    h.view.tokens_answered(ask, batch_size(limit), 0.0)
    spent = 0
    while not h.view.asks:
        assert GRANTED == h.view.acquire_token("d.test")
        spent += 1
    assert spent > batch_size(limit) // 2 - 1
    assert isinstance(h.asks()[0], TakeTokens)


def test_batch_size_is_a_tenth_of_a_second_capped_by_burst_and_64() -> None:
    assert 1 == batch_size(RateLimit(1.0, 10))
    assert 10 == batch_size(RateLimit(100.0, 50))
    assert 5 == batch_size(RateLimit(100.0, 5))
    assert 64 == batch_size(RateLimit(10_000.0, 1000))


def test_scaled_divides_a_limit_among_the_live_nodes() -> None:
    assert RateLimit(5.0, 2) == scaled(RateLimit(10.0, 4), 2)
    assert RateLimit(10.0, 4) == scaled(RateLimit(10.0, 4), 1)


# --- connection slots ----------------------------------------------------------------


def test_a_slot_is_asked_of_redis_and_its_lease_kept_in_reserve() -> None:
    h = Harness()
    ask = h.lease()
    assert ("n1/i1/1",) == ask.members
    assert 5.0 == ask.lease_s
    assert h.view.try_acquire_connection("d.test", 4)
    assert 1 == h.view.connections("d.test")
    assert {"d.test": ["n1/i1/1"]} == h.view.held_leases()


def test_a_released_lease_is_reused_without_asking_redis() -> None:
    h = Harness()
    h.lease()
    assert h.view.try_acquire_connection("d.test", 4)
    h.view.release_connection("d.test")
    assert h.view.try_acquire_connection("d.test", 4)
    assert [] == h.asks()


def test_an_idle_reserved_lease_goes_back_to_redis_at_the_sweep() -> None:
    h = Harness()
    h.lease()
    h.view.sweep()
    assert [] == h.asks()  # fresh
    h.clock.advance(RESERVE_IDLE_S + 0.01)
    h.view.sweep()
    assert [ReleaseSlots("d.test", ("n1/i1/1",), 0)] == h.asks()
    assert {} == h.view.held_leases()


def test_a_contended_domain_does_not_reuse_an_old_lease() -> None:
    h = Harness()
    h.lease()
    h.clock.advance(LEASE_REUSE_S + 0.1)
    h.view.contended = {"d.test"}
    assert not h.view.try_acquire_connection("d.test", 4)
    assert isinstance(h.asks()[0], AcquireSlots)


def test_a_refused_slot_ask_is_retried_after_slot_retry_s_while_in_demand() -> None:
    h = Harness()
    assert not h.view.try_acquire_connection("d.test", 1)
    (ask,) = h.asks()
    assert isinstance(ask, AcquireSlots)
    assert SLOT_RETRY_S == h.view.slots_answered(ask, 0)
    assert not h.view.try_acquire_connection("d.test", 1)
    assert [] == h.asks()  # not before the retry time
    h.view.retry_slots("d.test")
    assert ["d.test"] == h.woken
    assert not h.view.try_acquire_connection("d.test", 1)
    assert isinstance(h.asks()[0], AcquireSlots)


def test_a_retry_after_the_demand_ended_wakes_nobody() -> None:
    h = Harness()
    h.refused_slot()
    h.clock.advance(DEMAND_S + 1)
    h.view.retry_slots("d.test")
    assert [] == h.woken


def test_a_failed_ask_may_be_asked_again_and_says_whether_to_fall_back() -> None:
    h = Harness()
    ask = h.slot_ask()
    assert h.view.ask_failed(ask)  # of the current epoch
    h.view.try_acquire_connection("d.test", 1)
    assert isinstance(h.asks()[0], AcquireSlots)


def test_an_ask_from_before_the_last_fallback_does_not_send_the_node_back() -> None:
    h = Harness()
    ask = h.slot_ask()
    assert h.view.enter_fallback()
    assert h.view.leave_fallback() is not None
    assert not h.view.ask_failed(ask)


def test_prune_forgets_a_domain_without_demand_or_leases() -> None:
    h = Harness()
    h.refused_slot()
    h.clock.advance(DEMAND_S + 1)
    h.view.prune()
    assert {} == h.view.snapshot().connections
    assert [] == list(h.view.held_leases())


# --- fallback --------------------------------------------------------------------------


def test_fallback_caps_connections_per_node_and_asks_nothing() -> None:
    h = Harness()
    h.view.node_count = 2
    assert h.view.enter_fallback()
    assert not h.view.enter_fallback()  # once
    assert h.view.try_acquire_connection("d.test", 4)
    assert h.view.try_acquire_connection("d.test", 4)
    assert not h.view.try_acquire_connection("d.test", 4)  # 4 / 2 nodes
    assert [] == h.asks()


def test_fallback_scales_the_rate_by_the_node_count() -> None:
    h = Harness(RateLimit(10.0, 4))
    h.view.node_count = 2
    h.view.enter_fallback()
    assert [GRANTED, GRANTED] == [h.view.acquire_token("d.test") for _ in range(2)]
    assert isinstance(h.view.acquire_token("d.test"), Wait)  # burst 4 / 2 nodes


def test_slots_granted_after_the_fallback_began_are_given_back() -> None:
    h = Harness()
    h.view.try_acquire_connection("d.test", 2)
    (ask,) = h.asks()
    assert isinstance(ask, AcquireSlots)
    h.view.enter_fallback()
    assert h.view.slots_answered(ask, 1) is None
    assert [ReleaseSlots("d.test", ask.members[:1], 0)] == h.asks()


def test_leaving_fallback_wakes_every_domain_and_starts_a_new_epoch() -> None:
    h = Harness()
    h.view.try_acquire_connection("d.test", 1)
    h.view.enter_fallback()
    h.woken.clear()
    h.clock.advance(3.0)
    assert 3.0 == h.view.leave_fallback()
    assert ["d.test"] == h.woken
    assert 1 == h.view.epoch
    assert h.view.leave_fallback() is None


# --- breakers --------------------------------------------------------------------------


def open_record(open_left_s: float = 30.0) -> BreakerRecord:
    return BreakerRecord(half_open=False, open_left_s=open_left_s, probe_left_s=0.0)


def test_a_closed_breaker_admits_without_asking() -> None:
    h = Harness()
    assert isinstance(h.view.breakers.allow("d.test"), Admit)
    assert [] == h.asks()


def test_a_failure_is_counted_in_redis_and_a_trip_opens_the_mirror() -> None:
    h = Harness(failure_threshold=1)
    h.view.breakers.failure("d.test", 0)
    (ask,) = h.asks()
    assert isinstance(ask, CountFailure)
    assert ("n1/i1/f1", "") == (ask.member, ask.token)
    h.view.breakers.failure_answered(ask, 1, 30.0)
    d = h.view.breakers.allow("d.test")
    assert Deny(h.clock.monotonic() + 30.0, BreakerState.OPEN) == d
    assert [(BreakerState.CLOSED, BreakerState.OPEN)] == [(t.old, t.new) for t in h.transitions]
    assert 1 == h.view.snapshot().breakers["d.test"].trips_total


def test_an_open_breaker_past_its_end_asks_to_claim_the_probe_once() -> None:
    h = Harness()
    h.view.breakers.apply({"d.test": open_record(1.0)}, h.clock.monotonic())
    assert ["d.test"] == h.woken
    h.clock.advance(1.5)
    assert Deny(h.clock.monotonic() + ASK_WAIT_S, BreakerState.HALF_OPEN) == (
        h.view.breakers.allow("d.test")
    )
    h.view.breakers.allow("d.test")
    assert [ClaimProbe("d.test", "n1/i1/p1", 5.0, 0)] == h.asks()


def test_the_claimed_probe_is_handed_out_once_and_renewed_while_out() -> None:
    h = Harness()
    h.view.breakers.apply({"d.test": open_record(0.0)}, h.clock.monotonic())
    h.view.breakers.allow("d.test")
    (ask,) = h.asks()
    assert isinstance(ask, ClaimProbe)
    h.view.breakers.claim_answered(ask, 1, 0.0, moved=True)
    assert {"d.test": "n1/i1/p1"} == h.view.breakers.held_probes()
    probe = h.view.breakers.allow("d.test")
    assert isinstance(probe, Admit) and probe.probe
    assert isinstance(h.view.breakers.allow("d.test"), Deny)  # one probe at a time
    h.view.breakers.success("d.test", probe.probe)
    assert [ProbeOutcome("d.test", "n1/i1/p1", True, ask_threshold(h), 0)] == h.asks()


def ask_threshold(h: Harness) -> int:
    return h.view.breakers.settings.success_threshold


def test_a_probe_that_closes_the_breaker_clears_the_mirror() -> None:
    h = Harness()
    h.view.breakers.apply({"d.test": open_record(0.0)}, h.clock.monotonic())
    h.view.breakers.allow("d.test")
    (claim,) = h.asks()
    assert isinstance(claim, ClaimProbe)
    h.view.breakers.claim_answered(claim, 1, 0.0, moved=False)
    probe = h.view.breakers.allow("d.test")
    assert isinstance(probe, Admit)
    h.view.breakers.success("d.test", probe.probe)
    (outcome,) = h.asks()
    assert isinstance(outcome, ProbeOutcome)
    h.view.breakers.outcome_answered(outcome, closed=True)
    assert BreakerState.CLOSED == h.view.breakers.state("d.test")
    assert (BreakerState.HALF_OPEN, BreakerState.CLOSED) == (
        h.transitions[-1].old,
        h.transitions[-1].new,
    )


def test_another_nodes_probe_makes_this_node_wait_for_it() -> None:
    h = Harness()
    h.view.breakers.apply(
        {"d.test": BreakerRecord(half_open=True, open_left_s=0.0, probe_left_s=4.0)},
        h.clock.monotonic(),
    )
    assert Deny(h.clock.monotonic() + 4.0, BreakerState.HALF_OPEN) == (
        h.view.breakers.allow("d.test")
    )
    assert [] == h.asks()


def test_a_mirror_read_older_than_a_local_transition_is_ignored() -> None:
    h = Harness(failure_threshold=1)
    asked_at = h.clock.monotonic()
    h.clock.advance(0.1)
    h.view.breakers.failure("d.test", 0)
    (ask,) = h.asks()
    assert isinstance(ask, CountFailure)
    h.view.breakers.failure_answered(ask, 1, 30.0)
    h.view.breakers.apply({}, asked_at)  # read before the trip: still Open here
    assert BreakerState.OPEN == h.view.breakers.state("d.test")


def test_a_claim_granted_in_fallback_is_given_back_as_a_failed_probe() -> None:
    h = Harness()
    h.view.breakers.apply({"d.test": open_record(0.0)}, h.clock.monotonic())
    h.view.breakers.allow("d.test")
    (claim,) = h.asks()
    assert isinstance(claim, ClaimProbe)
    h.view.enter_fallback()
    h.view.breakers.claim_answered(claim, 1, 0.0, moved=False)
    (outcome,) = h.asks()
    assert isinstance(outcome, ProbeOutcome) and not outcome.success


def test_the_operators_reset_clears_the_mirror_and_reports_the_transition() -> None:
    h = Harness()
    h.view.breakers.apply({"d.test": open_record()}, h.clock.monotonic())
    h.view.breakers.reset_answered("d.test", BreakerState.OPEN)
    assert BreakerState.CLOSED == h.view.breakers.state("d.test")
    assert (BreakerState.OPEN, BreakerState.CLOSED) == (
        h.transitions[-1].old,
        h.transitions[-1].new,
    )
