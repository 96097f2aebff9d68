"""The pure parts of the incident controls (issue 15): breaker reset/probe, suspensions
in the scheduler, unit filters, "why is it waiting", attempt counts, the summary's
shape, the message history file and the story built from it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from empath.control import select as sel
from empath.control.history import message_story
from empath.policy.breaker import Admit, BreakerState, BreakerTransition, CircuitBreaker
from empath.policy.ratelimit import RateLimit
from empath.queue.index import UnitKey
from empath.queue.scheduler import DeferRateLimit, Dispatch, Suspended
from empath.queue.suspend import Suspension, Suspensions
from empath.spool.index import MessageIndex
from empath.spool.journal import FILE_SECONDS, MessageJournal
from empath.spool.model import (
    Attempt,
    Envelope,
    MessageState,
    RecipientState,
    UnitState,
    UnitStatus,
)
from empath.testing.clock import FakeClock
from empath.testing.settings import breaker_settings
from tests.unit.test_queue_scheduler import Harness

# --- breaker ----------------------------------------------------------------------------


def tripped(clock: FakeClock, log: list[BreakerTransition]) -> CircuitBreaker:
    b = CircuitBreaker(breaker_settings(failure_threshold=1, timeout_s=3600.0), clock, log.append)
    b.record_failure("a.test")
    assert BreakerState.OPEN is b.state("a.test")
    return b


def test_reset_closes_an_open_breaker_now_as_a_logged_transition() -> None:
    clock, log = FakeClock(), list[BreakerTransition]()
    b = tripped(clock, log)
    assert BreakerState.OPEN is b.reset("a.test")
    assert BreakerState.CLOSED is b.state("a.test")
    assert "Circuit breaker CLOSED for a.test" == log[-1].message
    assert Admit() == b.allow("a.test")  # an ordinary admit, no probe
    assert BreakerState.CLOSED is b.reset("unknown.test")


def test_reset_of_a_closed_breaker_forgets_its_failures() -> None:
    clock = FakeClock()
    b = CircuitBreaker(breaker_settings(failure_threshold=2, timeout_s=60.0), clock)
    b.record_failure("a.test")
    assert 1 == b.snapshot()["a.test"].failures
    assert BreakerState.CLOSED is b.reset("a.test")
    b.record_failure("a.test")
    assert BreakerState.CLOSED is b.state("a.test")  # one failure again, not two


def test_probe_now_lets_exactly_one_attempt_through_an_open_breaker() -> None:
    clock, log = FakeClock(), list[BreakerTransition]()
    b = tripped(clock, log)
    assert BreakerState.OPEN is b.probe_now("a.test")
    first = b.allow("a.test")
    assert first.probe > 0  # type: ignore[union-attr]
    assert not hasattr(b.allow("a.test"), "probe")  # the second waits for the probe
    b.record_success("a.test", first.probe)  # type: ignore[union-attr]
    assert BreakerState.CLOSED is b.state("a.test")
    assert BreakerState.CLOSED is b.probe_now("a.test")


def test_snapshot_says_since_when_and_the_failures_in_the_window() -> None:
    clock, log = FakeClock(), list[BreakerTransition]()
    b = tripped(clock, log)
    opened = clock.monotonic()
    clock.advance(10)
    info = b.snapshot()["a.test"]
    assert (BreakerState.OPEN, opened, opened + 3600.0) == (
        info.state,
        info.since,
        info.open_until,
    )


def test_info_of_one_domain_is_its_snapshot_entry() -> None:
    """A view of a few domains looks each up instead of snapshotting every breaker."""
    clock, log = FakeClock(), list[BreakerTransition]()
    b = tripped(clock, log)
    b2 = CircuitBreaker(breaker_settings(failure_threshold=3, timeout_s=60.0), clock)
    for breaker in (b, b2):
        breaker.record_failure("c.test")
    b.reset("a.test")
    clock.advance(30)
    for breaker in (b, b2):
        snap = breaker.snapshot()
        assert {d: breaker.info(d) for d in snap} == snap
        assert breaker.info("never.test") is None
    clock.advance(3600)  # an Open breaker's time is up: Half-Open in both
    snap = b.snapshot()
    assert {d: b.info(d) for d in snap} == snap


def snapshot_ranks(b: CircuitBreaker) -> list[tuple[int, str]]:
    rank = {BreakerState.HALF_OPEN: 0, BreakerState.OPEN: 1, BreakerState.CLOSED: 2}
    return sorted(
        (rank[i.state], d)
        for d, i in b.snapshot().items()
        if i.state is not BreakerState.CLOSED or i.failures
    )


def test_noteworthy_ranks_the_breakers_the_snapshot_would_list() -> None:
    """`breaker list` ranks from this instead of a snapshot of every domain: same
    domains, same ranks (half-open, open, closed counting failures), same lazy
    Open -> Half-Open on the look."""
    clock, log = FakeClock(), list[BreakerTransition]()
    b = CircuitBreaker(
        breaker_settings(failure_threshold=2, failure_window_s=60.0, timeout_s=100.0),
        clock,
        log.append,
    )
    for d in ("open.test", "expires.test", "half.test", "reset.test"):
        b.record_failure(d)
        b.record_failure(d)
    b.probe_now("half.test")
    b.reset("reset.test")  # closed, failures forgotten: not listed
    b.record_failure("old.test")  # one failure that will leave the window
    clock.advance(50)
    b.record_failure("counting.test")  # closed, one failure in the window
    b.record_failure("open.test")  # ignored while open
    clock.advance(20)  # old.test's failure is now 70 s old
    b.allow("open.test")
    assert [(0, "half.test"), (1, "expires.test"), (1, "open.test"), (2, "counting.test")] == (
        sorted(b.noteworthy())
    )
    assert snapshot_ranks(b) == sorted(b.noteworthy())
    clock.advance(40)  # open.test and expires.test: time is up
    assert [(0, "expires.test"), (0, "half.test"), (0, "open.test"), (2, "counting.test")] == (
        sorted(b.noteworthy())
    )
    assert "Circuit breaker HALF-OPEN for open.test" in [t.message for t in log]
    assert snapshot_ranks(b) == sorted(b.noteworthy())


# --- suspensions in the scheduler -------------------------------------------------------


def test_a_suspended_domain_gets_no_dispatch_and_no_report_until_it_ends() -> None:
    h = Harness()
    h.scheduler.suspended["a.com"] = h.clock.now() + 60.0
    h.add("m1")
    h.add("m2", "b.com")
    out = h.tick()
    assert [UnitKey("m2", "b.com")] == [k for k, d in out if isinstance(d, Dispatch)]
    assert [] == [k for k, _d in out if k.domain == "a.com"]  # joined silently
    assert isinstance(h.scheduler.blocked("a.com"), Suspended)
    h.clock.advance(30)
    assert [] == h.dispatched()
    h.clock.advance(31)
    assert ["m1"] == h.dispatched()


def test_resuming_wakes_the_line_at_the_next_tick() -> None:
    h = Harness()
    h.scheduler.suspended["a.com"] = math.inf
    h.add("m1")
    assert [] == h.dispatched()
    del h.scheduler.suspended["a.com"]
    h.scheduler.wake("a.com")
    assert ["m1"] == h.dispatched()


def test_suspensions_persist_expire_and_follow_the_cluster(tmp_path: Path) -> None:
    clock = FakeClock()
    path = str(tmp_path / "suspended.json")
    changed: list[str] = []
    s = Suspensions(clock, path)
    s.on_change(changed.append)
    s.suspend("A.test", 7200.0, "migration")
    s.suspend("b.test", None, "")
    assert {"a.test": clock.now() + 7200.0, "b.test": math.inf} == s.until
    again = Suspensions(clock, path)
    assert 2 == again.load()
    assert "migration" == again.active()["a.test"].reason
    clock.advance(7201)
    assert ["b.test"] == list(again.active())
    assert again.resume("b.test") is not None and not again.active()
    assert 0 == Suspensions(clock, path).load()
    remote = {"c.test": Suspension("c.test", clock.now(), math.inf, "x")}
    assert ["a.test", "b.test", "c.test"] == sorted(s.replace_all(remote))
    assert ["c.test"] == list(s.until)
    assert [] == s.replace_all(remote)
    assert {"a.test", "b.test", "c.test"} <= set(changed)


# --- filters, reasons, counts, shape ------------------------------------------------------


def msg(mid: str, sender: str, received: float, *units: UnitState) -> MessageState:
    rcpts = tuple(r.address for u in units for r in u.recipients)
    return MessageState(mid, Envelope(sender, rcpts, received), units)


def unit(domain: str, status: UnitStatus = UnitStatus.PENDING, **kw: object) -> UnitState:
    return UnitState(domain, (RecipientState(f"x@{domain}"),), status, **kw)  # type: ignore[arg-type]


NOW = 1_700_000_000.0
QUEUE = [
    msg("M1", "a@x.test", NOW - 7200, unit("a.test"), unit("b.test", UnitStatus.RETRY)),
    msg("M2", "b@y.test", NOW - 60, unit("a.test", UnitStatus.HELD)),
    msg("M3", "", NOW - 10, unit("b.test", UnitStatus.FAILED)),
]


def test_a_filter_selects_exactly_the_units_matching_every_criterion() -> None:
    def pick(**kw: object) -> list[tuple[str, list[str]]]:
        flt = sel.UnitFilter(**kw)  # type: ignore[arg-type]
        return [(m.id, ds) for m, ds in sel.select(QUEUE, flt, NOW, set())]

    assert [("M1", ["a.test"]), ("M2", ["a.test"])] == pick(domain="A.test")
    assert [("M1", ["a.test", "b.test"])] == pick(sender="A@X.test")
    assert [("M2", ["a.test"])] == pick(sender="@y.test")
    assert [("M3", ["b.test"])] == pick(sender="<>")
    assert [("M1", ["a.test", "b.test"])] == pick(older_than_s=3600.0)
    assert [("M1", ["b.test"])] == pick(status="retry")
    in_flight = {("M1", "a.test")}
    assert [("M1", ["a.test"])] == [
        (m.id, ds)
        for m, ds in sel.select(QUEUE, sel.UnitFilter(status="in_progress"), NOW, in_flight)
    ]
    assert sel.UnitFilter().empty and not sel.UnitFilter(domain="a").empty


def ctx(**kw: object) -> sel.WaitContext:
    base: dict[str, object] = {
        "now": NOW,
        "mono": 1000.0,
        "in_flight": set(),
        "suspensions": {},
        "breakers": {},
        "blocked": lambda d: None,
        "limit_for": lambda d: RateLimit(10.0, 10),
        "tokens": lambda d: 10.0,
        "connections": lambda d: 0,
        "max_connections": lambda d: 5,
    }
    base.update(kw)
    return sel.WaitContext(**base)  # type: ignore[arg-type]


def test_waiting_for_names_every_thing_that_holds_a_unit() -> None:
    from empath.policy.breaker import BreakerInfo

    c = ctx(
        suspensions={"a.test": Suspension("a.test", NOW, NOW + 600, "drill")},
        breakers={"b.test": BreakerInfo(BreakerState.OPEN, 1, 1300.0, 1000.0)},
        blocked=lambda d: DeferRateLimit(1002.0) if d == "c.test" else None,
        tokens=lambda d: 0.25,
    )
    kinds = [r.kind for r in sel.waiting_for("M", unit("a.test", UnitStatus.HELD), c)]
    assert ["held", "suspended"] == kinds
    (r,) = sel.waiting_for("M", unit("a.test"), c)
    assert "domain suspended until" in r.text and "(drill)" in r.text
    later = unit("b.test", UnitStatus.RETRY, next_attempt_at=NOW + 60)
    kinds = [r.kind for r in sel.waiting_for("M", later, c)]
    assert ["retry_time", "breaker"] == kinds
    breaker = sel.waiting_for("M", unit("b.test"), c)[0]
    assert NOW + 300 == breaker.until
    (rate,) = sel.waiting_for("M", unit("c.test"), c)
    assert NOW + 2 == rate.until and "0.25 token(s) now" in rate.text
    assert [] == sel.waiting_for("M", unit("d.test"), c)
    assert ["in_flight"] == [
        r.kind for r in sel.waiting_for("M", unit("d.test"), ctx(in_flight={("M", "d.test")}))
    ]


def test_attempt_counts_split_made_due_units_into_now_and_waiting_by_reason() -> None:
    from empath.policy.breaker import BreakerInfo

    c = ctx(
        suspensions={"s.test": Suspension("s.test", NOW, math.inf)},
        breakers={"b.test": BreakerInfo(BreakerState.OPEN, 1, 2000.0, 1000.0)},
        tokens=lambda d: 2.0 if d == "r.test" else 10.0,
        connections=lambda d: 4 if d == "c.test" else 0,
    )
    units = [("M", unit("h.test", UnitStatus.HELD))]
    units += [(f"S{i}", unit("s.test")) for i in range(2)]
    units += [(f"B{i}", unit("b.test")) for i in range(3)]
    units += [(f"R{i}", unit("r.test")) for i in range(5)]
    units += [(f"C{i}", unit("c.test")) for i in range(3)]
    units += [("F", unit("f.test", UnitStatus.FAILED))]
    now, waiting = sel.attempt_counts(units, c, free_slots=100)
    assert 3 == now  # 2 tokens for r.test, 1 free connection for c.test
    assert {
        "held": 1,
        "suspended": 2,
        "breaker": 3,
        "rate_limit": 3,
        "connections": 2,
    } == waiting
    assert (1, 2) == (
        sel.attempt_counts(units, c, free_slots=1)[0],
        sel.attempt_counts(units, c, free_slots=1)[1]["max_concurrent_deliveries"],
    )


def totals(index: MessageIndex) -> dict[str, Any]:
    return {"status_counts": index.status_counts(), "minutes": index.minutes()}


def test_the_summary_counts_queued_units_by_domain_status_and_age_bucket() -> None:
    index = MessageIndex({m.id: m for m in QUEUE})
    got = sel.shapes(index.domains(), NOW, {("M1", "a.test")}, index.get, None, **totals(index))
    assert ["a.test", "b.test"] == [d for d, _ in got.ranked]
    a = dict(got.ranked)["a.test"]
    assert [2, 0, 0, 1, 1] == a[:5]  # total, pending, retry, in_progress, held
    assert [1, 0, 0, 0, 0, 1, 0, 0, 0, 0] == a[5:]  # 60 s and 2 h
    assert 1 == dict(got.ranked)["b.test"][0]  # the failed unit is not queued
    assert ([3, 0, 1, 1, 1], 2) == (got.total[:5], got.domain_count)
    assert [1, 0, 0, 0, 0, 2, 0, 0, 0, 0] == got.total[5:]
    c = ctx(
        blocked=lambda d: DeferRateLimit(1001.0) if d == "a.test" else None,
        suspensions={"z.test": Suspension("z.test", NOW, math.inf)},
    )
    listed = sel.shown(got.ranked, index.domains(), c.suspensions, None)
    rows = sel.summary_rows(listed, c, {"a.test": 7})
    assert ["a.test", "b.test", "z.test"] == [r["domain"] for r in rows]
    assert (True, False, 7, 10.0) == (
        rows[0]["throttled"],
        rows[0]["suspended"],
        rows[0]["delivered_last_min"],
        rows[0]["rate_per_s"],
    )
    assert rows[2]["suspended"] and 0 == rows[2]["total"]
    top = sel.shapes(index.domains(), NOW, set(), index.get, 1, **totals(index))
    assert ["a.test"] == [d for d, _ in top.ranked]
    assert [3, 1, 1, 0, 1] == top.total[:5]  # the totals count every domain
    assert ["a.test"] == [d for d, _ in sel.shown(top.ranked, (), c.suspensions, 1)]


@given(
    st.lists(
        st.tuples(
            st.integers(0, 200_000),  # age in seconds
            st.lists(
                st.tuples(
                    st.sampled_from(["a.t", "b.t", "c.t"]), st.sampled_from(list(UnitStatus))
                ),
                min_size=1,
                max_size=3,
                unique_by=lambda t: t[0],
            ),
            st.booleans(),  # its first unit in flight
        ),
        max_size=30,
    ),
    st.sampled_from([None, 1, 2]),
)
def test_the_summary_from_the_index_equals_a_walk_of_the_queue(
    queue: list[tuple[int, list[tuple[str, UnitStatus]], bool]], limit: int | None
) -> None:
    """Shapes from the index's counts = a walk over every unit (ages to the minute)."""
    now = 1_700_000_000.0
    messages, flying = [], set()
    for i, (age, units, fly) in enumerate(queue):
        messages.append(msg(f"M{i}", "s@x.t", now - age, *(unit(d, s) for d, s in units)))
        if fly:
            flying.add((f"M{i}", units[0][0]))
    walked: dict[str, list[int]] = {}
    for m in messages:
        minute_age = now - int(m.envelope.received_at // 60) * 60.0
        for u in m.units:
            if u.status.terminal:
                continue
            row = walked.setdefault(u.domain, [0] * (5 + len(sel.AGE_LABELS)))
            slot = {"pending": 1, "retry": 2, "in_progress": 3, "held": 4}[u.status.value]
            if (m.id, u.domain) in flying:
                slot = 3
            row[0] += 1
            row[slot] += 1
            row[5 + sel.age_bucket(minute_age)] += 1
    index = MessageIndex({m.id: m for m in messages})
    got = sel.shapes(index.domains(), now, flying, index.get, limit, **totals(index))
    order = sorted(walked, key=lambda d: (-walked[d][0], d))[:limit]
    assert [(d, walked[d]) for d in order] == got.ranked
    columns = zip(*walked.values(), strict=True)
    assert ([sum(c) for c in columns] if walked else [0] * len(got.total)) == got.total


# --- message history ----------------------------------------------------------------------


def test_the_history_keeps_events_for_the_retention_and_survives_reopening(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    j = MessageJournal(str(tmp_path / "journal"), 2 * FILE_SECONDS, clock)
    j.record("M1", "attempt", domain="a.test", text="x" * 5000)
    j.record("M2", "dsn", kind="failed")
    clock.advance(FILE_SECONDS)
    j.record("M1", "left", reason="delivered")
    j.close()
    again = MessageJournal(str(tmp_path / "journal"), 2 * FILE_SECONDS, clock)
    events = again.lookup("M1")
    assert ["attempt", "left"] == [e["event"] for e in events]
    assert 1000 == len(events[0]["text"])  # long reply text is cut
    assert 2 == again.usage()["files"]
    clock.advance(3 * FILE_SECONDS)
    assert 2 == again.purge()
    assert [] == again.lookup("M1")


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    clock = FakeClock()
    j = MessageJournal(str(tmp_path), 3600.0, clock)
    j.record("M1", "dsn", kind="failed")
    j.close()
    name = next(p for p in tmp_path.iterdir())
    with name.open("a") as f:
        f.write('{"id": "M1", "at": 1, "ev')
    assert ["dsn"] == [
        e["event"] for e in MessageJournal(str(tmp_path), 3600.0, clock).lookup("M1")
    ]


def test_the_story_of_a_message_that_left_comes_from_its_history() -> None:
    left = {
        "id": "M1",
        "at": NOW + 5,
        "event": "left",
        "reason": "delivered",
        "sender": "a@x.test",
        "recipients": ["u@a.test"],
        "received_at": NOW,
        "peer": "127.0.0.1:4000",
        "helo": "client.test",
        "size": 120,
        "units": [{"domain": "a.test", "status": "delivered", "history": []}],
    }
    attempt = {
        "id": "M1",
        "at": NOW + 4,
        "event": "attempt",
        "domain": "a.test",
        "mx": "mx.a.test",
        "address": "192.0.2.1",
        "tls": "TLSv1.3",
        "code": 250,
        "text": "250 2.0.0 ok",
        "delivered": ["u@a.test"],
    }
    story = message_story("M1", None, [attempt, left])
    texts = [e["text"] for e in story["events"]]
    assert texts[0].startswith("received from 127.0.0.1:4000 helo client.test: from <a@x.test>")
    assert (
        "attempt a.test via mx.a.test [192.0.2.1] tls TLSv1.3: 250 2.0.0 ok (1 delivered)"
        == (texts[1])
    )
    assert "left the queue: delivered (a.test delivered)" == texts[2]
    assert "left the queue: delivered" == story["status"] and not story["queued"]
    json.dumps(story)


def test_the_story_of_a_queued_message_uses_the_spool_where_the_history_has_nothing() -> None:
    live = msg(
        "M9",
        "a@x.test",
        NOW,
        unit("a.test", UnitStatus.RETRY, history=(Attempt(NOW + 1, "mx.a.test", 451, "later"),)),
    )
    story = message_story("M9", live, [])
    assert ["received", "attempt"] == [e["event"] for e in story["events"]]
    assert "attempt a.test via mx.a.test: 451 later" == story["events"][1]["text"]
    assert story["queued"] and "a.test retry" in story["status"]


# --- views yield to mail --------------------------------------------------------------------


async def test_a_long_view_takes_at_most_its_share_of_the_loop_while_mail_flows() -> None:
    from empath.control.ops import DUTY, MAX_PAUSE_S, Breather

    pauses: list[float] = []
    cpu = [0.0]
    busy = [True]

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    breathe = Breather(lambda: busy[0], sleep, cpu=lambda: cpu[0])
    cpu[0] += 0.002  # a chunk of 2 ms of the loop's CPU
    await breathe()
    cpu[0] += 0.2  # a long one: the pause is capped
    await breathe()
    busy[0] = False
    cpu[0] += 0.01
    await breathe()  # no SMTP session: only a yield
    assert [round(0.002 * (1 - DUTY) / DUTY, 6), MAX_PAUSE_S, 0.0] == [round(p, 6) for p in pauses]
