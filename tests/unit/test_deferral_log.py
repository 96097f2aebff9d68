"""The "Rate limit exceeded" log budget (empath.queue.deferral_log), in virtual time."""

from __future__ import annotations

from empath.queue.deferral_log import DeferralLog
from empath.testing.clock import FakeClock


def test_first_deferral_of_a_domain_is_logged_at_once_then_once_per_interval() -> None:
    clock = FakeClock()
    budget = DeferralLog(clock, interval_s=10.0)
    assert 3 == budget.note("a.test", 3)
    assert 0 == budget.note("a.test", 5)  # held back
    assert 1 == budget.note("b.test")  # another domain has its own budget
    clock.advance(9.9)
    assert 0 == budget.note("a.test", 2)
    clock.advance(0.1)
    assert 5 + 2 + 1 == budget.note("a.test")  # the held ones come with the next line
    assert 0 == budget.note("a.test")


def test_a_backlog_of_100000_deferrals_in_a_minute_writes_six_lines() -> None:
    clock = FakeClock()
    budget = DeferralLog(clock, interval_s=10.0)
    lines = []
    for _ in range(100_000):
        if n := budget.note("slow.test"):
            lines.append(n)
        clock.advance(0.0006)  # 60 s in all
    # At 0, 10, ... 50 s: the first deferral, then each line the 16,667 since the last.
    assert [1] + [16_667] * 5 == lines


def test_memory_is_bounded_by_dropping_domains_whose_interval_passed() -> None:
    clock = FakeClock()
    budget = DeferralLog(clock, interval_s=10.0, max_domains=100)
    for i in range(100):
        budget.note(f"d{i}.test")
    clock.advance(10.0)
    assert 1 == budget.note("new.test")
    assert 1 == len(budget)
