"""ULID message ids: 26 Crockford base32 characters, 48-bit ms timestamp + 80 random bits.

Ids generated within one process are strictly increasing (monotonic ULIDs), so
sorting ids sorts messages by acceptance order.
"""

from __future__ import annotations

import random
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
# Every 10-bit value as two base32 characters: an id is 13 table lookups, not 26
# shift-and-mask steps (ids are made once per accepted message, on the event loop).
_PAIRS = tuple(a + b for a in _ALPHABET for b in _ALPHABET)


class _UlidFactory:
    """Monotonic ULIDs.  The random part comes from a PRNG seeded from the OS once:
    queue ids must be unique and unguessable enough for logs, not secret, and
    ``os.urandom`` per id showed up in ingest profiles."""

    __slots__ = ("_last_ms", "_last_rand", "_rng", "_time_part")

    def __init__(self) -> None:
        self._last_ms = -1
        self._last_rand = 0
        self._time_part = ""  # the 10 characters of _last_ms
        self._rng = random.Random()  # seeded from os.urandom by the stdlib

    def new(self, now_ms: int | None = None) -> str:
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        if ms <= self._last_ms:
            ms = self._last_ms
            rand = self._last_rand + 1
            if rand >= 1 << 80:  # pragma: no cover - 2^80 ids in one millisecond
                ms += 1
                rand = self._rng.getrandbits(80)
        else:
            rand = self._rng.getrandbits(80)
        if ms != self._last_ms:
            self._time_part = _encode_bits(ms, 50)
            self._last_ms = ms
        self._last_rand = rand
        p = _PAIRS
        return (
            f"{self._time_part}{p[rand >> 70]}{p[(rand >> 60) & 1023]}{p[(rand >> 50) & 1023]}"
            f"{p[(rand >> 40) & 1023]}{p[(rand >> 30) & 1023]}{p[(rand >> 20) & 1023]}"
            f"{p[(rand >> 10) & 1023]}{p[rand & 1023]}"
        )


def _encode_bits(value: int, bits: int) -> str:
    """``bits`` (a multiple of 10) low bits of ``value`` as bits/5 base32 characters."""
    pairs = _PAIRS
    return "".join([pairs[(value >> shift) & 1023] for shift in range(bits - 10, -1, -10)])


def encode(value: int) -> str:
    """A 130-bit value as the 26 characters of a ULID."""
    return _encode_bits(value >> 80, 50) + _encode_bits(value, 80)


def is_ulid(text: str) -> bool:
    return len(text) == 26 and text[0] in "01234567" and all(c in _DECODE for c in text)


def timestamp_ms(ulid: str) -> int:
    value = 0
    for c in ulid[:10]:
        value = (value << 5) | _DECODE[c]
    return value


_factory = _UlidFactory()
new_ulid = _factory.new
