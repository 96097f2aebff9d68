"""ULID message ids: 26 Crockford base32 characters, 48-bit ms timestamp + 80 random bits.

Ids generated within one process are strictly increasing (monotonic ULIDs), so
sorting ids sorts messages by acceptance order.
"""

from __future__ import annotations

import random
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}


class _UlidFactory:
    """Monotonic ULIDs.  The random part comes from a PRNG seeded from the OS once:
    queue ids must be unique and unguessable enough for logs, not secret, and
    ``os.urandom`` per id showed up in ingest profiles."""

    __slots__ = ("_last_ms", "_last_rand", "_rng")

    def __init__(self) -> None:
        self._last_ms = -1
        self._last_rand = 0
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
        self._last_ms = ms
        self._last_rand = rand
        return encode((ms << 80) | rand)


def encode(value: int) -> str:
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def is_ulid(text: str) -> bool:
    return len(text) == 26 and text[0] in "01234567" and all(c in _DECODE for c in text)


def timestamp_ms(ulid: str) -> int:
    value = 0
    for c in ulid[:10]:
        value = (value << 5) | _DECODE[c]
    return value


_factory = _UlidFactory()
new_ulid = _factory.new
