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
    """Text that is not a field ends the header block; the blank line is added."""
    fields, body, sep = split_message(b"A: 1\r\nnot a header\r\nmore\r\n")
    assert (["A"], b"not a header\r\nmore\r\n", False) == ([f.name for f in fields], body, sep)
    assert (
        b"A: 1\r\n\r\nnot a header\r\nmore\r\n"
        == message(b"A: 1\r\nnot a header\r\nmore\r\n").to_bytes()
    )


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
