"""The dnsbl module's pure parts: RFC 5782 query names and what counts as a listing."""

from __future__ import annotations

import pytest

from empath.modules.dnsbl import _is_listing, query_name


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("192.0.2.99", "99.2.0.192.bl.example"),
        ("::ffff:192.0.2.99", "99.2.0.192.bl.example"),  # an IPv4 client of a [::] listener
        # RFC 5782 §2.4: the 32 nibbles of the address, reversed
        ("2001:db8:1:2:3:4:567:89ab",
         "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.example"),
        ("not an address", None),
    ],
)  # fmt: skip
def test_query_names_follow_rfc_5782(ip: str, expected: str | None) -> None:
    assert expected == query_name(ip, "bl.example.")


@pytest.mark.parametrize(
    ("answer", "listed"),
    [("127.0.0.2", True), ("127.0.0.10", True), ("127.255.255.254", False),
     ("192.0.2.1", False), ("garbage", False)],
)  # fmt: skip
def test_only_loopback_answers_outside_the_error_range_are_listings(
    answer: str, listed: bool
) -> None:
    assert listed == _is_listing(answer)
