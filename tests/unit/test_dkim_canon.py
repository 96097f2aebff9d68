"""The signing path's canonicalisation (dkim/canon.py) gives dkimpy's bytes exactly."""

from __future__ import annotations

import pytest
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import example, given, settings
from hypothesis import strategies as st

from empath.dkim.canon import Policy

# bytes rich in what the rules treat specially: SP, HT, CR, LF, CRLF, VT, FF, NUL, 8-bit
_PIECES = [b" ", b"\t", b"\r", b"\n", b"\r\n", b"  ", b" \r\n", b"\t\r\n", b"\x0b", b"\x0c",
           b"a", b"Z", b".", b":", b"\x00", b"\xff", b"\xc3\xa9", b"\r\n\r\n"]  # fmt: skip
chunks = st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=8)), max_size=40).map(
    b"".join
)
MODES = ["relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple", "relaxed"]


@settings(max_examples=400)
@given(body=chunks)
@example(body=b"")
@example(body=b"\r\n")
@example(body=b"a  \t b \r\n\r\n\r\n")
@example(body=b"line\r\n \r\n\t\r\n")
@example(body=b"no final line end  ")
def test_bodies_canonicalise_to_dkimpys_bytes(body: bytes) -> None:
    for mode in MODES:
        ours = Policy(mode).canonicalize_body(body)
        theirs = CanonicalizationPolicy.from_c_value(mode.encode()).canonicalize_body(body)
        assert theirs == ours, mode


@settings(max_examples=400)
@given(fields=st.lists(st.tuples(st.sampled_from([b"From", b"SUBJECT ", b"x-A\t"]), chunks),
                       max_size=5))  # fmt: skip
@example(fields=[(b"Subject", b" a\r\n  folded\t\tvalue  \r\n")])
@example(fields=[(b"To", b"\x0b x \x0c\r\n")])
@example(fields=[(b"Cc", b"a\r\r\nb\n c\r\n")])
def test_header_fields_canonicalise_to_dkimpys_bytes(fields: list[tuple[bytes, bytes]]) -> None:
    for mode in MODES:
        ours = Policy(mode).canonicalize_headers(fields)
        theirs = CanonicalizationPolicy.from_c_value(mode.encode()).canonicalize_headers(fields)
        assert list(theirs) == ours, mode


def test_an_unknown_algorithm_is_refused() -> None:
    with pytest.raises(KeyError):
        Policy("loose/simple")
