"""The header From check's address reader (submission/fromcheck.py): its fast form gives
what the standard library's RFC 5322 parser gives, and the step refuses what it must."""

from __future__ import annotations

import asyncio
import random
from email.utils import getaddresses

import pytest

from empath.submission.fromcheck import HeaderFromCheck, from_addresses
from empath.submission.users import UserEntry, UsersFile
from empath.transport.acceptance import AcceptedMessage, SessionFacts

SAMPLES = [
    "alice@example.org",
    "  alice@example.org\t",
    "Alice <alice@example.org>",
    "Alice Liddell <alice@mail.example.org>",
    "<alice@example.org>",
    "=?utf-8?q?Al=C3=AFce?= <alice@example.org>",
    "o'brien+tag@example.org",
    '"Alice, Q." <alice@example.org>',
    "alice@example.org (Alice)",
    "alice@example.org, mallory@evil.test",
    "Alice <alice@example.org>, Mallory <mallory@evil.test>",
    "friends: alice@example.org, bob@example.org;",
    "alice@[192.0.2.1]",
    "al..ice@example.org",
    ".alice@example.org",
    "alice.@example.org",
    "alice@example..org",
    "alice @ example.org",
    "A <b@c> <d@e>",
    "a@b@c",
    "<>",
    "",
    "bäcker@example.org",
    "Bäcker <baecker@example.org>",
    "x <mallory@evil.test",
    "mallory@evil.test>",
]


def stdlib(value: str) -> list[str]:
    return [address for _name, address in getaddresses([value])]


@pytest.mark.parametrize("value", SAMPLES)
def test_the_fast_reader_gives_the_standard_parsers_addresses(value: str) -> None:
    assert from_addresses([value]) == stdlib(value)


def test_random_field_values_read_alike_by_both() -> None:
    rng = random.Random(18)
    alphabet = "ab.@<> \t,;:\"()[]\\!#'+=?-_ä"
    for _ in range(20000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 16)))
        assert from_addresses([value]) == stdlib(value), value


class _Users:
    def __init__(self) -> None:
        entry = UserEntry(password="x", senders=("alice@example.org", "*@alice.test"))
        self.users = UsersFile({"alice": entry})


def _run(from_values: list[str], user: str | None = "alice") -> int | None:
    head = "".join(f"From: {v}\r\n" for v in from_values)
    data = (head + "Subject: s\r\n\r\nbody\r\n").encode()
    facts = SessionFacts("192.0.2.1", "192.0.2.1:1", "h", False, user, True, "submission")
    message = AcceptedMessage("id", data, sender="alice@example.org",
                              recipients=["r@example.net"], facts=facts)  # fmt: skip
    reply = asyncio.run(HeaderFromCheck(_Users()).run(message))  # type: ignore[arg-type]
    return None if reply is None else reply.code


def test_owned_from_addresses_pass_in_either_form() -> None:
    assert _run(["Alice <alice@example.org>"]) is None
    assert _run(["someone@alice.test"]) is None
    assert _run(['"Liddell, Alice" <ALICE@example.org>']) is None


def test_a_from_address_the_user_does_not_own_is_refused_with_550() -> None:
    assert _run(["Alice <mallory@evil.test>"]) == 550
    assert _run(["alice@example.org, mallory@evil.test"]) == 550
    assert _run(["alice@example.org", "mallory@evil.test"]) == 550  # two From: fields


def test_messages_without_an_authenticated_user_are_left_alone() -> None:
    assert _run(["mallory@evil.test"], user=None) is None


def test_from_fields_are_found_in_any_case_and_in_the_obsolete_name_space_colon_form() -> None:
    assert _run_raw(b"FROM: mallory@evil.test\r\n") == 550
    assert _run_raw(b"From : mallory@evil.test\r\n") == 550
    assert _run_raw(b"from\t: Mallory <mallory@evil.test>\r\n") == 550
    assert _run_raw(b"From-Address: mallory@evil.test\r\nFrom: alice@example.org\r\n") is None
    assert _run_raw(b"Received: by x\r\nfRoM: alice@example.org\r\n") is None


def _run_raw(head: bytes) -> int | None:
    facts = SessionFacts("192.0.2.1", "192.0.2.1:1", "h", False, "alice", True, "submission")
    message = AcceptedMessage("id", head + b"Subject: s\r\n\r\nbody\r\n", sender="a@b",
                              recipients=["r@example.net"], facts=facts)  # fmt: skip
    reply = asyncio.run(HeaderFromCheck(_Users()).run(message))  # type: ignore[arg-type]
    return None if reply is None else reply.code
