"""Bounded delivery counters, capped domain labels, rate windows and the queue summary."""

from __future__ import annotations

from empath.observability.metrics import summarise_queue
from empath.queue.index import UnitKey
from empath.spool.index import MessageIndex
from empath.spool.model import (
    Envelope,
    MessageState,
    RcptStatus,
    RecipientState,
    UnitState,
    UnitStatus,
)
from empath.stats import OTHER, DomainLabels, Histogram, RunnerStats, Window


def test_domain_labels_keep_the_first_domains_and_fold_the_rest_into_other() -> None:
    labels = DomainLabels(2)
    assert ["a.test", "b.test", OTHER, "a.test", OTHER] == [
        labels(d) for d in ("a.test", "b.test", "c.test", "a.test", "d.test")
    ]
    assert 2 == len(labels)


def test_runner_stats_stay_bounded_by_the_domain_cap() -> None:
    stats = RunnerStats(DomainLabels(3))
    for i in range(10_000):
        stats.count_attempt(i % 2 == 0, f"d{i}.test", "250" if i % 2 == 0 else "451")
        stats.queue_age.observe(i / 100)
    assert len(stats.attempts) <= 3 * 2 + 2  # three domains plus "other", two outcomes each
    assert 10_000 == stats.attempts_total
    assert 5_000 == stats.attempts_failed
    assert 10_000 == stats.queue_age.count


def test_histogram_buckets_are_cumulative_and_end_with_inf() -> None:
    h = Histogram((1.0, 10.0))
    for v in (0.5, 1.0, 5.0, 50.0):
        h.observe(v)
    snap = h.snapshot()
    assert ((1.0, 2), (10.0, 3), (float("inf"), 4)) == snap.buckets
    assert 56.5 == snap.sum_s


def test_window_answers_the_change_over_about_one_window() -> None:
    w = Window(10.0, start=0.0, width=1)
    assert (5,) == w.delta(1.0, (5,))  # everything since start is inside the window
    assert (9,) == w.delta(5.0, (9,))
    # 12 s: the newest sample at least 10 s old is the start (0 at t=0) → still all
    assert (12,) == w.delta(9.5, (12,))
    # 16 s: samples at 1 and 5 are ≥ 10 s old; the change since t=5 counts
    assert (3,) == w.delta(16.0, (12,))
    # nothing new for a whole window: zero
    assert (0,) == w.delta(40.0, (12,))


def test_window_figures_do_not_depend_on_how_often_it_is_read() -> None:
    """Issue 14 #16: read every 0.1 s, 2 s and 5 s, a 300 s window gives the same figures
    at the instants all three read, and forgets a fault one window after it ended."""
    window_s = 300.0
    readers = {n: Window(window_s, start=0.0, width=2) for n in (1, 20, 50)}  # 0.1, 2, 5 s
    attempts = failed = 0
    figures: dict[int, list[tuple[int, ...]]] = {n: [] for n in readers}
    for i in range(12_001):  # 1200 s in 0.1 s steps
        now = i / 10
        if i % 50 == 25:  # at 2.5 s past every 5 s: 4 attempts, 3 of them failed until 600 s
            attempts += 4
            failed += 3 if now < 600 else 0
        for every, w in readers.items():
            if i % every == 0:
                figure = w.delta(now, (failed, attempts))
                if i % 100 == 0:  # every 10 s, when all three read
                    figures[every].append(figure)
    assert figures[50] == figures[20] == figures[1]
    by_10s = figures[1]
    assert (3 * 60, 4 * 60) == by_10s[50]  # at 500 s: 60 bursts in the last 300 s
    assert (0, 4 * 60) == by_10s[92]  # at 920 s: the fault ended at 600 s, out of the window
    assert (0, 4 * 60) == by_10s[-1]


def test_window_keeps_a_bounded_number_of_samples() -> None:
    w = Window(300.0, start=0.0, width=1, max_samples=100)
    for i in range(100_000):
        w.delta(i * 0.01, (i,))
    assert len(w) <= 102


def _msg(mid: str, received: float, *units: UnitState) -> MessageState:
    env = Envelope(sender="s@o.test", recipients=("r@x.test",), received_at=received, size=1)
    return MessageState(id=mid, envelope=env, units=units)


def _unit(domain: str, status: UnitStatus, attempts: int = 0) -> UnitState:
    return UnitState(domain, (RecipientState("r@" + domain, RcptStatus.PENDING),), status, attempts)


def test_queue_summary_counts_units_by_status_and_in_flight_as_in_progress() -> None:
    messages = [
        _msg(
            "M1", 100.0, _unit("a.test", UnitStatus.PENDING), _unit("b.test", UnitStatus.RETRY, 2)
        ),
        _msg(
            "M2",
            150.0,
            _unit("a.test", UnitStatus.FAILED, 1),
            _unit("c.test", UnitStatus.DELIVERED, 1),
        ),
        _msg("M3", 200.0, _unit("a.test", UnitStatus.PENDING)),
    ]
    index = MessageIndex({m.id: m for m in messages})
    summary = summarise_queue(
        index, messages, {UnitKey("M3", "a.test")}, now=400.0, max_retry_series=10
    )
    assert {
        UnitStatus.PENDING: 1,
        UnitStatus.IN_PROGRESS: 1,
        UnitStatus.RETRY: 1,
        UnitStatus.FAILED: 1,
        UnitStatus.EXPIRED: 0,
        UnitStatus.HELD: 0,
    } == summary.sizes
    assert 300.0 == summary.oldest_s  # M1; M2 has no live unit
    assert (("M1", 2),) == summary.retry_counts


def test_held_units_are_neither_the_oldest_nor_pending() -> None:
    """Mail the operator holds does not age the queue (OldestMessageAgeHigh stays quiet)
    and is counted as held, not pending; once a held message also has a waiting unit it
    counts again."""
    held = _msg("H1", 10.0, _unit("a.test", UnitStatus.HELD, 3))
    waiting = _msg("W1", 300.0, _unit("b.test", UnitStatus.RETRY, 1))
    index = MessageIndex({m.id: m for m in (held, waiting)})
    summary = summarise_queue(index, [held, waiting], set(), now=400.0, max_retry_series=0)
    assert 100.0 == summary.oldest_s  # W1, not the 390 s old held H1
    assert (1, 0) == (summary.sizes[UnitStatus.HELD], summary.sizes[UnitStatus.PENDING])
    only_held = MessageIndex({"H1": held})
    assert 0.0 == summarise_queue(only_held, [held], set(), 400.0, 0).oldest_s
    index["H1"] = _msg(
        "H1", 10.0, _unit("a.test", UnitStatus.HELD, 3), _unit("c.test", UnitStatus.PENDING)
    )
    assert 390.0 == summarise_queue(index, list(index.values()), set(), 400.0, 0).oldest_s


def test_queue_summary_caps_retry_series() -> None:
    messages = [_msg(f"M{i}", float(i), _unit("a.test", UnitStatus.RETRY, 1)) for i in range(50)]
    index = MessageIndex({m.id: m for m in messages})
    summary = summarise_queue(index, messages, set(), now=100.0, max_retry_series=5)
    assert ["M0", "M1", "M2", "M3", "M4"] == [m for m, _ in summary.retry_counts]
