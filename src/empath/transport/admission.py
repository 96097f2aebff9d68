"""Who may open one more SMTP session on a listener (DESIGN §3): the listener's
``max_connections`` in all and ``max_connections_per_ip`` per client, where a client is
an IPv4 address or an IPv6 /64 (one host usually holds a whole /64).

A pure decision with its own bookkeeping and nothing else: no I/O, no clock.  The
listener's runtime owns one :class:`Admission`; a session asks ``admit(ip)`` when its
connection is made (refused: it answers ``421 4.7.0`` and closes) and calls
``release(ip)`` exactly once when an admitted connection ends.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping


def per_ip_key(ip: str) -> str:
    """What the per-client cap counts: an IPv4 address as it is, an IPv6 address by its
    /64 (``2001:db8:1:2::/64``); anything unparsable as it is."""
    if ":" not in ip:
        return ip
    try:
        net = ipaddress.IPv6Network((ip.split("%", 1)[0], 64), strict=False)
    except ValueError:
        return ip
    return str(net)


class Admission:
    """Open sessions of one listener, in all and per client key."""

    __slots__ = ("_per_key", "active", "max_connections", "max_per_ip")

    def __init__(self, max_connections: int, max_per_ip: int) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.active = 0
        self._per_key: dict[str, int] = {}

    @property
    def per_key(self) -> Mapping[str, int]:
        """Open sessions by client key (only keys with at least one)."""
        return self._per_key

    def admit(self, ip: str) -> bool:
        """Count one more session from ``ip`` if both caps allow it; False (and nothing
        counted) if either is reached."""
        key = per_ip_key(ip)
        held = self._per_key.get(key, 0)
        if self.active >= self.max_connections or held >= self.max_per_ip:
            return False
        self.active += 1
        self._per_key[key] = held + 1
        return True

    def release(self, ip: str) -> None:
        """An admitted session from ``ip`` ended."""
        key = per_ip_key(ip)
        left = self._per_key.get(key, 0) - 1
        if left > 0:
            self._per_key[key] = left
        else:
            self._per_key.pop(key, None)
        self.active = max(0, self.active - 1)
