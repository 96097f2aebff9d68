"""Per-domain token buckets (DESIGN §4 "Rate limit"), in virtual time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.policy.ratelimit import (
    GRANTED,
    RateLimit,
    RateLimiter,
    Wait,
    one_second_burst,
    resolve_limits,
)
from empath.testing.clock import FakeClock

D = "example.com"


def make(
    rate: float = 10.0, burst: int = 20, overrides: dict[str, RateLimit] | None = None
) -> tuple[RateLimiter, FakeClock]:
    clock = FakeClock()
    return RateLimiter(RateLimit(rate, burst), clock, overrides), clock


def drain(limiter: RateLimiter, domain: str = D) -> int:
    n = 0
    while limiter.try_acquire(domain) is GRANTED:
        n += 1
        assert n < 10_000
    return n


def test_bucket_starts_full_and_grants_a_burst() -> None:
    limiter, _ = make(rate=10.0, burst=20)
    assert 20 == drain(limiter)


def test_after_the_burst_the_steady_rate_applies() -> None:
    limiter, clock = make(rate=10.0, burst=20)
    drain(limiter)
    granted = 0
    for _ in range(100):  # 10 s in 0.1 s steps
        clock.advance(0.1)
        granted += drain(limiter)
    assert 100 == granted


def test_wait_says_when_the_next_token_is_due_and_spends_nothing() -> None:
    limiter, clock = make(rate=2.0, burst=1)
    assert GRANTED == limiter.try_acquire(D)
    t0 = clock.monotonic()
    assert Wait(t0 + 0.5) == limiter.try_acquire(D)
    assert Wait(t0 + 0.5) == limiter.try_acquire(D)  # asking again took nothing
    clock.advance(0.25)
    assert Wait(t0 + 0.5) == limiter.try_acquire(D)
    clock.advance(0.25)
    assert GRANTED == limiter.try_acquire(D)


def test_two_per_second_limit_admits_about_two_per_second() -> None:
    limiter, clock = make(rate=2.0, burst=1)
    granted = 0
    for _ in range(2000):  # 20 s in 10 ms steps
        granted += drain(limiter)
        clock.advance(0.01)
    assert 40 <= granted <= 41


def test_domain_override_replaces_the_default() -> None:
    limiter, _ = make(rate=10.0, burst=20, overrides={"slow.com": RateLimit(5.0, 3)})
    assert 3 == drain(limiter, "slow.com")
    assert 20 == drain(limiter, D)
    assert RateLimit(5.0, 3) == limiter.limit_for("slow.com")


def test_override_keys_are_matched_lower_cased() -> None:
    limiter, _ = make(overrides={"Slow.COM": RateLimit(1.0, 2)})
    assert 2 == drain(limiter, "slow.com")


def test_unlimited_rate_always_grants() -> None:
    limiter, _ = make(overrides={"fast.net": RateLimit(math.inf, 1)})
    for _ in range(1000):
        assert GRANTED == limiter.try_acquire("fast.net")
    assert 0 == len(limiter)  # no bucket needed


def test_deferrals_are_counted_per_domain_only_when_noted() -> None:
    limiter, _ = make(rate=1.0, burst=1)
    limiter.try_acquire(D)
    assert isinstance(limiter.try_acquire(D), Wait)
    assert 0 == limiter.deferred(D)
    limiter.note_deferred(D)
    limiter.note_deferred(D, 3)
    assert {D: 4} == limiter.deferred_totals()


def test_reconfigure_keeps_levels_capped_at_the_new_burst() -> None:
    limiter, clock = make(rate=10.0, burst=20)
    for _ in range(5):
        limiter.try_acquire(D)
    limiter.try_acquire("b.org")
    limiter.reconfigure(RateLimit(1.0, 8), {D: RateLimit(1.0, 30)})
    assert 15 == pytest.approx(limiter.tokens(D))  # level kept (not refilled to 30)
    assert 8 == pytest.approx(limiter.tokens("b.org"))  # 19 capped at 8
    clock.advance(2.0)
    assert 17 == pytest.approx(limiter.tokens(D))  # new rate: 1/s


def test_prune_drops_only_full_buckets() -> None:
    limiter, clock = make(rate=1.0, burst=2)
    limiter.try_acquire("a.org")
    limiter.try_acquire("b.org")
    limiter.try_acquire("b.org")
    clock.advance(1.0)
    assert 1 == limiter.prune()  # a.org refilled; b.org still at 1 of 2
    assert 1 == len(limiter)


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        RateLimit(0.0, 1)
    with pytest.raises(ValueError):
        RateLimit(1.0, 0)


@dataclass(frozen=True)
class DomainRateLimit:
    messages_per_second: float
    burst_size: int | None = None


def test_resolve_limits_precedence_per_minute_over_domain_limits() -> None:
    limits = resolve_limits(
        {
            "a.com": DomainRateLimit(5.0, 10),
            "b.com": DomainRateLimit(2.0),
            "C.com": DomainRateLimit(3.0, 4),
        },
        {"a.com": 120, "c.com": None, "d.com": 30},
    )
    assert {
        "a.com": RateLimit(2.0, 10),  # 120/min wins; burst from domain_limits
        "b.com": RateLimit(2.0, 2),  # no burst: one second's worth
        "c.com": RateLimit(3.0, 4),  # rate_limit None: domain_limits apply
        "d.com": RateLimit(0.5, 1),  # 30/min, no burst given
    } == limits


def test_one_second_burst() -> None:
    assert (1, 1, 3, 1) == tuple(one_second_burst(r) for r in (0.01, 1.0, 2.5, math.inf))


# -- property: never more than burst + rate * t over any interval --------------------


@given(
    rate=st.floats(min_value=0.1, max_value=50.0),
    burst=st.integers(min_value=1, max_value=10),
    steps=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=2.0), st.integers(0, 5)), max_size=60
    ),
)
def test_property_bucket_never_exceeds_burst_plus_rate_times_t(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(rate, burst), clock)
    grants: list[float] = []
    for advance, tries in steps:
        clock.advance(advance)
        for _ in range(tries):
            decision = limiter.try_acquire(D)
            if decision is GRANTED:
                grants.append(clock.monotonic())
            else:
                assert isinstance(decision, Wait)
                assert decision.until > clock.monotonic()
    for i in range(len(grants)):
        for j in range(i, len(grants)):
            assert j - i + 1 <= burst + rate * (grants[j] - grants[i]) + 1e-6
