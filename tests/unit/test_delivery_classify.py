"""Reply → outcome: 2xx delivered, 4xx temporary, 5xx permanent; network errors temporary."""

from __future__ import annotations

import pytest

from empath.delivery.classify import (
    OutcomeKind,
    RecipientOutcome,
    enhanced_of,
    error_from_reply,
    kind_of,
    outcome_from_error,
    outcome_from_reply,
)
from empath.errors import PermanentDeliveryError, TemporaryDeliveryError
from empath.smtp.replies import Reply


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (250, OutcomeKind.DELIVERED),
        (251, OutcomeKind.DELIVERED),
        (421, OutcomeKind.TEMPORARY),
        (450, OutcomeKind.TEMPORARY),
        (452, OutcomeKind.TEMPORARY),
        (354, OutcomeKind.TEMPORARY),  # a 3xx as a final answer: try again later
        (550, OutcomeKind.PERMANENT),
        (554, OutcomeKind.PERMANENT),
    ],
)
def test_reply_class_decides_the_outcome(code: int, kind: OutcomeKind) -> None:
    assert kind == kind_of(code)


@pytest.mark.parametrize(
    ("reply", "enhanced"),
    [
        (Reply(550, ("5.1.1 <x@y>: Recipient address rejected",)), "5.1.1"),
        (Reply(451, ("4.7.1 Greylisted",)), "4.7.1"),
        (Reply(550, ("No such user",)), "5.0.0"),  # no enhanced code → class default
        (Reply(450, ("5.1.1 wrong class",)), "4.0.0"),  # class mismatch is ignored
        (Reply(250, ("2.0.0 Ok: queued as 1234",)), "2.0.0"),
    ],
)
def test_enhanced_status_is_extracted_or_defaulted(reply: Reply, enhanced: str) -> None:
    assert enhanced == enhanced_of(reply)


def test_outcome_from_reply_keeps_code_enhanced_text_and_mx() -> None:
    out = outcome_from_reply("bad@x.test", Reply(550, ("5.1.1 No such user",)), "mx1.test")
    assert (
        RecipientOutcome(
            "bad@x.test", OutcomeKind.PERMANENT, 550, "5.1.1", "5.1.1 No such user", "mx1.test"
        )
        == out
    )
    assert out.permanent
    assert not out.temporary
    assert "550 5.1.1 No such user" == out.diagnostic


def test_outcome_from_error_is_temporary_with_no_code_for_network_errors() -> None:
    err = TemporaryDeliveryError("connect to mx1.test: Connection refused", enhanced="4.4.1")
    out = outcome_from_error("a@x.test", err)
    assert (OutcomeKind.TEMPORARY, None, "4.4.1") == (out.kind, out.code, out.enhanced)
    assert "connect to mx1.test: Connection refused" == out.diagnostic


def test_error_from_reply_is_permanent_for_5xx_and_temporary_for_4xx() -> None:
    perm = error_from_reply(Reply(554, ("5.7.1 go away",)), "mx.test", "greeting")
    temp = error_from_reply(Reply(421, ("4.3.2 busy",)), "mx.test")
    assert isinstance(perm, PermanentDeliveryError)
    assert (554, "5.7.1", "greeting: 554 5.7.1 go away") == (perm.code, perm.enhanced, perm.text)
    assert isinstance(temp, TemporaryDeliveryError)
    assert (421, "4.3.2") == (temp.code, temp.enhanced)
