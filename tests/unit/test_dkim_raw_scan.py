"""Reading a message's ``From:`` from its received bytes (dkim/policy.py ``scan_raw``)
and its fields in the key process (dkim/sign.py ``plain_fields``) agree with the
acceptance pipeline's split (transport/acceptance.py): whenever the scan answers, the
header block ends where ``split_message`` ends it, its ``From:`` values are
``header_values("From")`` and the key process signs exactly the split fields; and
the scan answers for the messages a session actually holds."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from empath.dkim.policy import scan_raw
from empath.dkim.sign import parse_fields, plain_fields
from empath.transport.acceptance import AcceptedMessage, SessionFacts, split_message

FACTS = SessionFacts("192.0.2.1", "192.0.2.1:1", "c", True, None, False, "smtp")

# header lines rich in what the split and the scan treat specially
_LINES = [b"From: a@example.org\r\n", b"from:b@example.org\r\n", b"FROM: <c@example.org>\r\n",
          b"From : d@example.org\r\n", b"From\t: e@example.org\r\n", b" folded\r\n",
          b"\tfolded\r\n", b"Subject: x\r\n", b"X-From: f@example.org\r\n",
          b"DKIM-Signature: v=1; d=example.org; s=r\r\n", b"dkim-signature :x\r\n",
          b"no colon here\r\n", b"Bad name: x\r\n", b": empty name\r\n", b"\r\n",
          b"To: x\rlone CR\r\n", b"To: x\nfrom: lone LF\r\n", b"Date: \xc3\xa9\r\n",
          b"Received: from x\r\n", b"From: f@example.org", b"body line\r\n"]  # fmt: skip
messages = st.lists(st.sampled_from(_LINES), max_size=12).map(b"".join)


def message(raw: bytes) -> AcceptedMessage:
    return AcceptedMessage("01X", raw, sender="", recipients=["r@x"], facts=FACTS)


@settings(max_examples=1500)
@given(raw=messages)
@example(raw=b"Received: x\r\n\tby y\r\nFrom: Alice\r\n <a@example.org>\r\nTo: b\r\n\r\nbody\r\n")
@example(raw=b"From: a@example.org\r\nX: from: b\r\n\r\n")
@example(raw=b"From: a@example.org\r\nno colon\r\nFrom: b@example.org\r\n\r\n")
@example(raw=b"To: x\nfrom: b@example.org\r\nFrom: a@example.org\r\n\r\n")
def test_the_scan_agrees_with_the_split_whenever_it_answers(raw: bytes) -> None:
    scanned = scan_raw(raw)
    if scanned is None:
        return
    head, from_values = scanned
    fields, body, separator = split_message(raw)
    m = message(raw)
    assert separator
    assert body == raw[head + 2 :]
    assert b"".join(f.raw for f in fields) == raw[:head]
    assert from_values == m.header_values("From")
    assert [] == m.header_values("DKIM-Signature")
    assert parse_fields([f.raw for f in fields]) == plain_fields(raw, head)


def test_a_session_held_message_is_scanned_not_split() -> None:
    raw = (b"Received: from c (c [192.0.2.1])\r\n\tby empath.test (Empath) with ESMTP id 01X\r\n"
           b"\tfor <r@x>; Mon, 07 Dec 2026 12:00:00 +0000\r\n"
           b"From: Alice <alice@example.org>\r\nTo: b@example.net\r\nSubject: hi\r\n"
           b" folded\r\n\r\nbody\r\n")  # fmt: skip
    assert (raw.index(b"\r\n\r\n") + 2, ["Alice <alice@example.org>"]) == scan_raw(raw)
    sender = raw.replace(b"From:", b"Sender:")
    assert (sender.index(b"\r\n\r\n") + 2, []) == scan_raw(sender)


def test_signatures_odd_lines_and_several_froms_are_left_to_the_split() -> None:
    base = b"From: a@example.org\r\nTo: b@example.net\r\n\r\nbody\r\n"
    assert scan_raw(base) is not None
    for odd in (
        b"DKIM-Signature: v=1; d=example.org; s=r\r\n" + base,  # an earlier hop signed it
        b"From: b@example.org\r\n" + base,  # two From: fields
        b"From : b@example.org\r\n" + base[6:],  # obsolete blank before the colon
        base.replace(b"To: b", b"To b"),  # a line that is no field ends the header early
        base.replace(b"\r\n\r\n", b"\r\n"),  # no empty line at all
        b" folded first\r\n" + base,
    ):
        assert scan_raw(odd) is None, odd
