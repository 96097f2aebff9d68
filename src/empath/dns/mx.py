"""Routing: which hosts, ports and addresses to try, in order, for a domain.

Theory of operation
-------------------
``MxRouter.route(domain)`` returns a :data:`Route` — an ordered tuple of
:class:`Target` ``(host, port, addresses, preference)``. The delivery attempt
walks it in order, and every address of a target in turn, moving on after a
connect failure, a timeout or a 4xx greeting.

1. ``domains.<d>.mx_override`` (``"host[:port]"``, port 25 by default) wins.
   An IP literal is used as is; a host name is resolved to its A/AAAA
   addresses (cached as a ``HOST`` entry). Any failure to use an override is
   *temporary*: it is the operator's configuration, and mail must not bounce
   because of it.
2. Else the domain's MX RRset, through the :class:`~empath.dns.cache.MxCache`
   (whose loader is :func:`dns_loader`): exchangers sorted by preference, each
   with its addresses. The order *within* one preference is shuffled on every
   call (not once per cache entry), so load spreads while the cache is warm.
3. Errors (:mod:`empath.errors` classes; ``enhanced`` per RFC 3463/7505):

   ==========================================  =========  ========
   situation                                   class      enhanced
   ==========================================  =========  ========
   null MX (RFC 7505)                          permanent  5.1.10
   NXDOMAIN / invalid domain name              permanent  5.1.2
   no MX and no A/AAAA for the domain          permanent  5.4.4
   SERVFAIL / timeout / no nameserver          temporary  4.4.3
   MX hosts exist but none has an address      temporary  4.4.3
   ==========================================  =========  ========

   Permanent outcomes are cached negatively; temporary ones are not.

4. Mail loops (as Postfix's ``smtp_addr.c``): when an address of a target is one
   of Empath's own SMTP listeners (:class:`OwnListeners`: the same address and
   port, or any local address with the port of a wildcard ``0.0.0.0``/``[::]``
   listener), that target and every target of equal or worse preference are
   dropped -- the better ones are the backups that may still take the mail.  When
   nothing is left (an ``mx_override`` to ourselves, or we are the best MX), the
   route fails permanently: ``5.4.6 mail for <domain> loops back to myself``.

The port for MX-derived targets is ``mx_port`` (25; tests use another so the
peers need not run as root on port 25).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import random
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from empath.clock import Clock
from empath.dns.cache import CacheLimits, EntryKind, Exchanger, Loader, MxCache, Resolution
from empath.dns.resolver import MxRecord, Resolver, normalize_name
from empath.errors import (
    DeliveryError,
    DnsTemporaryError,
    NullMxError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from empath.logs import get_logger
from empath.supervisor import Track, untracked

__all__ = [
    "MxRouter",
    "OwnListeners",
    "Route",
    "RoutingSettings",
    "Target",
    "build_router",
    "dns_loader",
    "is_ip_literal",
    "is_local_address",
    "parse_override",
    "resolve_exchangers",
    "resolve_host",
]

log = get_logger("dns", __name__)

SMTP_PORT = 25


@dataclass(frozen=True, slots=True)
class Target:
    """One host to try: ``host`` is also the TLS SNI / verification name."""

    host: str
    port: int
    addresses: tuple[str, ...]
    preference: int = 0


#: Targets in the order they must be tried.
Route: TypeAlias = tuple[Target, ...]


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_override(spec: str, default_port: int = SMTP_PORT) -> tuple[str, int]:
    """``"host"``, ``"host:2525"``, ``"10.0.0.1:25"``, ``"[::1]:25"`` or ``"::1"`` → (host, port).

    Raises ValueError with a reason (the config loader turns it into a ConfigError).
    """
    text = spec.strip()
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"mx_override {spec!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"mx_override {spec!r}: expected ':port' after ']'")
            port = _port(rest[1:], spec)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, spec)
    host = normalize_name(host)
    if not host:
        raise ValueError(f"mx_override {spec!r}: empty host")
    if ":" in host and not is_ip_literal(host):
        raise ValueError(f"mx_override {spec!r}: not an IPv6 address")
    return host, port


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"mx_override {spec!r}: bad port {text!r}")
    return int(text)


# --- loading (runs on a cache miss) --------------------------------------------------


async def resolve_host(resolver: Resolver, host: str) -> Resolution:
    """The addresses of one host, as a single-exchanger Resolution."""
    answer = await resolver.addresses(host)
    if not answer.addresses:
        raise PermanentDeliveryError(f"DNS: {host} has no A/AAAA records", enhanced="5.4.4")
    return Resolution((Exchanger(0, normalize_name(host), answer.addresses),), answer.ttl_s)


async def resolve_exchangers(resolver: Resolver, domain: str) -> Resolution:
    """MX lookup plus the addresses of every exchanger (or the implicit MX)."""
    domain = normalize_name(domain)
    answer = await resolver.mx(domain)
    if not answer.records:
        # RFC 5321 §5.1: "If an empty list of MXs is returned, the address is
        # treated as if it was associated with an implicit MX RR, with a
        # preference of 0, pointing to that host."
        implicit = await resolver.addresses(domain)  # NXDOMAIN here stays permanent
        if not implicit.addresses:
            # RFC 5321 §5.1: "... or the implicit MX is unusable, this situation
            # MUST be reported as an error."
            raise PermanentDeliveryError(
                f"DNS: {domain} has no MX and no A/AAAA records", enhanced="5.4.4"
            )
        return Resolution(
            (Exchanger(0, domain, implicit.addresses),), implicit.ttl_s, implicit=True
        )

    # RFC 7505 §3: "To indicate that a domain does not accept email, it
    # advertises a single MX RR ... with an RDATA section consisting of
    # preference number 0 and a zero-length label, written in master files as
    # ".", as the exchange domain". A "." mixed with real exchangers is a
    # misconfiguration; the "." is then merely unusable and skipped.
    usable = sorted((r for r in answer.records if not r.is_null), key=lambda r: r.preference)
    if not usable:
        raise NullMxError(f"{domain} does not accept mail (null MX, RFC 7505)", enhanced="5.1.10")

    hosts = list(dict.fromkeys(r.exchange for r in usable))
    looked_up = await asyncio.gather(
        *(_exchanger_addresses(resolver, h) for h in hosts), return_exceptions=True
    )
    by_host: dict[str, tuple[str, ...]] = {}
    ttls = [answer.ttl_s]
    saw_temporary = False
    reasons: list[str] = []
    for host, result in zip(hosts, looked_up, strict=True):
        if isinstance(result, DeliveryError):
            saw_temporary = saw_temporary or isinstance(result, TemporaryDeliveryError)
            reasons.append(result.text)
            log.warn("MX host skipped", domain=domain, mx=host, error=result.text)
            continue
        if isinstance(result, BaseException):
            raise result
        addresses, ttl_s = result
        if not addresses:
            reasons.append(f"{host} has no A/AAAA records")
            log.warn("MX host skipped", domain=domain, mx=host, error="no A/AAAA records")
            continue
        by_host[host] = addresses
        ttls.append(ttl_s)
    exchangers = tuple(
        Exchanger(r.preference, r.exchange, by_host[r.exchange])
        for r in _dedupe(usable)
        if r.exchange in by_host
    )
    if not exchangers:
        # RFC 5321 §5.1: "If MX records are present, but none of them are
        # usable, ... this situation MUST be reported as an error." We report
        # it as temporary: address records of MX hosts are often being fixed.
        raise DnsTemporaryError(
            f"DNS: no MX host of {domain} has an address ({'; '.join(reasons)})",
            enhanced="4.4.3",
        )
    # A host skipped for a temporary reason should be retried soon: cache the
    # partial answer only for the minimum TTL.
    return Resolution(exchangers, 0.0 if saw_temporary else min(ttls))


def _dedupe(records: list[MxRecord]) -> list[MxRecord]:
    seen: set[str] = set()
    out = []
    for r in records:
        if r.exchange not in seen:
            seen.add(r.exchange)
            out.append(r)
    return out


async def _exchanger_addresses(resolver: Resolver, host: str) -> tuple[tuple[str, ...], float]:
    if is_ip_literal(host):  # not RFC-conforming, but unambiguous
        return (host,), float("inf")
    answer = await resolver.addresses(host)
    return answer.addresses, answer.ttl_s


def dns_loader(resolver: Resolver) -> Loader:
    """The MxCache loader that resolves through ``resolver``."""

    async def load(kind: EntryKind, name: str) -> Resolution:
        if kind is EntryKind.HOST:
            return await resolve_host(resolver, name)
        return await resolve_exchangers(resolver, name)

    return load


# --- loops back to myself ---------------------------------------------------------------

_IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_WILDCARDS_V4 = frozenset({"", "0.0.0.0"})
_WILDCARD_V6 = "::"


def _ip(text: str) -> _IpAddress | None:
    """The address, IPv4-mapped IPv6 as IPv4; None for a name."""
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local_address(address: str) -> bool:
    """True when ``address`` is one of this host's addresses: a socket can be bound to it.

    (The kernel refuses ``bind`` to an address of no local interface with
    EADDRNOTAVAIL; every 127.0.0.0/8 address and the unspecified ones are local.)
    """
    ip = _ip(address)
    if ip is None:
        return False
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((str(ip), 0))
        except OSError:
            return False
    return True


class OwnListeners:
    """Empath's own SMTP listening sockets: is a target address one of them?

    A listener on a specific address matches that address and port; a wildcard
    listener (``0.0.0.0`` for IPv4, ``::`` for both families) matches every local
    address with its port (like Postfix's ``inet_interfaces = all``).  Each answer is
    remembered per (address, port), so ``is_local`` (a ``bind``) runs once per address.
    """

    __slots__ = ("_answers", "_is_local", "_specific", "_wild_v4", "_wild_v6")

    def __init__(
        self,
        listeners: Iterable[tuple[str, int]],
        is_local: Callable[[str], bool] = is_local_address,
    ) -> None:
        self._specific: set[tuple[_IpAddress, int]] = set()
        self._wild_v4: set[int] = set()
        self._wild_v6: set[int] = set()
        for host, port in listeners:
            if port == 0:
                continue
            if host in _WILDCARDS_V4:
                self._wild_v4.add(port)
            elif host.strip("[]") == _WILDCARD_V6:
                self._wild_v6.add(port)
            elif (ip := _ip(host)) is not None:
                self._specific.add((ip, port))
        self._is_local = is_local
        self._answers: dict[tuple[str, int], bool] = {}

    def __bool__(self) -> bool:
        return bool(self._specific or self._wild_v4 or self._wild_v6)

    def __repr__(self) -> str:
        wild = sorted(self._wild_v4 | self._wild_v6)
        return f"OwnListeners(specific={len(self._specific)}, wildcard_ports={wild})"

    def is_self(self, address: str, port: int) -> bool:
        """True when a connection to ``address``:``port`` would reach one of our listeners."""
        key = (address, port)
        known = self._answers.get(key)
        if known is None:
            if len(self._answers) >= _MAX_MEMO:
                self._answers.clear()
            known = self._answers[key] = self._decide(address, port)
        return known

    def _decide(self, address: str, port: int) -> bool:
        ip = _ip(address)
        if ip is None:
            return False
        if (ip, port) in self._specific:
            return True
        wildcard = port in self._wild_v6 or (ip.version == 4 and port in self._wild_v4)
        return wildcard and self._is_local(str(ip))


# --- routing ---------------------------------------------------------------------------


def _no_overrides(_domain: str) -> str | None:
    return None


#: Memo bounds for the router's precomputed plans and parsed overrides.
_MAX_MEMO = 4096

# An ordering plan: target groups by preference; groups of 2+ are shuffled per call.
_Plan = tuple[tuple[Target, ...], ...]


class MxRouter:
    """``route(domain)``: mx_override, else cached MX with per-call shuffling.

    The hot path (a cache hit) builds no Target objects: each Resolution's
    targets are grouped by preference once (memoized by identity) and only
    the equal-preference groups are shuffled per call; parsed overrides are
    memoized by their text.
    """

    __slots__ = (
        "_mx_port",
        "_overrides",
        "_own",
        "_parsed",
        "_plans",
        "_rng",
        "cache",
        "resolver",
    )

    def __init__(
        self,
        resolver: Resolver,
        cache: MxCache,
        rng: random.Random | None = None,
        overrides: Callable[[str], str | None] = _no_overrides,
        *,
        mx_port: int = SMTP_PORT,
        own: OwnListeners | None = None,
    ) -> None:
        self.resolver = resolver
        self._own = own if own else None
        self.cache = cache
        self._rng = rng if rng is not None else random.Random()
        self._overrides = overrides
        self._mx_port = mx_port
        self._plans: dict[int, tuple[Resolution, _Plan]] = {}
        self._parsed: dict[str, tuple[str, int, Route | None]] = {}

    @property
    def mx_port(self) -> int:
        """Port of MX-derived targets (25; tests use their peers' port)."""
        return self._mx_port

    @mx_port.setter
    def mx_port(self, port: int) -> None:
        self._mx_port = port
        self._plans.clear()

    def set_overrides(self, overrides: Callable[[str], str | None]) -> None:
        """Replace the override lookup."""
        self._overrides = overrides
        self._parsed.clear()

    def reconfigure(self, settings: RoutingSettings) -> None:
        """SIGHUP: new cache limits (entries kept) and mx_overrides."""
        self.cache.reconfigure(settings.cache)
        self.set_overrides(settings.overrides.get)

    async def route(self, domain: str) -> Route:
        """Targets to try in order; raises Temporary/PermanentDeliveryError."""
        domain = normalize_name(domain)
        override = self._overrides(domain)
        if override:
            route = await self._override_route(domain, override)
        else:
            route = self._order(await self.cache.lookup(EntryKind.MX, domain))
        return route if self._own is None else self._without_self(domain, route, self._own)

    @staticmethod
    def _without_self(domain: str, route: Route, own: OwnListeners) -> Route:
        """Drop our own listeners and every worse target; nothing left is a loop."""
        cut: int | None = None
        for target in route:
            if any(own.is_self(a, target.port) for a in target.addresses):
                cut = target.preference if cut is None else min(cut, target.preference)
        if cut is None:
            return route
        kept = tuple(t for t in route if t.preference < cut)
        if not kept:
            # Postfix's wording (smtp_addr.c), with its status 5.4.6 (RFC 3463: routing loop).
            raise PermanentDeliveryError(
                f"mail for {domain} loops back to myself", enhanced="5.4.6"
            )
        return kept

    def _order(self, resolution: Resolution) -> Route:
        memo = self._plans.get(id(resolution))
        if memo is None or memo[0] is not resolution:
            if len(self._plans) >= _MAX_MEMO:
                self._plans.clear()
            memo = (resolution, self._plan(resolution))
            self._plans[id(resolution)] = memo
        plan = memo[1]
        if len(plan) == 1 and len(plan[0]) == 1:
            return plan[0]
        # RFC 5321 §5.1: "If there are multiple destinations with the same
        # preference and there is no clear reason to favor one (e.g., by
        # recognition of an easily reached address), then the sender-SMTP MUST
        # randomize them to spread the load across multiple mail exchangers
        # for a specific organization."
        targets: list[Target] = []
        for group in plan:
            if len(group) > 1:
                shuffled = list(group)
                self._rng.shuffle(shuffled)
                targets.extend(shuffled)
            else:
                targets.extend(group)
        return tuple(targets)

    def _plan(self, resolution: Resolution) -> _Plan:
        port = self._mx_port
        return tuple(
            tuple(Target(e.host, port, e.addresses, e.preference) for e in group)
            for _pref, group in itertools.groupby(resolution.exchangers, key=lambda e: e.preference)
        )

    async def _override_route(self, domain: str, override: str) -> Route:
        parsed = self._parsed.get(override)
        if parsed is None:
            try:
                host, port = parse_override(override)
            except ValueError as exc:
                raise TemporaryDeliveryError(
                    f"invalid mx_override for {domain}: {exc}", enhanced="4.3.5"
                ) from None
            fixed: Route | None = (Target(host, port, (host,)),) if is_ip_literal(host) else None
            parsed = (host, port, fixed)
            if len(self._parsed) >= _MAX_MEMO:
                self._parsed.clear()
            self._parsed[override] = parsed
        host, port, fixed = parsed
        if fixed is not None:
            return fixed  # an IP literal needs no lookup
        try:
            resolution = await self.cache.lookup(EntryKind.HOST, host)
        except PermanentDeliveryError as exc:
            # The override is configuration: never bounce mail because of it.
            raise TemporaryDeliveryError(
                f"mx_override host for {domain} unusable: {exc.text}", enhanced="4.4.3", mx=host
            ) from None
        return (Target(host, port, resolution.exchangers[0].addresses),)


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """The cache limits and the per-domain ``mx_override`` texts (lower-case keys)."""

    cache: CacheLimits
    overrides: Mapping[str, str]


def build_router(
    resolver: Resolver,
    settings: RoutingSettings,
    *,
    clock: Clock,
    rng: random.Random | None = None,
    mx_port: int = SMTP_PORT,
    own: OwnListeners | None = None,
    track: Track = untracked,
) -> MxRouter:
    """Resolver → cache (loading through it) → router, wired together."""
    cache = MxCache(dns_loader(resolver), clock=clock, limits=settings.cache, track=track)
    return MxRouter(resolver, cache, rng, settings.overrides.get, mx_port=mx_port, own=own)
