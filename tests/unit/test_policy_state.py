"""The in-process PolicyState and the purity rule for policy/ and the queue decision code."""

from __future__ import annotations

from empath.policy.breaker import Admit, BreakerState, BreakerTransition
from empath.policy.ratelimit import GRANTED, RateLimit, Wait
from empath.policy.state import ConnectionSlots, LocalPolicyState, PolicySettings, PolicyState
from empath.testing.clock import FakeClock
from empath.testing.settings import breaker_settings

D = "example.com"


def make() -> tuple[LocalPolicyState, FakeClock, list[BreakerTransition]]:
    clock = FakeClock()
    events: list[BreakerTransition] = []
    state = LocalPolicyState(
        clock,
        PolicySettings(
            breaker_settings(failure_threshold=2),
            RateLimit(1.0, 2),
            {"fast.org": RateLimit(100.0, 50)},
        ),
        on_transition=events.append,
    )
    return state, clock, events


def test_local_state_satisfies_the_protocol() -> None:
    state: PolicyState = make()[0]
    assert BreakerState.CLOSED == state.breaker_state(D)


def test_connection_slots_cap_and_release() -> None:
    slots = ConnectionSlots()
    assert [True, True, False] == [slots.try_acquire(D, 2) for _ in range(3)]
    assert 2 == slots.count(D)
    slots.release(D)
    assert slots.try_acquire(D, 2)
    slots.release(D)
    slots.release(D)
    slots.release(D)  # a double release never goes negative
    assert 0 == slots.count(D)
    assert {} == slots.counts()


def test_local_state_delegates_breaker_rate_and_connections() -> None:
    state, clock, events = make()
    assert GRANTED == state.acquire_token(D)
    assert GRANTED == state.acquire_token(D)
    assert isinstance(state.acquire_token(D), Wait)
    state.note_rate_limited(D)
    assert state.try_acquire_connection(D, 1)
    assert not state.try_acquire_connection(D, 1)
    assert 1 == state.connections(D)
    state.breaker_failure(D, 0)
    state.breaker_failure(D, 0)
    assert BreakerState.OPEN == state.breaker_state(D)
    assert ["Circuit breaker OPENED for example.com"] == [e.message for e in events]
    snap = state.snapshot()
    assert {D: 1} == dict(snap.rate_limited_total)
    assert {D: 1} == dict(snap.connections)
    assert 1 == snap.breakers[D].trips_total
    clock.advance(300.0)
    admit = state.breaker_allow(D)
    assert isinstance(admit, Admit)
    state.breaker_release(D, admit.probe)
    assert isinstance(state.breaker_allow(D), Admit)


def test_reconfigure_applies_new_limits() -> None:
    state, _clock, _ = make()
    state.reconfigure(PolicySettings(breaker_settings(failure_threshold=9), RateLimit(5.0, 1), {}))
    assert RateLimit(5.0, 1) == state.limiter.limit_for("fast.org")
    assert 9 == state.breaker.settings.failure_threshold
