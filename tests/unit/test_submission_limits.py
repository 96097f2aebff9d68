"""The AUTH abuse limits and quotas (pure, clock passed in): per-IP blocks, per-login
slow-down without lock-out, hourly message quota."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from empath.policy.authlimit import AuthLimiter, AuthLimitSettings, MessageQuota

S = AuthLimitSettings(
    window_s=600.0,
    max_failures_per_ip=3,
    block_s=900.0,
    max_failures_per_login=5,
    delay_s=1.0,
    max_delay_s=4.0,
)


def test_ip_is_blocked_at_the_limit_and_released_after_block_time() -> None:
    """The third failure from one address blocks it for block_s, then it is free again."""
    lim = AuthLimiter(S)
    assert not lim.failed("10.0.0.1", "a", 0.0).ip_blocked
    assert not lim.failed("10.0.0.1", "b", 1.0).ip_blocked
    assert lim.failed("10.0.0.1", "c", 2.0).ip_blocked
    assert lim.blocked("10.0.0.1", 2.0 + 899.0)
    assert not lim.blocked("10.0.0.1", 2.0 + 900.0)
    assert not lim.blocked("10.0.0.2", 3.0)


def test_failures_outside_the_window_do_not_count() -> None:
    """A sliding window (in sixtieths of it): three failures spread over more than
    window_s plus one bucket block nothing; within it they do."""
    lim = AuthLimiter(S)
    lim.failed("10.0.0.1", "a", 0.0)
    lim.failed("10.0.0.1", "a", 300.0)
    assert not lim.failed("10.0.0.1", "a", 611.0).ip_blocked
    lim.failed("10.0.0.2", "a", 0.0)
    lim.failed("10.0.0.2", "a", 300.0)
    assert lim.failed("10.0.0.2", "a", 590.0).ip_blocked


def test_login_under_distributed_attack_is_slowed_not_locked() -> None:
    """Failures from many addresses: past the login limit each failure waits one more
    delay step (capped); the login itself is never blocked."""
    lim = AuthLimiter(S)
    delays = [lim.failed(f"10.0.1.{i}", "alice", float(i)).delay_s for i in range(10)]
    assert [0, 0, 0, 0, 0, 1.0, 2.0, 3.0, 4.0, 4.0] == delays
    status = lim.login_status("alice", 10.0)
    assert (10, True) == (status.failures, status.slowed)
    assert not any(lim.blocked(f"10.0.1.{i}", 10.0) for i in range(10))


def test_success_records_last_login_and_unblock_forgets() -> None:
    """A success sets last_login; unblock lifts an IP block and a login's failures."""
    lim = AuthLimiter(S)
    lim.succeeded("Alice", 1_700_000_000.0)
    assert 1_700_000_000.0 == lim.login_status("alice", 0.0).last_login
    for i in range(3):
        lim.failed("10.0.0.9", "alice", float(i))
    assert lim.blocked("10.0.0.9", 5.0)
    assert lim.unblock("10.0.0.9")
    assert not lim.blocked("10.0.0.9", 5.0)
    assert lim.unblock("alice")
    assert 0 == lim.login_status("alice", 5.0).failures
    assert not lim.unblock("nobody")


@given(st.lists(st.tuples(st.integers(0, 20), st.floats(0, 5000)), max_size=300))
def test_login_count_is_exact_within_the_window(events: list[tuple[int, float]]) -> None:
    """However many failures, the login's count is the failures of the last window
    (to the bucket), and it keeps at most 61 buckets."""
    lim = AuthLimiter(S)
    times = sorted(t for _, t in events)
    for ip, t in sorted(events, key=lambda e: e[1]):
        lim.failed(f"ip{ip}", "alice", t)
    now = 5000.0
    exact = sum(1 for t in times if t > now - 600.0)
    loose = sum(1 for t in times if t > now - 610.0)
    assert exact <= lim.login_status("alice", now).failures <= loose
    assert len(lim._login._keys.get("alice", ())) <= 61


def test_message_quota_per_sliding_hour() -> None:
    """Two per hour: the third is refused until the first leaves the window; 0 = no limit."""
    q = MessageQuota()
    assert q.admit("alice", 2, 0.0)
    assert q.admit("alice", 2, 10.0)
    assert not q.admit("alice", 2, 20.0)
    assert q.admit("bob", 2, 20.0)
    assert not q.admit("alice", 2, 3600.5)  # counted to the minute: still in the window
    assert q.admit("alice", 2, 3660.5)
    assert all(q.admit("carol", 0, float(i)) for i in range(100))
