"""Relay control (DESIGN §3): who may send mail through us to where.

Pure and precomputed: networks are parsed once; a session asks once per
connection for a per-client check (``for_client``) and then calls it per RCPT.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    """DESIGN §3, never an open relay: a recipient is accepted when the client is in
    ``trusted_networks`` or the recipient's domain is one of ``accepted_domains``
    (case-insensitive)."""

    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    accepted_domains: tuple[str, ...] = ()
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )
    _domains: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nets = tuple(ipaddress.ip_network(n, strict=False) for n in self.trusted_networks)
        object.__setattr__(self, "_networks", nets)
        domains = frozenset(d.lower().rstrip(".") for d in self.accepted_domains)
        object.__setattr__(self, "_domains", domains)

    def trusts(self, client_ip: str) -> bool:
        try:
            ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack [::] listener sees IPv4 clients this way
        return any(ip in net for net in self._networks)

    def accepts_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self._domains

    def allows(self, client_ip: str, rcpt_domain: str) -> bool:
        return self.trusts(client_ip) or self.accepts_domain(rcpt_domain)

    def for_client(self, client_ip: str) -> Callable[[str], bool]:
        """The per-session check: domain → allowed (the IP is looked up once)."""
        if self.trusts(client_ip):
            return _always
        return self.accepts_domain


def _always(_domain: str) -> bool:
    return True
