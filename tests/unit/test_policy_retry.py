"""Retry schedule (DESIGN §4): min(base * 2^(n-1), max) +- jitter, max_attempts, expiry."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.policy.retry import GiveUp, Retry, RetryPolicy

T0 = 1_700_000_000.0


def policy(jitter: float = 0.0, **kw: float) -> RetryPolicy:
    args: dict[str, float] = {
        "base_delay_s": 60.0,
        "max_delay_s": 86_400.0,
        "jitter_factor": jitter,
        "max_attempts": 25,
        "expiration_s": 432_000.0,
    }
    args.update(kw)
    return RetryPolicy(
        args["base_delay_s"],
        args["max_delay_s"],
        args["jitter_factor"],
        int(args["max_attempts"]),
        args["expiration_s"],
        rng=random.Random(7),
    )


def test_delays_double_from_base_until_capped_at_max() -> None:
    p = policy()
    assert [60.0, 120.0, 240.0, 480.0, 960.0] == [p.delay_for(n) for n in range(1, 6)]
    assert 86_400.0 == p.delay_for(12)  # 60 * 2^11 = 122880 > max
    assert 86_400.0 == p.delay_for(10_000)  # huge attempt numbers do not overflow


def test_attempt_numbers_start_at_one() -> None:
    with pytest.raises(ValueError):
        policy().delay_for(0)


@given(st.integers(min_value=1, max_value=80), st.floats(min_value=0.0, max_value=1.0))
def test_jitter_stays_within_factor_of_the_base_delay_and_is_never_negative(
    attempt: int, factor: float
) -> None:
    p = policy(jitter=factor)
    base = p.base_delay_for(attempt)
    for _ in range(20):
        d = p.delay_for(attempt)
        assert d >= 0.0
        assert base * (1 - factor) - 1e-9 <= d <= base * (1 + factor) + 1e-9


def test_jitter_actually_spreads_delays() -> None:
    p = policy(jitter=0.2)
    delays = {p.delay_for(3) for _ in range(50)}
    assert len(delays) > 40
    assert min(delays) < 240.0 < max(delays)


def test_decide_schedules_next_attempt_from_now_with_backoff() -> None:
    p = policy()
    assert Retry(T0 + 100 + 60.0) == p.decide(1, T0, T0 + 100)
    assert Retry(T0 + 100 + 240.0) == p.decide(3, T0, T0 + 100)


def test_decide_gives_up_after_max_attempts() -> None:
    p = policy(max_attempts=3)
    assert isinstance(p.decide(2, T0, T0 + 10), Retry)
    assert GiveUp("max_attempts") == p.decide(3, T0, T0 + 10)
    assert GiveUp("max_attempts") == p.decide(4, T0, T0 + 10)


def test_max_attempts_one_means_no_retry() -> None:
    assert GiveUp("max_attempts") == policy(max_attempts=1).decide(1, T0, T0)


def test_decide_gives_up_as_expired_at_or_after_the_deadline() -> None:
    p = policy(expiration_s=3600.0)
    assert GiveUp("expired") == p.decide(2, T0, T0 + 3600.0)
    assert GiveUp("expired") == p.decide(2, T0, T0 + 9999.0)


def test_last_retry_is_clipped_to_the_deadline_so_the_unit_gets_a_final_attempt() -> None:
    p = policy(base_delay_s=600.0, expiration_s=3600.0)
    # after 3 attempts the delay is 2400 s; now + 2400 would pass the deadline at +3600
    assert Retry(T0 + 3600.0) == p.decide(3, T0, T0 + 3000.0)


def test_max_attempts_wins_over_expiry_when_both_apply() -> None:
    p = policy(max_attempts=2, expiration_s=10.0)
    assert GiveUp("max_attempts") == p.decide(2, T0, T0 + 100.0)


def test_is_expired_after_expiration_secs() -> None:
    p = policy(expiration_s=3600.0)
    assert not p.is_expired(T0, T0 + 3599.9)
    assert p.is_expired(T0, T0 + 3600.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"jitter_factor": -0.1},
        {"jitter_factor": 1.5},
        {"max_attempts": 0},
        {"expiration_s": 0.0},
        {"base_delay_s": -1.0},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        policy(**kwargs)
