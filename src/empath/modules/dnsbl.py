"""``empath.modules.dnsbl``: refuse clients listed on DNS blocklists (RFC 5782).

Config::

    (type: "Python", name: "empath.modules.dnsbl:Dnsbl",
     arguments: { "zones": ["zen.spamhaus.org", "bl.example"], "skip_trusted": true })

For a client 192.0.2.99 and zone ``bl.example`` the module asks for the A record of
``99.2.0.192.bl.example`` (IPv6: the 32 nibbles of the address, reversed, RFC 5782
§2.4).  An answer in 127.0.0.0/8 means "listed" (§2.1), except 127.255.255.0/24,
which blocklist operators use for errors such as "queries from public resolvers are
refused": those, NXDOMAIN, an empty answer and a failed lookup all mean "not listed"
(a broken list must not stop mail; the failure is logged).  The TXT record of the
same name is the reason given to the client: ``554 5.7.1 Service unavailable; client
[192.0.2.99] blocked using bl.example; <TXT>``.

The refusal comes at RCPT TO, as Postfix's ``reject_rbl_client`` does with
``smtpd_delay_reject``: the client learns why, the log has the envelope.  Zones are
asked in order, the first listing wins.  Clients in ``relay.trusted_networks`` are
not checked unless ``skip_trusted`` is false.  Lookups go through Empath's own
resolver (``delivery.dns.nameservers``, its timeout and lookup metrics), and answers
are kept for their TTL (at most ``max_cache_entries``, one hour at most).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from empath.dns.resolver import QueryType
from empath.errors import DnsNameNotFoundError, DnsTemporaryError
from empath.logs import get_logger
from empath.modules.api import Reply, Session

__all__ = ["Dnsbl", "query_name"]

log = get_logger("modules", __name__)

_NOTE: Final = "empath.dnsbl"
_MAX_TTL_S: Final = 3600.0
_LISTED: Final = ipaddress.IPv4Network("127.0.0.0/8")
_ERRORS: Final = ipaddress.IPv4Network("127.255.255.0/24")


def query_name(ip: str, zone: str) -> str | None:
    """The name to look up for ``ip`` in ``zone`` (RFC 5782 §2.1, §2.4); None for a
    value that is not an IP address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        labels = reversed(str(addr).split("."))
    else:
        labels = reversed(addr.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone.strip(".")


@dataclass(frozen=True, slots=True)
class Listing:
    zone: str
    reason: str


class Dnsbl:
    """See the module docstring."""

    def __init__(self, arguments: dict[str, Any], *, empath: Any) -> None:
        zones = arguments.get("zones")
        if not isinstance(zones, list) or not zones or not all(isinstance(z, str) for z in zones):
            raise ValueError("arguments.zones must be a non-empty list of zone names")
        self.zones: tuple[str, ...] = tuple(z.strip(".").lower() for z in zones)
        self.skip_trusted = bool(arguments.get("skip_trusted", True))
        self.max_entries = int(arguments.get("max_cache_entries", 10000))
        self._resolver = empath.resolver
        self._cache: OrderedDict[tuple[str, str], tuple[float, Listing | None]] = OrderedDict()

    async def on_rcpt_to(self, session: Session, recipient: str) -> Reply | None:
        if self.skip_trusted and session.trusted:
            return None
        notes = session.notes
        if _NOTE not in notes:
            notes[_NOTE] = await self.check(session.peer_ip)
        listing = notes[_NOTE]
        if listing is None:
            return None
        assert isinstance(listing, Listing)
        text = f"Service unavailable; client [{session.peer_ip}] blocked using {listing.zone}"
        if listing.reason:
            text += f"; {listing.reason}"
        return Reply(554, "5.7.1", text)

    async def check(self, ip: str) -> Listing | None:
        """The first zone listing ``ip`` (with its reason), or None."""
        for zone in self.zones:
            listing = await self._lookup(ip, zone)
            if listing is not None:
                return listing
        return None

    async def _lookup(self, ip: str, zone: str) -> Listing | None:
        key = (ip, zone)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            return cached[1]
        name = query_name(ip, zone)
        if name is None:
            return None
        listing: Listing | None = None
        ttl = _MAX_TTL_S
        try:
            answers, ttl = await self._resolver.records(name, QueryType.A)
            listed = [a for a in answers if _is_listing(a)]
            if listed:
                reason = ""
                try:
                    texts, _ = await self._resolver.records(name, QueryType.TXT)
                    reason = " ".join(texts)
                except (DnsNameNotFoundError, DnsTemporaryError):
                    pass
                listing = Listing(zone, _printable(reason))
        except DnsNameNotFoundError:
            pass
        except DnsTemporaryError as exc:
            log.warn("DNSBL lookup failed; client not treated as listed", zone=zone,
                     client=ip, error=str(exc))  # fmt: skip
            return None  # not cached: ask again next time
        self._cache[key] = (now + min(max(ttl, 1.0), _MAX_TTL_S), listing)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return listing


def _is_listing(answer: str) -> bool:
    try:
        addr = ipaddress.IPv4Address(answer)
    except ValueError:
        return False
    return addr in _LISTED and addr not in _ERRORS


def _printable(text: str) -> str:
    """A TXT reason safe to put in an SMTP reply line (no controls, bounded)."""
    return "".join(c if c.isprintable() else " " for c in text)[:400]
