"""Dot-stuffing, the end-of-data rule, smuggling defences and BDAT chunks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.smtp.data import (
    MAX_LINE_BYTES,
    BdatDecoder,
    BodyError,
    DataDecoder,
    DotStuffer,
    dot_stuff,
)


def decode(
    wire: bytes, step: int = 0, max_bytes: int = 0
) -> tuple[bytes, bool, bytes, DataDecoder]:
    """Feed wire to a fresh decoder in slices of `step` (0 = all at once)."""
    dec = DataDecoder(max_bytes)
    body, done, rest = [], False, b""
    step = step or max(1, len(wire))
    for i in range(0, len(wire), step):
        if done:
            rest += wire[i : i + step]
            continue
        part, done, left = dec.feed(wire[i : i + step])
        body.append(part)
        rest += left
    return b"".join(body), done, rest, dec


# CRLF bodies: lines of printable bytes (dots are common at line starts), CRLF-joined.
_line = st.binary(max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
) | st.sampled_from([b".", b"..", b".x", b"", b"...\t"])
crlf_bodies = st.lists(_line, max_size=12).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"x\r\n.y\r\n..\r\n", b"x\r\n..y\r\n...\r\n.\r\n"),
        (b"bare\nlf", b"bare\r\nlf\r\n.\r\n"),
        (b"bare\rcr\r", b"bare\r\ncr\r\n.\r\n"),
    ],
)
def test_dot_stuffer_table(body: bytes, wire: bytes) -> None:
    """Leading dots are doubled, a final CRLF is added, bare CR/LF become CRLF."""
    assert wire == dot_stuff(body)


@given(crlf_bodies, st.integers(1, 9))
def test_dot_stuffer_is_independent_of_chunking(body: bytes, step: int) -> None:
    """Feeding a body in any slices gives the same wire bytes as all at once."""
    s = DotStuffer()
    out = b"".join(s.feed(body[i : i + step]) for i in range(0, len(body), step)) + s.finish()
    assert dot_stuff(body) == out


@given(crlf_bodies, st.integers(1, 9), st.binary(max_size=20))
def test_stuff_then_decode_round_trips(body: bytes, step: int, after: bytes) -> None:
    """Any CRLF body survives DotStuffer → DataDecoder byte-exact, chunked anyhow;
    bytes after the terminator come back as leftover."""
    got, done, rest, dec = decode(dot_stuff(body) + after, step)
    assert (body, True, after) == (got, done, rest)
    assert dec.error is None
    assert len(body) == dec.size


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("bare LF", b"Subject: x\r\n\r\nhello\nworld\r\n.\r\n"),
        ("bare CR", b"Subject: x\r\n\r\nhello\rworld\r\n.\r\n"),
        ("LF.LF", b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<a@b>\r\n.\r\n"),
        ("CR.CR", b"Subject: x\r\n\r\nhello\r.\rMAIL FROM:<a@b>\r\n.\r\n"),
        ("LF.CRLF", b"Subject: x\r\n\r\nhello\n.\r\nMAIL FROM:<a@b>\r\n.\r\n"),
        ("CRLF.LF", b"Subject: x\r\n\r\nhello\r\n.\nMAIL FROM:<a@b>\r\n.\r\n"),
        ("CR.CRLF", b"Subject: x\r\n\r\nhello\r.\r\nMAIL FROM:<a@b>\r\n.\r\n"),
        ("NUL", b"Subject: x\r\n\r\nhel\0lo\r\n.\r\n"),
        ("trailing bare CR", b"hello\r\r\n.\r\n"),
    ],
)
@pytest.mark.parametrize("step", [0, 1, 2, 3, 7])
def test_smuggling_inputs_are_rejected_and_read_to_the_real_end(
    name: str, wire: bytes, step: int
) -> None:
    """Fake terminators never end DATA; the message is marked bad, yields no body
    once detected, and only the real <CRLF>.<CRLF> ends it."""
    _, done, rest, dec = decode(wire + b"QUIT\r\n", step)
    assert True is done, name
    assert b"QUIT\r\n" == rest
    assert dec.error in (BodyError.BARE_LINE_ENDING, BodyError.NUL)


def test_terminator_at_the_very_start_means_empty_body() -> None:
    """'.<CRLF>' right after DATA is an empty message."""
    assert (b"", True, b"NOOP\r\n") == decode(b".\r\nNOOP\r\n")[:3]


def test_line_of_exactly_1000_octets_is_fine_but_1001_is_not() -> None:
    """RFC 5321 §4.5.3.1.6: 1000 octets including CRLF is the limit."""
    ok = b"h\r\n" + b"x" * (MAX_LINE_BYTES - 2) + b"\r\n"
    bad = b"h\r\n" + b"x" * (MAX_LINE_BYTES - 1) + b"\r\n"
    for step in (0, 1, 333):
        assert None is decode(ok + b".\r\n", step)[3].error
        assert BodyError.LINE_TOO_LONG is decode(bad + b".\r\n", step)[3].error
        assert BodyError.LINE_TOO_LONG is decode(bad[3:] + b".\r\n", step)[3].error
        assert BodyError.LINE_TOO_LONG is decode(b"a\r\nb\r\n" + bad + b"c\r\n.\r\n")[3].error


def test_oversize_is_drained_and_flagged() -> None:
    """More than max_bytes: TOO_BIG, no body past the limit, read to the end."""
    wire = b"0123456789\r\n" * 100 + b".\r\nQUIT\r\n"
    body, done, rest, dec = decode(wire, 50, max_bytes=500)
    assert (True, b"QUIT\r\n", BodyError.TOO_BIG) == (done, rest, dec.error)
    assert len(body) <= 500


def test_exactly_max_bytes_is_accepted() -> None:
    """A body of exactly max_bytes is not too big."""
    wire = b"0123456789\r\n" * 10 + b".\r\n"
    assert None is decode(wire, 0, max_bytes=120)[3].error


def test_bdat_chunks_are_exact_and_last_finishes() -> None:
    """BDAT reads exact counts; a CRLF may be split across chunks; LAST ends it."""
    dec = BdatDecoder(0)
    dec.start_chunk(6, last=False)
    assert (b"hello", True, b"BDAT 8 LAST\r\n") == dec.feed(b"hello\rBDAT 8 LAST\r\n")
    assert not dec.finished
    dec.start_chunk(8, last=True)
    assert (b"\r\nwor", False, b"") == dec.feed(b"\nwor")
    assert (b"ld\r\n", True, b"QUIT\r\n") == dec.feed(b"ld\r\nQUIT\r\n")
    assert dec.finished
    assert dec.error is None
    assert 14 == dec.size


@pytest.mark.parametrize(
    ("chunks", "error"),
    [
        ([b"a\nb\r\n"], BodyError.BARE_LINE_ENDING),
        ([b"a\r"], BodyError.BARE_LINE_ENDING),
        ([b"a\r", b"b\r\n"], BodyError.BARE_LINE_ENDING),
        ([b"a\0\r\n"], BodyError.NUL),
        ([b"a\r", b"\nb\r\n"], None),
    ],
)
def test_bdat_content_rules(chunks: list[bytes], error: BodyError | None) -> None:
    """BDAT content obeys the same bare-CR/LF and NUL rules as DATA."""
    dec = BdatDecoder(0)
    for i, c in enumerate(chunks):
        dec.start_chunk(len(c), last=i == len(chunks) - 1)
        dec.feed(c)
    assert dec.finished
    assert error is dec.error


def test_bdat_zero_length_last_chunk_finishes() -> None:
    """'BDAT 0 LAST' completes the message at once."""
    dec = BdatDecoder(0)
    dec.start_chunk(3, last=False)
    dec.feed(b"a\r\n")
    dec.start_chunk(0, last=True)
    assert dec.finished


def test_bdat_oversize() -> None:
    """BDAT content beyond max_bytes is TOO_BIG."""
    dec = BdatDecoder(5)
    dec.start_chunk(8, last=True)
    assert b"" == dec.feed(b"abcdef\r\n")[0]
    assert BodyError.TOO_BIG is dec.error


_wire_bytes = st.lists(
    st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"a", b"\0", b"\r\n.\r\n", b"..", b"\r\n."]),
    max_size=30,
).map(b"".join)


@given(_wire_bytes, st.integers(1, 5))
def test_decoder_result_does_not_depend_on_chunking(wire: bytes, step: int) -> None:
    """Arbitrary wire bytes: where DATA ends, what follows, whether the message is
    good and (if good) its body are the same however the bytes are split."""
    whole = decode(wire)
    split = decode(wire, step)
    assert whole[1:3] == split[1:3]
    assert (whole[3].error is None) == (split[3].error is None)
    if whole[3].error is None and whole[1]:
        assert whole[0] == split[0]
    # Reference: DATA ends at the first CRLF.CRLF, counting the CRLF of the DATA command.
    idx = (b"\r\n" + wire).find(b"\r\n.\r\n")
    assert (idx >= 0) == whole[1]
    if idx >= 0:
        assert wire[idx + 3 :] == whole[2]
