"""The pure scheduler: ordering, caps, parking, deferrals without attempts (virtual time)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.delivery.classify import OutcomeKind
from empath.policy.breaker import BreakerSettings, BreakerState, BreakerTransition
from empath.policy.ratelimit import RateLimit
from empath.policy.state import LocalPolicyState, PolicySettings
from empath.queue.index import UnitKey
from empath.queue.scheduler import (
    DeferBreaker,
    DeferRateLimit,
    Dispatch,
    Scheduler,
    WaitForConnection,
    decide,
)
from empath.testing.clock import FakeClock
from empath.testing.settings import breaker_settings, scheduler_settings

UNLIMITED = RateLimit(math.inf, 1)


class Harness:
    def __init__(
        self,
        *,
        cap: int = 64,
        max_connections: dict[str, int] | None = None,
        rates: dict[str, RateLimit] | None = None,
        breaker: BreakerSettings | None = None,
        max_units_per_tick: int = 10_000,
    ) -> None:
        self.clock = FakeClock()
        self.transitions: list[BreakerTransition] = []
        self.policy = LocalPolicyState(
            self.clock,
            PolicySettings(
                breaker or breaker_settings(failure_threshold=1, timeout_s=300.0),
                UNLIMITED,
                rates or {},
            ),
            on_transition=self.transitions.append,
        )
        conns = max_connections or {}
        self.scheduler = Scheduler(
            self.policy,
            self.clock,
            scheduler_settings(
                max_concurrent_deliveries=cap,
                max_connections_for=lambda d: conns.get(d, 20),
                max_units_per_tick=max_units_per_tick,
            ),
        )

    def add(self, mid: str, domain: str = "a.com", delay_s: float = 0.0) -> UnitKey:
        key = UnitKey(mid, domain)
        self.scheduler.add(key, self.clock.now() + delay_s)
        return key

    def tick(self) -> list[tuple[UnitKey, object]]:
        return list(self.scheduler.tick())

    def dispatched(self) -> list[str]:
        return [k.message_id for k, d in self.scheduler.tick() if isinstance(d, Dispatch)]


def test_a_unit_added_due_now_is_dispatched_by_the_same_tick() -> None:
    h = Harness()
    key = h.add("m1")
    assert [(key, Dispatch())] == h.tick()
    assert h.scheduler.is_in_flight(key)


def test_earliest_due_first_and_future_units_wait_for_their_time() -> None:
    h = Harness()
    h.add("late", delay_s=60.0)
    h.add("soon", delay_s=10.0)
    h.add("now2", delay_s=-5.0)
    h.add("now1", delay_s=-10.0)
    assert ["now1", "now2"] == h.dispatched()
    assert h.clock.now() + 10.0 == h.scheduler.wake_at()
    assert 10.0 == h.scheduler.wake_delay_s()
    h.clock.advance(10.0)
    assert ["soon"] == h.dispatched()
    h.clock.advance(50.0)
    assert ["late"] == h.dispatched()
    assert h.scheduler.wake_at() is None


def test_global_cap_limits_deliveries_in_flight() -> None:
    h = Harness(cap=2)
    keys = [h.add(f"m{i}", domain=f"d{i}.com") for i in range(5)]
    assert ["m0", "m1"] == h.dispatched()
    assert [] == h.dispatched()
    assert h.scheduler.wake_at() is None  # nothing to do until a delivery finishes
    assert h.scheduler.finished(keys[0], OutcomeKind.DELIVERED)
    assert ["m2"] == h.dispatched()
    assert 2 == h.scheduler.in_flight


def test_connection_cap_parks_units_per_domain_and_wakes_them_on_release() -> None:
    h = Harness(max_connections={"a.com": 2})
    a = [h.add(f"a{i}", "a.com") for i in range(5)]
    b = [h.add(f"b{i}", "b.com") for i in range(2)]
    decisions = h.tick()
    assert [k for k, d in decisions if isinstance(d, Dispatch)] == [a[0], a[1], *b]
    assert [WaitForConnection(2)] * 3 == [d for k, d in decisions if k in a[2:]]
    assert 2 == h.policy.connections("a.com")
    # no busy polling: nothing is re-decided until a connection frees or the re-check timer
    assert [] == h.tick()
    assert h.scheduler.wake_delay_s() == pytest.approx(5.0)
    h.scheduler.finished(a[1], OutcomeKind.DELIVERED)
    assert 0.0 == h.scheduler.wake_delay_s()
    assert ["a2"] == h.dispatched()
    h.scheduler.finished(a[0], OutcomeKind.PERMANENT)
    assert ["a3"] == h.dispatched()
    assert 2 == h.policy.connections("a.com")


def test_units_due_later_join_the_back_of_a_parked_domain_line() -> None:
    h = Harness(max_connections={"a.com": 1})
    first = h.add("a0")
    h.add("a1")
    assert ["a0"] == h.dispatched()
    h.add("a2")
    decisions = h.tick()
    assert [(UnitKey("a2", "a.com"), WaitForConnection(1))] == decisions
    h.scheduler.finished(first, OutcomeKind.DELIVERED)
    assert ["a1"] == h.dispatched()
    h.scheduler.finished(UnitKey("a1", "a.com"), OutcomeKind.DELIVERED)
    assert ["a2"] == h.dispatched()


def test_rate_limited_units_wait_for_their_token_without_re_reporting() -> None:
    h = Harness(rates={"slow.com": RateLimit(2.0, 1)})
    keys = [h.add(f"s{i}", "slow.com") for i in range(4)]
    t0 = h.clock.monotonic()
    decisions = h.tick()
    assert (keys[0], Dispatch()) == decisions[0]
    assert [(k, DeferRateLimit(t0 + 0.5)) for k in keys[1:]] == decisions[1:]
    assert 3 == h.policy.limiter.deferred("slow.com")
    assert h.scheduler.wake_delay_s() == pytest.approx(0.5)
    h.clock.advance(0.25)
    assert [] == h.tick()
    h.clock.advance(0.25)
    assert ["s1"] == h.dispatched()
    h.clock.advance(0.5)
    assert ["s2"] == h.dispatched()
    assert 3 == h.policy.limiter.deferred("slow.com")  # head re-checks are not counted


def test_a_backlog_drained_at_the_rate_limit_counts_every_unit_that_waited_once() -> None:
    """Issue 14 #17: the backlog first queues for a connection slot, so its units join
    the line while it is not rate-blocked; each one that then waits for a token is still
    counted (and reported) exactly once."""
    h = Harness(rates={"a.com": RateLimit(10.0, 20)}, max_connections={"a.com": 2})
    keys = [h.add(f"m{i}") for i in range(100)]
    t0 = h.clock.monotonic()
    reported: list[UnitKey] = []
    dispatched: list[float] = []
    for _ in range(1500):  # 15 s in 10 ms steps; every delivery ends within its step
        for key, d in h.scheduler.tick():
            if isinstance(d, Dispatch):
                dispatched.append(h.clock.monotonic())
                h.scheduler.finished(key, OutcomeKind.DELIVERED)
            elif isinstance(d, DeferRateLimit):
                reported.append(key)
        h.clock.advance(0.01)
    assert 100 == len(dispatched)
    assert 7.5 <= dispatched[-1] - t0 <= 8.5  # the burst of 20, then 10 a second
    # All but the burst of 20 and the one token that came back while it went out (two
    # connections a 10 ms step: 0.1 s) waited for a token; each is counted and reported once.
    assert 79 == h.policy.limiter.deferred("a.com")
    assert sorted(keys[21:]) == sorted(reported)


def test_two_per_second_domain_holds_while_another_domain_runs_unthrottled() -> None:
    h = Harness(rates={"slow.com": RateLimit(2.0, 2)})
    slow: list[float] = []
    fast = 0
    for i in range(200):
        h.add(f"s{i}", "slow.com")
    for step in range(2000):  # 20 s in 10 ms steps
        h.add(f"f{step}", "fast.com")
        for key, d in h.scheduler.tick():
            if isinstance(d, Dispatch):
                h.scheduler.finished(key, OutcomeKind.DELIVERED)
                if key.domain == "slow.com":
                    slow.append(h.clock.monotonic())
                else:
                    fast += 1
        h.clock.advance(0.01)
    assert 2000 == fast
    assert 40 <= len(slow) <= 44  # 2/s over 20 s (+ burst of 2), within 10 %


def test_open_breaker_defers_then_lets_exactly_one_probe_and_closes_on_success() -> None:
    h = Harness(breaker=breaker_settings(failure_threshold=1, timeout_s=300.0))
    first = h.add("m0")
    assert ["m0"] == h.dispatched()
    h.scheduler.finished(first, OutcomeKind.TEMPORARY)
    assert BreakerState.OPEN == h.policy.breaker_state("a.com")
    t0 = h.clock.monotonic()
    keys = [h.add(f"m{i}") for i in range(1, 5)]
    assert [(k, DeferBreaker(t0 + 300.0, BreakerState.OPEN)) for k in keys] == h.tick()
    h.clock.advance(300.0)
    decisions = h.tick()
    assert 1 == len(decisions)
    probe_key, probe = decisions[0]
    assert probe_key == keys[0]
    assert isinstance(probe, Dispatch)
    assert probe.probe > 0
    for _ in range(3):
        h.clock.advance(5.0)
        assert [] == h.tick()  # one probe in flight: the others keep waiting
    h.scheduler.finished(probe_key, OutcomeKind.DELIVERED)
    assert ["m2", "m3", "m4"] == h.dispatched()
    assert [
        "Circuit breaker OPENED for a.com",
        "Circuit breaker HALF-OPEN for a.com",
        "Circuit breaker CLOSED for a.com",
    ] == [t.message for t in h.transitions]


def test_probe_failure_reopens_and_units_keep_waiting() -> None:
    h = Harness(breaker=breaker_settings(failure_threshold=1, timeout_s=60.0))
    first = h.add("m0")
    h.tick()
    h.scheduler.finished(first, OutcomeKind.TEMPORARY)
    h.add("m1")
    h.add("m2")
    h.tick()
    h.clock.advance(60.0)
    assert ["m1"] == h.dispatched()
    h.scheduler.finished(UnitKey("m1", "a.com"), OutcomeKind.TEMPORARY)
    assert [] == h.dispatched()
    assert 2 == h.policy.breaker.trips_total("a.com")
    h.clock.advance(60.0)
    assert ["m2"] == h.dispatched()


def test_permanent_failures_never_trip_the_breaker() -> None:
    h = Harness(breaker=breaker_settings(failure_threshold=1))
    for i in range(5):
        key = h.add(f"m{i}")
        assert [f"m{i}"] == h.dispatched()
        h.scheduler.finished(key, OutcomeKind.PERMANENT)
    assert BreakerState.CLOSED == h.policy.breaker_state("a.com")


def test_deferral_returns_everything_it_took() -> None:
    clock = FakeClock()
    policy = LocalPolicyState(
        clock,
        PolicySettings(
            breaker_settings(failure_threshold=1, timeout_s=10.0), RateLimit(1.0, 1), {}
        ),
    )
    policy.breaker_failure("a.com", 0)
    clock.advance(10.0)
    assert Dispatch(probe=1) == decide("a.com", policy, 5)  # the Half-Open probe
    policy.breaker_release("a.com", 1)
    assert isinstance(decide("a.com", policy, 5), DeferRateLimit)  # probe + slot given back
    assert 1 == policy.connections("a.com")  # only the dispatched one holds a slot
    assert not policy.breaker.probe_in_flight("a.com")


def test_process_now_makes_every_scheduled_unit_due_in_order() -> None:
    h = Harness()
    h.add("c", delay_s=3000.0)
    h.add("a", delay_s=1000.0)
    h.add("b", delay_s=2000.0)
    assert [] == h.dispatched()
    assert 3 == h.scheduler.process_now()
    assert ["a", "b", "c"] == h.dispatched()


def test_process_now_rechecks_parked_domains() -> None:
    h = Harness(max_connections={"a.com": 1})
    h.add("a0")
    h.add("a1")
    h.tick()
    h.scheduler.reconfigure(
        scheduler_settings(max_concurrent_deliveries=64, max_connections_for=lambda d: 5)
    )
    assert ["a1"] == h.dispatched()


def test_remove_forgets_scheduled_and_parked_units_but_not_in_flight_ones() -> None:
    h = Harness(max_connections={"a.com": 1})
    running = h.add("a0")
    parked = h.add("a1")
    h.tick()
    later = h.add("a2", delay_s=100.0)
    assert h.scheduler.remove(parked)
    assert h.scheduler.remove(later)
    assert not h.scheduler.remove(running)
    assert 1 == len(h.scheduler)
    h.scheduler.finished(running, OutcomeKind.DELIVERED)
    assert [] == h.dispatched()
    assert 0 == len(h.scheduler)


def test_re_adding_a_parked_unit_reschedules_it() -> None:
    h = Harness(max_connections={"a.com": 1})
    running = h.add("a0")
    h.add("a1")
    h.tick()
    h.add("a1", delay_s=100.0)
    h.scheduler.finished(running, OutcomeKind.DELIVERED)
    assert [] == h.dispatched()
    h.clock.advance(100.0)
    assert ["a1"] == h.dispatched()


def test_adding_an_in_flight_unit_is_refused_and_finished_is_idempotent() -> None:
    h = Harness()
    key = h.add("m")
    h.tick()
    with pytest.raises(ValueError):
        h.scheduler.add(key, 0.0)
    assert h.scheduler.finished(key, None)
    assert not h.scheduler.finished(key, None)
    assert 0 == h.policy.connections("a.com")


def test_heartbeat_records_each_tick() -> None:
    h = Harness()
    h.clock.advance(30.0)
    assert 30.0 == h.scheduler.heartbeat().age_s(h.clock.monotonic())
    h.tick()
    beat = h.scheduler.heartbeat()
    assert (h.clock.monotonic(), 1) == (beat.last_tick_monotonic, beat.ticks)
    assert 0.0 == beat.age_s(h.clock.monotonic())


def test_a_long_backlog_is_worked_through_in_bounded_ticks() -> None:
    h = Harness(cap=10_000, max_units_per_tick=100)
    for i in range(250):
        h.add(f"m{i}", domain=f"d{i}.com")
    assert 100 == len(h.dispatched())
    assert 0.0 == h.scheduler.wake_delay_s()
    assert 100 == len(h.dispatched())
    assert 50 == len(h.dispatched())


def test_stats_count_where_units_are() -> None:
    h = Harness(max_connections={"a.com": 1})
    h.add("a0")
    h.add("a1")
    h.add("later", delay_s=50.0)
    h.tick()
    stats = h.scheduler.stats()
    assert (1, 1, 1, 1, 0) == (
        stats.scheduled,
        stats.parked,
        stats.in_flight,
        stats.blocked_domains,
        stats.ready_domains,
    )
    assert isinstance(h.scheduler.blocked("a.com"), WaitForConnection)


# -- property: caps are never exceeded and no unit is lost or dispatched twice --------

SCHED_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 2), st.floats(-1.0, 5.0)),
        st.tuples(st.just("tick"), st.just(0), st.just(0.0)),
        st.tuples(st.just("finish"), st.integers(0, 3), st.just(0.0)),
        st.tuples(st.just("advance"), st.just(0), st.floats(0.0, 400.0)),
        st.tuples(st.just("process_now"), st.just(0), st.just(0.0)),
    ),
    max_size=80,
)
DOMAINS = ("a.com", "b.com", "c.com")
OUTCOMES: list[OutcomeKind | None] = [*OutcomeKind, None]


@given(SCHED_OPS, st.integers(1, 4), st.integers(1, 3))
def test_property_caps_hold_and_every_unit_is_dispatched_exactly_once(
    ops: list[tuple[str, int, float]], cap: int, per_domain: int
) -> None:
    h = Harness(
        cap=cap,
        max_connections=dict.fromkeys(DOMAINS, per_domain),
        rates={"b.com": RateLimit(1.0, 1)},
        breaker=breaker_settings(failure_threshold=2, timeout_s=60.0, success_threshold=2),
    )
    sched = h.scheduler
    waiting: set[UnitKey] = set()
    running: list[UnitKey] = []
    n = 0

    def run_tick() -> None:
        for key, d in sched.tick():
            if isinstance(d, Dispatch):
                assert key in waiting  # dispatched once per add, never twice
                waiting.discard(key)
                running.append(key)
        assert len(running) <= cap
        for domain in DOMAINS:
            assert sum(1 for k in running if k.domain == domain) <= per_domain
            assert h.policy.breaker.probe_in_flight(domain) <= 1

    for op, arg, t in ops:
        if op == "add":
            key = h.add(f"m{n}", DOMAINS[arg], delay_s=t)
            n += 1
            waiting.add(key)
        elif op == "tick":
            run_tick()
        elif op == "finish" and running:
            key = running.pop(0)
            assert sched.finished(key, OUTCOMES[arg])
        elif op == "advance":
            h.clock.advance(t)
        elif op == "process_now":
            sched.process_now()
        assert len(waiting) + len(running) == len(sched)

    # drain: finish everything successfully and let time pass; every unit goes out
    for _ in range(200):
        run_tick()
        while running:
            sched.finished(running.pop(), OutcomeKind.DELIVERED)
        if not waiting:
            break
        h.clock.advance(60.0)
    assert set() == waiting
    assert 0 == len(sched)


def test_repr_shows_the_queue_at_a_glance() -> None:
    h = Harness(cap=4, max_connections={"a.com": 1})
    for i in range(3):
        h.add(f"m{i}")
    h.add("later", delay_s=60)
    assert "<Scheduler scheduled=4 parked=0 in_flight=0/4" in repr(h.scheduler)
    h.scheduler.tick()
    assert "<Scheduler scheduled=1 parked=2 in_flight=1/4 domains blocked=1 ready=0>" == repr(
        h.scheduler
    )


def test_backlog_counts_what_waits_for_this_node_not_retries_or_held_destinations() -> None:
    """Issue 14 defect 12: readiness counted every tracked unit, so 20 units waiting to
    retry after a 451 (max_queue_size 10) took the node out of the load balancer.  The
    backlog is in flight + due with no delivery slot; units waiting for their retry time
    or held by their destination's breaker do not count."""
    h = Harness(cap=2, breaker=breaker_settings(failure_threshold=1, timeout_s=300.0))
    for i in range(20):
        h.add(f"r{i}", "down.test", delay_s=60.0)  # deferred by a 451: retry in a minute
    assert 0 == h.scheduler.backlog(10)
    # the destination's breaker opens: its due units wait in a blocked line
    first = h.add("d0", "down.test")
    assert [first] == [k for k, d in h.tick() if isinstance(d, Dispatch)]
    h.scheduler.finished(first, OutcomeKind.TEMPORARY)
    for i in range(5):
        h.add(f"d{i + 1}", "down.test")
    assert all(isinstance(d, DeferBreaker) for _k, d in h.tick())
    assert 0 == h.scheduler.backlog(10)
    # five fresh units for a healthy domain with 2 delivery slots: 2 in flight, 3 due
    for i in range(5):
        h.add(f"ok{i}", "up.test")
    assert 2 == len(h.dispatched())
    assert 5 == h.scheduler.backlog(10)
    assert 3 == h.scheduler.backlog(3)  # counted up to the limit only
    assert 20 + 5 + 5 == len(h.scheduler)  # everything is still tracked


@given(
    st.lists(st.tuples(st.integers(0, 30), st.floats(0, 100)), max_size=60),
    st.floats(0, 100),
    st.integers(1, 80),
)
def test_count_due_agrees_with_a_scan(ops: list[tuple[int, float]], now: float, limit: int) -> None:
    from empath.queue.index import DueIndex

    index: DueIndex[int] = DueIndex()
    due: dict[int, float] = {}
    for key, at in ops:
        if at > 95:
            index.remove(key)
            due.pop(key, None)
        else:
            index.schedule(key, at)
            due[key] = at
    assert min(limit, sum(1 for at in due.values() if at <= now)) == index.count_due(now, limit)
