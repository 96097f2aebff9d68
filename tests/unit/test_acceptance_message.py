"""The message object acceptance steps change (transport/acceptance.py)."""

from __future__ import annotations

import pytest

from empath.transport.acceptance import AcceptedMessage, SessionFacts, split_message

FACTS = SessionFacts(
    peer_ip="192.0.2.1",
    peer="192.0.2.1:2525",
    helo="c.example",
    trusted=False,
    auth_user=None,
    tls=False,
    listener="test",
)


def message(data: bytes) -> AcceptedMessage:
    return AcceptedMessage("01TEST", data, sender="a@x.example", recipients=["b@y"], facts=FACTS)


@pytest.mark.parametrize(
    "data",
    [
        b"A: 1\r\nB: 2\r\n\tfolded\r\n\r\nbody\r\n",
        b"A: 1\r\n\r\n",
        b"A: 1\r\n\r\n\r\n\r\n",
        b"A: 1\r\n",
        b"",
        b"Subject: caf\xc3\xa9\r\n\r\n8bit \xff body\r\n",
    ],
)
def test_an_unchanged_message_is_reassembled_byte_for_byte(data: bytes) -> None:
    """Parsing and to_bytes() round-trip every well-formed shape exactly."""
    assert data == message(data).to_bytes()


def test_folded_fields_stay_one_field_and_unfold_for_reading() -> None:
    """A continuation line belongs to the field above; ``header`` unfolds it."""
    m = message(b"Subject: one\r\n two\r\nTo: b@y\r\n\r\n")
    assert ["Subject", "To"] == [f.name for f in m.headers]
    assert "one two" == m.header("subject")


def test_a_non_header_line_starts_the_body_and_gets_a_separator() -> None:
    """Text that is not a field ends the header block; once a step has read the fields,
    the blank line is added."""
    fields, body, sep = split_message(b"A: 1\r\nnot a header\r\nmore\r\n")
    assert (["A"], b"not a header\r\nmore\r\n", False) == ([f.name for f in fields], body, sep)
    m = message(b"A: 1\r\nnot a header\r\nmore\r\n")
    assert ["A"] == [f.name for f in m.headers]
    assert b"A: 1\r\n\r\nnot a header\r\nmore\r\n" == m.to_bytes()


def test_change_header_follows_milter_semantics() -> None:
    """The n-th occurrence is replaced; None deletes it; a missing one changes nothing."""
    m = message(b"X: 1\r\nY: a\r\nX: 2\r\n\r\nb\r\n")
    assert m.change_header("x", 2, "two")
    assert m.change_header("X", 1, None)
    assert not m.change_header("X", 5, "nope")
    assert b"Y: a\r\nX: two\r\n\r\nb\r\n" == m.to_bytes()


def test_add_header_appends_or_inserts() -> None:
    m = message(b"A: 1\r\n\r\nb\r\n")
    m.add_header("Z", "last")
    m.add_header("T", "top", index=0)
    assert b"T: top\r\nA: 1\r\nZ: last\r\n\r\nb\r\n" == m.to_bytes()
    assert 1 == m.delete_header("a")


@pytest.mark.parametrize(
    ("name", "value"),
    [("Bad Name", "v"), ("A:", "v"), ("", "v"), ("A", "x\r\ny: injected"), ("A", "x\ny")],
)
def test_header_injection_is_refused(name: str, value: str) -> None:
    """A name with blanks/colons or a value with an unfolded line break is refused."""
    with pytest.raises(ValueError, match="header"):
        message(b"A: 1\r\n\r\n").add_header(name, value)


def test_a_folded_value_is_accepted() -> None:
    m = message(b"A: 1\r\n\r\n")
    m.add_header("B", "one\r\n\ttwo")
    assert "one\ttwo" == m.header("B")


@pytest.mark.parametrize("body", [b"bare\nlf\r\n", b"bare\rcr\r\n"])
def test_replace_body_refuses_bare_line_ends(body: bytes) -> None:
    with pytest.raises(ValueError, match="bare CR or LF"):
        message(b"A: 1\r\n\r\n").replace_body(body)


def test_an_untouched_message_is_handed_on_as_the_very_bytes_received() -> None:
    """No step read or changed it: to_bytes() is the received object, no parse, no copy."""
    data = b"Received: from c\r\n\tby h; Mon, 7 Dec 2026 09:00:00 +0000\r\nSubject: s\r\n\r\nb\r\n"
    m = message(data)
    assert m.to_bytes() is data
    assert data == m.raw  # still unsplit after to_bytes()


def test_reading_the_headers_splits_the_message_and_edits_reach_the_bytes() -> None:
    """The first read of ``headers`` or ``body`` splits it; later bytes follow the fields."""
    data = b"Subject: s\r\n\r\nb\r\n"
    m = message(data)
    assert ["Subject"] == [f.name for f in m.headers]
    assert m.raw is None
    m.headers[0].raw = b"Subject: t\r\n"
    assert b"Subject: t\r\n\r\nb\r\n" == m.to_bytes()
    m2 = message(data)
    assert b"b\r\n" == m2.body
    m2.body = b"c\r\n"
    assert b"Subject: s\r\n\r\nc\r\n" == m2.to_bytes()


@pytest.mark.parametrize(
    "data",
    [
        b"A: 1\r\nnot a header\r\n\r\nbody\r\n",  # a line that is not a field
        b"A: 1\r\n",  # no separator
        b"\r\nbody\r\n",  # no field
        b"A: 1\rB: 2\r\nx\r\n",  # a bare CR
    ],
)
def test_an_untouched_message_of_any_shape_is_spooled_as_received(data: bytes) -> None:
    """What no step read or changed is spooled byte for byte as received, as a listener
    without steps spools it (no separator line added to an odd header block)."""
    m = message(data)
    assert m.to_bytes() is data
