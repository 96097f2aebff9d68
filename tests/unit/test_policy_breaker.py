"""Per-domain circuit breaker (DESIGN §4), in virtual time."""

from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as st

from empath.policy.breaker import (
    ADMIT,
    Admit,
    BreakerSettings,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    Deny,
    states_by_domain,
)
from empath.testing.clock import FakeClock
from empath.testing.settings import breaker_settings

D = "example.com"


def make(
    threshold: int = 3,
    window: float = 60.0,
    timeout: float = 300.0,
    successes: int = 1,
    probe_timeout: float = 900.0,
) -> tuple[CircuitBreaker, FakeClock, list[BreakerTransition]]:
    clock = FakeClock()
    events: list[BreakerTransition] = []
    breaker = CircuitBreaker(
        BreakerSettings(threshold, window, timeout, successes, probe_timeout),
        clock,
        events.append,
    )
    return breaker, clock, events


def messages(events: list[BreakerTransition]) -> list[str]:
    return [e.message for e in events]


def trip(breaker: CircuitBreaker, n: int = 3) -> None:
    for _ in range(n):
        breaker.record_failure(D)


def test_closed_breaker_admits_everything() -> None:
    breaker, _clock, events = make()
    assert ADMIT == breaker.allow(D)
    assert BreakerState.CLOSED == breaker.state(D)
    assert [] == events


def test_threshold_failures_within_window_open_the_breaker_and_count_a_trip() -> None:
    breaker, clock, events = make(threshold=3)
    trip(breaker, 2)
    assert BreakerState.CLOSED == breaker.state(D)
    clock.advance(10)
    breaker.record_failure(D)
    assert BreakerState.OPEN == breaker.state(D)
    assert 1 == breaker.trips_total(D)
    assert ["Circuit breaker OPENED for example.com"] == messages(events)
    assert logging.ERROR == events[0].log_level
    assert {"domain": D, "state": "Open", "trips_total": 1} == events[0].log_fields()
    assert (BreakerState.CLOSED, BreakerState.OPEN) == (events[0].old, events[0].new)


def test_open_breaker_denies_until_timeout() -> None:
    breaker, clock, _ = make(timeout=300.0)
    t0 = clock.monotonic()
    trip(breaker)
    assert Deny(t0 + 300.0, BreakerState.OPEN) == breaker.allow(D)
    clock.advance(299.9)
    assert isinstance(breaker.allow(D), Deny)


def test_failures_outside_the_window_do_not_count() -> None:
    breaker, clock, _ = make(threshold=3, window=60.0)
    breaker.record_failure(D)
    clock.advance(40)
    breaker.record_failure(D)
    clock.advance(40)  # first failure is now 80 s old
    breaker.record_failure(D)
    assert BreakerState.CLOSED == breaker.state(D)
    clock.advance(10)  # failures at 40, 80, 90: within 60 s of each other
    breaker.record_failure(D)
    assert BreakerState.OPEN == breaker.state(D)


def test_permanent_outcomes_never_count() -> None:
    """5xx outcomes are reported with release(), which never moves a Closed breaker."""
    breaker, _clock, events = make(threshold=1)
    for _ in range(10):
        assert ADMIT == breaker.allow(D)
        breaker.release(D)
    assert BreakerState.CLOSED == breaker.state(D)
    assert [] == events


def test_domains_are_independent() -> None:
    breaker, _clock, _ = make(threshold=2)
    trip(breaker, 2)
    assert BreakerState.OPEN == breaker.state(D)
    assert ADMIT == breaker.allow("other.org")


def test_half_open_is_entered_lazily_and_admits_exactly_one_probe() -> None:
    breaker, clock, events = make(timeout=300.0)
    trip(breaker)
    clock.advance(300.0)
    first = breaker.allow(D)
    assert isinstance(first, Admit)
    assert first.probe > 0
    assert BreakerState.HALF_OPEN == breaker.state(D)
    assert "Circuit breaker HALF-OPEN for example.com" == events[-1].message
    for _ in range(5):
        assert isinstance(breaker.allow(D), Deny)
    assert breaker.probe_in_flight(D)


def test_probe_success_closes_the_breaker() -> None:
    breaker, clock, events = make()
    trip(breaker)
    clock.advance(300.0)
    probe = breaker.allow(D)
    assert isinstance(probe, Admit)
    breaker.record_success(D, probe.probe)
    assert BreakerState.CLOSED == breaker.state(D)
    assert ADMIT == breaker.allow(D)
    assert [
        "Circuit breaker OPENED for example.com",
        "Circuit breaker HALF-OPEN for example.com",
        "Circuit breaker CLOSED for example.com",
    ] == messages(events)


def test_success_threshold_above_one_needs_that_many_probes_one_at_a_time() -> None:
    breaker, clock, _ = make(successes=3)
    trip(breaker)
    clock.advance(300.0)
    for i in range(3):
        probe = breaker.allow(D)
        assert isinstance(probe, Admit), i
        assert isinstance(breaker.allow(D), Deny)  # still one at a time
        assert BreakerState.HALF_OPEN == breaker.state(D)
        breaker.record_success(D, probe.probe)
    assert BreakerState.CLOSED == breaker.state(D)


def test_probe_failure_reopens_and_counts_a_new_trip() -> None:
    breaker, clock, events = make(timeout=300.0)
    trip(breaker)
    clock.advance(300.0)
    probe = breaker.allow(D)
    assert isinstance(probe, Admit)
    breaker.record_failure(D, probe.probe)
    assert BreakerState.OPEN == breaker.state(D)
    assert 2 == breaker.trips_total(D)
    assert Deny(clock.monotonic() + 300.0, BreakerState.OPEN) == breaker.allow(D)
    assert "Circuit breaker OPENED for example.com" == events[-1].message
    assert 2 == events[-1].trips_total


def test_released_probe_frees_the_slot_without_counting() -> None:
    breaker, clock, _ = make()
    trip(breaker)
    clock.advance(300.0)
    probe = breaker.allow(D)
    assert isinstance(probe, Admit)
    breaker.release(D, probe.probe)  # e.g. the probe got a 5xx
    assert BreakerState.HALF_OPEN == breaker.state(D)
    assert isinstance(breaker.allow(D), Admit)


def test_stale_outcomes_from_before_the_trip_do_not_move_a_half_open_breaker() -> None:
    breaker, clock, _ = make()
    trip(breaker)
    clock.advance(300.0)
    probe = breaker.allow(D)
    assert isinstance(probe, Admit)
    breaker.record_success(D)  # a delivery admitted while Closed finishes late
    breaker.record_failure(D)
    assert BreakerState.HALF_OPEN == breaker.state(D)
    assert isinstance(breaker.allow(D), Deny)  # the probe slot is still taken


def test_a_lost_probe_is_replaced_after_probe_timeout() -> None:
    breaker, clock, _ = make(probe_timeout=600.0)
    trip(breaker)
    clock.advance(300.0)
    lost = breaker.allow(D)
    assert isinstance(lost, Admit)
    deny = breaker.allow(D)
    assert Deny(clock.monotonic() + 600.0, BreakerState.HALF_OPEN) == deny
    clock.advance(600.0)
    fresh = breaker.allow(D)
    assert isinstance(fresh, Admit)
    assert lost.probe != fresh.probe
    breaker.record_success(D, lost.probe)  # late answer of the lost probe: ignored
    assert BreakerState.HALF_OPEN == breaker.state(D)
    breaker.record_success(D, fresh.probe)
    assert BreakerState.CLOSED == breaker.state(D)


def test_failures_while_open_are_ignored() -> None:
    breaker, clock, _ = make()
    t0 = clock.monotonic()
    trip(breaker)
    trip(breaker, 10)
    assert 1 == breaker.trips_total(D)
    assert Deny(t0 + 300.0, BreakerState.OPEN) == breaker.allow(D)


def test_snapshot_reports_state_and_trips_per_domain_with_gauge_values() -> None:
    breaker, clock, _ = make(threshold=1)
    breaker.record_failure(D)
    breaker.record_failure("b.org")
    clock.advance(300.0)
    probe = breaker.allow("b.org")
    assert isinstance(probe, Admit)
    breaker.record_success("b.org", probe.probe)
    snap = breaker.snapshot()
    assert {"example.com": BreakerState.HALF_OPEN, "b.org": BreakerState.CLOSED} == (
        states_by_domain(snap)
    )
    assert 1 == snap["b.org"].trips_total
    assert (0, 1, 2) == tuple(
        s.gauge_value for s in (BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN)
    )
    assert ("Closed", "Open", "HalfOpen") == tuple(s.value for s in BreakerState)


def test_prune_forgets_quiet_closed_domains_but_keeps_trip_counts() -> None:
    breaker, clock, _ = make(threshold=1, window=60.0)
    breaker.record_failure(D)
    clock.advance(300.0)
    probe = breaker.allow(D)
    assert isinstance(probe, Admit)
    breaker.record_success(D, probe.probe)
    assert 1 == breaker.prune()
    assert 0 == len(breaker)
    assert 1 == breaker.snapshot()[D].trips_total


def test_reconfigure_keeps_open_state() -> None:
    breaker, _clock, _ = make(threshold=2)
    trip(breaker, 2)
    breaker.reconfigure(breaker_settings(failure_threshold=10))
    assert BreakerState.OPEN == breaker.state(D)
    assert 10 == breaker.settings.failure_threshold


# -- property: never two probes in flight ------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("allow"), st.sampled_from(["a", "b"])),
        st.tuples(st.just("success"), st.integers(0, 5)),
        st.tuples(st.just("failure"), st.integers(0, 5)),
        st.tuples(st.just("release"), st.integers(0, 5)),
        st.tuples(st.just("plain_failure"), st.sampled_from(["a", "b"])),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 10.0, 100.0, 400.0])),
    ),
    max_size=120,
)


@given(OPS, st.integers(1, 3), st.integers(1, 3))
def test_property_never_two_probes_in_flight(
    ops: list[tuple[str, object]], threshold: int, successes: int
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        BreakerSettings(threshold, 60.0, 300.0, successes, probe_timeout_s=1e12), clock
    )
    outstanding: list[tuple[str, int]] = []  # admitted probes not yet reported
    for op, arg in ops:
        if op == "allow":
            assert isinstance(arg, str)
            decision = breaker.allow(arg)
            if isinstance(decision, Admit) and decision.probe:
                outstanding.append((arg, decision.probe))
        elif op == "advance":
            assert isinstance(arg, float)
            clock.advance(arg)
        elif op == "plain_failure":
            assert isinstance(arg, str)
            breaker.record_failure(arg)
        elif outstanding:
            assert isinstance(arg, int)
            domain, ticket = outstanding.pop(arg % len(outstanding))
            if op == "success":
                breaker.record_success(domain, ticket)
            elif op == "failure":
                breaker.record_failure(domain, ticket)
            else:
                breaker.release(domain, ticket)
        for domain in ("a", "b"):
            mine = [t for d, t in outstanding if d == domain]
            assert len(mine) <= 1
            if mine:  # an outstanding probe means Half-Open with that probe in flight
                assert BreakerState.HALF_OPEN == breaker.state(domain)
                assert breaker.probe_in_flight(domain)


def test_repr_counts_domains_by_state_and_trips() -> None:
    breaker, _clock, _ = make(threshold=2, window=30.0)
    assert "<CircuitBreaker domains=0 open=0 half_open=0 trips=0 threshold=2/30s>" == repr(breaker)
    trip(breaker, 2)
    breaker.record_failure("other.org")
    assert "<CircuitBreaker domains=2 open=1 half_open=0 trips=1 threshold=2/30s>" == repr(breaker)
