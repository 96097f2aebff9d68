"""Reply value type and the client's incremental reply parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.errors import SmtpProtocolError
from empath.smtp.replies import MAX_REPLY_LINE_BYTES, Reply, ReplyParser


def test_single_line_reply_serialises_with_space() -> None:
    """A one-line reply is 'code SP text CRLF'."""
    assert b"250 2.0.0 Ok\r\n" == Reply.of(250, "2.0.0", "Ok").to_bytes()


def test_multi_line_reply_uses_hyphen_on_all_but_last_line() -> None:
    """Multi-line replies continue with '-' and end with ' '."""
    reply = Reply(250, ("mx.example.com", "PIPELINING", "SIZE 100"))
    assert b"250-mx.example.com\r\n250-PIPELINING\r\n250 SIZE 100\r\n" == reply.to_bytes()


def test_empty_text_reply_is_bare_code() -> None:
    """A reply without text is just the code."""
    assert b"354\r\n" == Reply(354, ()).to_bytes()


@pytest.mark.parametrize(
    ("reply", "enhanced", "positive", "transient", "permanent"),
    [
        (Reply(250, ("2.1.0 Ok",)), "2.1.0", True, False, False),
        (Reply(451, ("4.3.0 try later",)), "4.3.0", False, True, False),
        (Reply(550, ("5.7.1 Relay access denied",)), "5.7.1", False, False, True),
        (Reply(550, ("No such user",)), "", False, False, True),
        (Reply(250, ("2.0.0",)), "2.0.0", True, False, False),
        (Reply(250, ("2.0.0x nope",)), "", True, False, False),
        (Reply(220, ()), "", True, False, False),
    ],
)
def test_reply_classification(
    reply: Reply, enhanced: str, positive: bool, transient: bool, permanent: bool
) -> None:
    """enhanced / is_positive / is_transient / is_permanent follow code and first line."""
    assert enhanced == reply.enhanced
    assert positive == reply.is_positive
    assert transient == reply.is_transient
    assert permanent == reply.is_permanent


def test_text_joins_lines_with_space() -> None:
    """Reply.text is every line joined by one space."""
    assert "5.1.1 user unknown here" == Reply(550, ("5.1.1 user", "unknown here")).text


def test_parser_assembles_reply_split_across_reads() -> None:
    """A reply split at arbitrary points is returned once complete."""
    p = ReplyParser()
    assert [] == p.feed(b"250-mx.exa")
    assert [] == p.feed(b"mple.com\r\n250-PIPE")
    assert p.pending
    assert [Reply(250, ("mx.example.com", "PIPELINING", "8BITMIME"))] == p.feed(
        b"LINING\r\n250 8BITMIME\r\n"
    )
    assert not p.pending


def test_parser_returns_several_replies_from_one_read() -> None:
    """Pipelined answers arriving together are all returned, in order."""
    p = ReplyParser()
    got = p.feed(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n554 5.7.1 Relay access denied\r\n354 go\r\n")
    assert [250, 250, 554, 354] == [r.code for r in got]
    assert "5.7.1" == got[2].enhanced


def test_parser_accepts_bare_lf_and_code_only_lines() -> None:
    """Readers are liberal: LF-only line ends and a bare '250' parse."""
    assert [Reply(250, ("",)), Reply(221, ("bye",))] == ReplyParser().feed(b"250\n221 bye\n")


@pytest.mark.parametrize(
    "data",
    [
        b"hello\r\n",
        b"25\r\n",
        b"2500 x\r\n",
        b"250_x\r\n",
        b"650 x\r\n",
        b"250-a\r\n251 b\r\n",
        b"x" * (MAX_REPLY_LINE_BYTES + 1),
        b"250 " + b"x" * MAX_REPLY_LINE_BYTES + b"\r\n",
    ],
)
def test_parser_rejects_garbage(data: bytes) -> None:
    """Malformed lines, mixed codes and over-long lines raise SmtpProtocolError."""
    with pytest.raises(SmtpProtocolError):
        ReplyParser().feed(data)


def test_parser_bounds_number_of_lines() -> None:
    """An endless multi-line reply is refused."""
    with pytest.raises(SmtpProtocolError):
        ReplyParser().feed(b"250-x\r\n" * 1000)


@given(
    st.lists(
        st.tuples(
            st.integers(200, 599),
            st.lists(
                st.text(
                    st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]),
                    max_size=50,
                ),
                min_size=1,
                max_size=5,
            ),
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(1, 17),
)
def test_parser_round_trips_serialised_replies(
    specs: list[tuple[int, list[str]]], step: int
) -> None:
    """to_bytes → feed in arbitrary slices gives back the same replies."""
    replies = [Reply(code, tuple(lines)) for code, lines in specs]
    wire = b"".join(r.to_bytes() for r in replies)
    p = ReplyParser()
    got: list[Reply] = []
    for i in range(0, len(wire), step):
        got += p.feed(wire[i : i + step])
    # the wire form of an empty last line is the bare code; both read back as ""
    assert [r.code for r in replies] == [r.code for r in got]
    assert [r.lines for r in replies] == [r.lines for r in got]


@given(st.binary(max_size=300))
def test_parser_only_raises_protocol_errors(data: bytes) -> None:
    """Random bytes either parse or raise SmtpProtocolError, nothing else."""
    try:
        ReplyParser().feed(data)
    except SmtpProtocolError:
        pass
