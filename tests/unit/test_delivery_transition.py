"""Delivery decisions (empath.delivery.transition): examples, then properties with hypothesis.

Time is a FakeClock; the retry policy's jitter comes from a seeded Random.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from empath.delivery.bounce import DsnAction, DsnKind
from empath.delivery.classify import (
    AttemptResult,
    OutcomeKind,
    RecipientOutcome,
    outcome_from_reply,
)
from empath.delivery.transition import (
    Severity,
    Transition,
    TransitionSettings,
    after_attempt,
    deleted,
    destination_of,
    expire,
    expired_while_waiting,
    released,
)
from empath.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from empath.policy.retry import RetryPolicy
from empath.smtp.replies import Reply
from empath.spool.model import (
    Attempt,
    Envelope,
    RcptStatus,
    UnitState,
    UnitStatus,
    initial_units,
)
from empath.testing.clock import FakeClock

DOMAIN = "x.test"
SETTINGS = TransitionSettings(delay_warning_s=4 * 3600, dsn_enabled=True)
MAX_ATTEMPTS = 5
EXPIRATION_S = 5 * 86400


def policy(seed: int = 0, max_attempts: int = MAX_ATTEMPTS) -> RetryPolicy:
    return RetryPolicy(60.0, 3600.0, 0.2, max_attempts, EXPIRATION_S, rng=random.Random(seed))


def new_unit(*locals_: str) -> UnitState:
    (unit,) = initial_units([f"{lp}@{DOMAIN}" for lp in locals_])
    return unit


def envelope(clock: FakeClock, sender: str = "s@origin.test", **kw: object) -> Envelope:
    rcpts = ("a@x.test",)
    return Envelope(sender, rcpts, clock.now(), **kw)  # type: ignore[arg-type]


REPLIES = {
    2: Reply.of(250, "2.0.0", "Ok"),
    4: Reply.of(450, "4.2.0", "greylisted"),
    5: Reply.of(550, "5.1.1", "no such user"),
}


def replied(unit: UnitState, classes: dict[str, int], **kw: object) -> AttemptResult:
    """The result of an attempt where the MX answered each pending recipient."""
    outcomes = tuple(
        outcome_from_reply(a, REPLIES[classes.get(a, 2)], "mx1.x.test")
        for a in unit.pending_recipients()
    )
    return AttemptResult(outcomes, "mx1.x.test", address="192.0.2.1", port=25, **kw)  # type: ignore[arg-type]


def step(
    unit: UnitState, result: AttemptResult, env: Envelope, clock: FakeClock, **kw: object
) -> Transition:
    return after_attempt(
        unit,
        result,
        envelope=env,
        retry=kw.get("retry", policy()),  # type: ignore[arg-type]
        now=clock.now(),
        settings=kw.get("settings", SETTINGS),  # type: ignore[arg-type]
    )


def event(t: Transition, message: str) -> dict[str, object]:
    (found,) = [e for e in t.events if e.message == message]
    return found.fields


# -- examples --------------------------------------------------------------------------


def test_all_delivered_is_final_with_one_audit_line_naming_tls_and_the_mx_address() -> None:
    clock = FakeClock()
    env = envelope(clock)
    unit = new_unit("a", "b")
    clock.advance(1)
    t = step(
        unit,
        replied(unit, {}, tls_version="TLSv1.3", tls_cipher="TLS_AES_128_GCM_SHA256"),
        env,
        clock,
    )
    assert (UnitStatus.DELIVERED, 1, clock.now()) == (
        t.unit.status,
        t.unit.attempts,
        t.unit.finished_at,
    )
    assert () == t.dsns
    fields = event(t, "Delivered")
    assert ("TLSv1.3", "192.0.2.1", 2, True) == (
        fields["tls"],
        fields["mx_address"],
        fields["recipients"],
        fields["audit"],
    )
    assert (OutcomeKind.DELIVERED, True, True) == (t.destination, t.attempted, t.ok)


def test_a_final_unit_keeps_every_field_the_attempt_does_not_decide() -> None:
    """The final unit is built field by field (no replace(): per relayed message); it
    must equal replace() of the old unit with only what the attempt decides changed."""
    clock = FakeClock()
    env = envelope(clock)
    earlier = Attempt(clock.now() - 600, "mx0.x.test", 451, "4.0.0 busy")
    unit = replace(
        new_unit("a"),
        status=UnitStatus.RETRY,
        attempts=2,
        next_attempt_at=clock.now() - 5,
        history=(earlier,),
        delay_warned=True,
        last_error="4.0.0 busy",
        reopened_at=clock.now() - 60,
        released_at=clock.now() - 30,
    )
    # every field of UnitState differs from its default here, so a field added later
    # and left out of the construction fails this test
    defaults = UnitState(DOMAIN, ())
    changed = {
        f.name for f in fields(UnitState) if getattr(unit, f.name) != getattr(defaults, f.name)
    }
    assert {f.name for f in fields(UnitState)} - {"domain", "finished_at"} == changed
    clock.advance(1)
    t = step(unit, replied(unit, {}), env, clock)
    attempt = Attempt(clock.now(), "mx1.x.test", 250, t.unit.history[-1].text)
    expected = replace(
        unit,
        recipients=t.unit.recipients,
        status=UnitStatus.DELIVERED,
        attempts=3,
        history=(earlier, attempt),
        last_error="",
        finished_at=clock.now(),
    )
    assert expected == t.unit
    assert RcptStatus.DELIVERED == t.unit.recipients[0].status


def test_per_message_records_hash_and_compare_by_value_as_frozen_ones_did() -> None:
    """Made plain for speed (spool/model.py, smtp/replies.py doc): still usable as keys."""
    clock = FakeClock()
    a, b = new_unit("a"), new_unit("a")
    assert (a, hash(a)) == (b, hash(b))
    assert 1 == len({REPLIES[2], Reply.of(250, "2.0.0", "Ok")})
    assert 1 == len({envelope(clock), envelope(clock)})


def test_mixed_replies_bounce_the_5xx_now_and_retry_the_4xx() -> None:
    clock = FakeClock()
    env = envelope(clock)
    unit = new_unit("ok", "bad", "later")
    t = step(unit, replied(unit, {"bad@x.test": 5, "later@x.test": 4}), env, clock)
    assert UnitStatus.RETRY is t.unit.status
    assert t.retry_at is not None and clock.now() + 48 <= t.retry_at <= clock.now() + 72
    (dsn,) = t.dsns
    assert DsnKind.FAILED is dsn.kind
    assert [("bad@x.test", DsnAction.FAILED, "5.1.1")] == [
        (r.address, r.action, r.status) for r in dsn.recipients
    ]
    statuses = {r.address: r.status for r in t.unit.recipients}
    assert statuses == {
        "ok@x.test": RcptStatus.DELIVERED,
        "bad@x.test": RcptStatus.FAILED,
        "later@x.test": RcptStatus.PENDING,
    }
    assert "none" == event(t, "Delivery deferred")["tls"]
    assert OutcomeKind.DELIVERED is t.destination and t.permanent_failure and not t.ok


def test_delay_warning_keeps_the_transient_status_and_is_sent_once() -> None:
    clock = FakeClock()
    env = envelope(clock)
    unit = new_unit("g")
    clock.advance(SETTINGS.delay_warning_s)
    first = step(unit, replied(unit, {"g@x.test": 4}), env, clock)
    (dsn,) = first.dsns
    (report,) = dsn.recipients
    assert (DsnKind.DELAYED, DsnAction.DELAYED, "4.2.0") == (dsn.kind, report.action, report.status)
    assert env.received_at + EXPIRATION_S == report.will_retry_until
    clock.advance(600)
    again = step(first.unit, replied(first.unit, {"g@x.test": 4}), env, clock)
    assert () == again.dsns and again.unit.delay_warned


def test_the_last_allowed_attempt_gives_up_and_only_then_the_status_is_permanent() -> None:
    clock = FakeClock()
    env = envelope(clock)
    unit = new_unit("q")
    retry = policy(max_attempts=2)
    t = step(unit, replied(unit, {"q@x.test": 4}), env, clock, retry=retry)
    assert UnitStatus.RETRY is t.unit.status
    t = step(t.unit, replied(t.unit, {"q@x.test": 4}), env, clock, retry=retry)
    assert UnitStatus.FAILED is t.unit.status
    (dsn,) = t.dsns
    assert (DsnKind.EXHAUSTED, "5.2.0") == (dsn.kind, dsn.recipients[0].status)
    assert "gave up after 2 attempts" in str(event(t, "Delivery gave up")["error"])
    assert OutcomeKind.TEMPORARY is t.destination


def test_a_failure_at_the_deadline_expires_the_unit() -> None:
    clock = FakeClock()
    env = envelope(clock)
    unit = new_unit("e")
    clock.advance(EXPIRATION_S)
    t = step(unit, replied(unit, {"e@x.test": 4}), env, clock)
    assert UnitStatus.EXPIRED is t.unit.status
    assert (DsnKind.EXPIRED, "5.2.0") == (t.dsns[0].kind, t.dsns[0].recipients[0].status)


def test_expiry_while_waiting_fails_without_an_attempt() -> None:
    clock = FakeClock()
    env = envelope(clock)
    unit = new_unit("w")
    t = step(
        unit,
        AttemptResult.failed(
            unit.pending_recipients(),
            TemporaryDeliveryError(
                "connect to mx1.x.test[192.0.2.1]:25: Connection refused",
                enhanced="4.4.1",
                mx="mx1.x.test",
            ),
        ),
        env,
        clock,
    )
    assert not expired_while_waiting(t.unit, env, policy(), clock.now())
    clock.advance(EXPIRATION_S)
    assert expired_while_waiting(t.unit, env, policy(), clock.now())
    gone = expire(t.unit, envelope=env, now=clock.now(), settings=SETTINGS)
    assert (UnitStatus.EXPIRED, 1) == (gone.unit.status, gone.unit.attempts)
    (dsn,) = gone.dsns
    (report,) = dsn.recipients
    assert (DsnKind.EXPIRED, DsnAction.FAILED, "5.4.7") == (dsn.kind, report.action, report.status)
    assert "mx1.x.test" == report.remote_mta
    assert (None, False, True) == (gone.destination, gone.attempted, gone.permanent_failure)


@pytest.mark.parametrize("env_kw", [{"sender": ""}, {"is_dsn": True}], ids=["null sender", "a DSN"])
def test_no_dsn_to_a_null_sender_or_about_a_dsn(env_kw: dict[str, object]) -> None:
    clock = FakeClock()
    env = envelope(clock, **env_kw)  # type: ignore[arg-type]
    unit = new_unit("bad")
    t = step(unit, replied(unit, {"bad@x.test": 5}), env, clock)
    assert UnitStatus.FAILED is t.unit.status
    assert () == t.dsns
    assert event(t, "Delivery failed permanently")


def test_dsns_off_sends_none() -> None:
    clock = FakeClock()
    unit = new_unit("bad")
    off = TransitionSettings(delay_warning_s=0, dsn_enabled=False)
    t = step(unit, replied(unit, {"bad@x.test": 5}), envelope(clock), clock, settings=off)
    assert () == t.dsns


def test_a_final_unit_is_left_alone() -> None:
    clock = FakeClock()
    env = envelope(clock)
    unit = new_unit("a")
    done = step(unit, replied(unit, {}), env, clock).unit
    again = step(done, replied(unit, {"a@x.test": 5}), env, clock)
    assert (done, (), ()) == (again.unit, again.dsns, again.events)
    assert done == expire(done, envelope=env, now=clock.now(), settings=SETTINGS).unit


def test_a_permanent_routing_error_fails_every_recipient_with_its_status() -> None:
    clock = FakeClock()
    unit = new_unit("a", "b")
    error = PermanentDeliveryError("mail for x.test loops back to myself", enhanced="5.4.6")
    t = step(unit, AttemptResult.failed(unit.pending_recipients(), error), envelope(clock), clock)
    assert UnitStatus.FAILED is t.unit.status
    assert ["5.4.6", "5.4.6"] == [r.status for r in t.dsns[0].recipients]
    assert OutcomeKind.PERMANENT is t.destination


def test_a_reopened_unit_counts_its_expiry_from_the_reopening() -> None:
    clock = FakeClock()
    env = envelope(clock)
    clock.advance(EXPIRATION_S + 10)
    unit = replace(new_unit("r"), attempts=3, reopened_at=clock.now())
    assert not expired_while_waiting(unit, env, policy(), clock.now())
    t = step(unit, replied(unit, {"r@x.test": 4}), env, clock)
    assert UnitStatus.RETRY is t.unit.status


def _held_past_its_deadline(clock: FakeClock, env: Envelope) -> UnitState:
    """A unit that failed once, was held, and stayed held past its deadline."""
    unit = new_unit("h")
    failed = step(unit, replied(unit, {"h@x.test": 4}), env, clock).unit
    clock.advance(EXPIRATION_S + 3600)
    return replace(failed, status=UnitStatus.HELD)


def test_a_unit_released_past_its_deadline_gets_one_attempt_as_postfix_does() -> None:
    """postsuper -H: held mail does not expire; once released the next attempt is made,
    and it is the temporary failure after the deadline that expires the unit."""
    clock = FakeClock()
    env = envelope(clock)
    held = _held_past_its_deadline(clock, env)
    unit = released(held, clock.now())
    assert (UnitStatus.RETRY, clock.now()) == (unit.status, unit.next_attempt_at)
    assert not expired_while_waiting(unit, env, policy(), clock.now())
    assert UnitStatus.DELIVERED is step(unit, replied(unit, {}), env, clock).unit.status
    t = step(unit, replied(unit, {"h@x.test": 4}), env, clock)
    assert UnitStatus.EXPIRED is t.unit.status
    assert DsnKind.EXPIRED is t.dsns[0].kind
    # the attempt was the one owed: waiting again past the deadline expires without one
    again = replace(t.unit, status=UnitStatus.RETRY, recipients=unit.recipients)
    assert expired_while_waiting(again, env, policy(), clock.now() + 1)


def test_a_release_with_restart_expiry_gives_a_new_lifetime() -> None:
    """postsuper -r: the released unit's expiry counts from the release."""
    clock = FakeClock()
    env = envelope(clock)
    unit = released(_held_past_its_deadline(clock, env), clock.now(), restart_expiry=True)
    assert clock.now() == unit.reopened_at
    t = step(unit, replied(unit, {"h@x.test": 4}), env, clock)
    assert UnitStatus.RETRY is t.unit.status
    clock.advance(EXPIRATION_S)
    assert expired_while_waiting(t.unit, env, policy(), clock.now())


def test_releasing_a_unit_that_is_not_held_changes_nothing() -> None:
    unit = new_unit("n")
    assert unit is released(unit, 123.0)


def test_operator_delete_bounces_every_pending_recipient_once() -> None:
    clock = FakeClock()
    env = envelope(clock)
    a = new_unit("p", "d")
    a = step(a, replied(a, {"p@x.test": 4}), env, clock).unit
    report = deleted((a,), envelope=env, settings=SETTINGS)
    assert report is not None and DsnKind.DELETED is report.kind
    assert [("p@x.test", "5.0.0")] == [(r.address, r.status) for r in report.recipients]
    assert deleted((a,), envelope=envelope(clock, sender=""), settings=SETTINGS) is None


def _o(kind: OutcomeKind | str) -> RecipientOutcome:
    """An outcome; ``"rcpt4xx"`` is a 4xx to that recipient's own RCPT."""
    if kind == "rcpt4xx":
        return RecipientOutcome("a@x", OutcomeKind.TEMPORARY, 451, "4.2.1", "busy", at_rcpt=True)
    return RecipientOutcome("a@x", OutcomeKind(kind), None, "", "")


@pytest.mark.parametrize(
    ("kinds", "error", "destination"),
    [
        ((OutcomeKind.TEMPORARY,), None, OutcomeKind.TEMPORARY),
        ((OutcomeKind.TEMPORARY, OutcomeKind.PERMANENT), None, OutcomeKind.TEMPORARY),
        ((OutcomeKind.PERMANENT,), None, OutcomeKind.PERMANENT),  # 5xx never counts
        ((OutcomeKind.DELIVERED, OutcomeKind.TEMPORARY), None, OutcomeKind.DELIVERED),
        ((), TemporaryDeliveryError("DNS timeout"), OutcomeKind.TEMPORARY),
        ((), None, OutcomeKind.PERMANENT),
        # A 4xx to one RCPT is that mailbox's trouble: the destination answered, it works.
        (("rcpt4xx", "rcpt4xx", "rcpt4xx"), None, OutcomeKind.DELIVERED),
        (("rcpt4xx", OutcomeKind.PERMANENT), None, OutcomeKind.DELIVERED),
        (("rcpt4xx", OutcomeKind.TEMPORARY), None, OutcomeKind.TEMPORARY),
    ],
)
def test_what_an_attempt_says_about_the_destination(
    kinds: tuple[OutcomeKind | str, ...], error: DeliveryError | None, destination: OutcomeKind
) -> None:
    result = AttemptResult(tuple(_o(k) for k in kinds), "mx", error=error)
    assert destination is destination_of(result)


# -- properties ------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    wait_s: float
    classes: tuple[int, ...]  # reply class per recipient (2, 4, 5); 0 = routing failed
    route_permanent: bool


steps = st.builds(
    Step,
    wait_s=st.floats(0, 2 * 86400, allow_nan=False),
    classes=st.lists(st.sampled_from([2, 4, 4, 5, 0]), min_size=4, max_size=4).map(tuple),
    route_permanent=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    n_rcpts=st.integers(1, 4),
    plan=st.lists(steps, min_size=1, max_size=12),
    seed=st.integers(0, 1000),
    max_attempts=st.integers(1, 8),
    null_sender=st.booleans(),
)
def test_properties_of_any_sequence_of_attempts(
    n_rcpts: int, plan: list[Step], seed: int, max_attempts: int, null_sender: bool
) -> None:
    clock = FakeClock()
    env = envelope(clock, sender="" if null_sender else "s@origin.test")
    retry = policy(seed, max_attempts)
    unit = new_unit(*(f"r{i}" for i in range(n_rcpts)))
    failure_reports: list[str] = []
    delayed_dsns = 0
    for s in plan:
        clock.advance(s.wait_s)
        now = clock.now()
        before = unit
        if expired_while_waiting(unit, env, retry, now):
            t = expire(unit, envelope=env, now=now, settings=SETTINGS)
            assert t.unit.attempts == before.attempts
            all_transient = False
        else:
            pending = unit.pending_recipients()
            classes = {a: s.classes[i] for i, a in enumerate(r.address for r in unit.recipients)}
            if any(classes[a] == 0 for a in pending):
                cls = PermanentDeliveryError if s.route_permanent else TemporaryDeliveryError
                result = AttemptResult.failed(pending, cls("routing failed", mx=""))
            else:
                result = replied(unit, classes)
            all_transient = not before.status.terminal and all(o.temporary for o in result.outcomes)
            t = after_attempt(unit, result, envelope=env, retry=retry, now=now, settings=SETTINGS)
            if not before.status.terminal:
                assert t.unit.attempts == before.attempts + 1  # attempts only grow, by one
        unit = t.unit

        # A final unit never changes again (and says nothing).
        if before.status.terminal:
            assert (before, (), ()) == (unit, t.dsns, t.events)
        assert unit.attempts >= before.attempts
        # A recipient's final status never changes.
        for old, new in zip(before.recipients, unit.recipients, strict=True):
            if old.status is not RcptStatus.PENDING:
                assert old == new
        # A 4xx never fails a recipient before max_attempts or the deadline.
        if all_transient and unit.attempts < max_attempts and now < retry.deadline(env.received_at):
            assert UnitStatus.RETRY is unit.status
            assert [r.status for r in before.recipients] == [r.status for r in unit.recipients]
        # RFC 3464 Action with its RFC 3463 class; no DSN to the null sender.
        for dsn in t.dsns:
            assert not null_sender
            for r in dsn.recipients:
                assert r.action is dsn.kind.action
                assert r.status[0] == ("4" if r.action is DsnAction.DELAYED else "5")
                if r.action is DsnAction.FAILED:
                    failure_reports.append(r.address)
            delayed_dsns += dsn.kind is DsnKind.DELAYED
        assert t.events or before.status.terminal
        assert all(e.severity in Severity for e in t.events)

    # Exactly one failure DSN entry per failed recipient, none for the others.
    failed = sorted(r.address for r in unit.recipients if r.status is RcptStatus.FAILED)
    assert ([] if null_sender else failed) == sorted(failure_reports)
    assert delayed_dsns <= 1
    assert (unit.status is UnitStatus.RETRY) == bool(unit.pending_recipients())
