"""Asynchronous DNS lookups for delivery: MX and A/AAAA, with TTLs and timings.

Theory of operation
-------------------
:class:`DnsResolver` is a thin wrapper over dnspython's
``dns.asyncresolver.Resolver``. It asks exactly the questions routing needs
(``MX`` for a domain, ``A`` + ``AAAA`` for a host, the two in parallel) and
returns small frozen records carrying the answer's TTL, so the MX cache can
honour it.

dnspython's exceptions never leave this module. They are mapped at the boundary
onto the project's one error tree:

=====================================  ==========================================
dnspython                              Empath
=====================================  ==========================================
``NXDOMAIN`` (and names that cannot    :class:`DnsNameNotFoundError` — permanent,
exist: empty/long labels, bad IDNA)    enhanced ``5.1.2``
``NoAnswer``                           not an error: an empty answer (for MX this
                                       means "use the implicit MX")
``NoNameservers`` (every server        :class:`DnsTemporaryError` — temporary,
answered SERVFAIL/REFUSED or failed),  enhanced ``4.4.3``
``Timeout``/``LifetimeTimeout``, any
other ``DNSException``
=====================================  ==========================================

``timeout_s`` bounds each query (dnspython's ``lifetime``: all retries
included), so one lookup never takes longer than ``timeout_s`` even against a
resolver that never answers. One try against one server gets at most
``min(2 s, timeout_s / number of servers)``, so a dead first server leaves time
for the others and a lost datagram is re-sent. ``addresses()`` runs its A and AAAA queries
concurrently, so it too finishes within ``timeout_s``.

Every round trip is timed into a :class:`LookupStats` (per query type ``MX``,
``A``, ``AAAA``: count, sum, histogram buckets, a short window of recent
durations, and outcome counts) that the metrics collector reads at scrape time
(``empath_dns_lookup_duration_seconds{query_type}``).

:class:`Resolver` is the Protocol routing depends on; the scripted
``empath.testing.fake_resolver.FakeResolver`` implements it for unit tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from empath.clock import Clock, SystemClock
from empath.errors import ConfigError, DnsNameNotFoundError, DnsTemporaryError
from empath.stats import Histogram, HistogramCounts

__all__ = [
    "DEFAULT_BUCKETS_S",
    "AddressAnswer",
    "DnsFailure",
    "DnsResolver",
    "DnsSettings",
    "LookupStats",
    "MxAnswer",
    "MxRecord",
    "QueryType",
    "Resolver",
    "failure_error",
    "normalize_name",
    "parse_nameserver",
]


class QueryType(StrEnum):
    """The record types routing asks for; the value is the metrics label."""

    MX = "MX"
    A = "A"
    AAAA = "AAAA"
    TXT = "TXT"  # DNS blocklists (empath.modules.dnsbl), DKIM/DMARC/SPF checks


class DnsFailure(StrEnum):
    """Why a lookup produced no answer; the value is the stats outcome label."""

    NXDOMAIN = "nxdomain"
    INVALID_NAME = "invalid_name"
    SERVFAIL = "servfail"
    TIMEOUT = "timeout"
    ERROR = "error"


def failure_error(
    failure: DnsFailure, name: str, query_type: QueryType, detail: str = ""
) -> DnsNameNotFoundError | DnsTemporaryError:
    """The Empath error a DNS failure maps to (shared by the real and the fake resolver)."""
    suffix = f": {detail}" if detail else ""
    if failure is DnsFailure.NXDOMAIN:
        return DnsNameNotFoundError(
            f"DNS: {name} does not exist (NXDOMAIN for {query_type})", enhanced="5.1.2"
        )
    if failure is DnsFailure.INVALID_NAME:
        return DnsNameNotFoundError(f"DNS: invalid domain name {name!r}{suffix}", enhanced="5.1.2")
    if failure is DnsFailure.SERVFAIL:
        return DnsTemporaryError(
            f"DNS: no nameserver could answer {query_type} {name} (SERVFAIL){suffix}",
            enhanced="4.4.3",
        )
    if failure is DnsFailure.TIMEOUT:
        return DnsTemporaryError(f"DNS: {query_type} lookup of {name} timed out", enhanced="4.4.3")
    return DnsTemporaryError(f"DNS: {query_type} lookup of {name} failed{suffix}", enhanced="4.4.3")


# --- answers -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MxRecord:
    """One MX RR: ``exchange`` is lower case without the trailing dot; ``"."`` is null."""

    preference: int
    exchange: str

    @property
    def is_null(self) -> bool:
        """True for the RFC 7505 null exchange (the root name)."""
        return self.exchange == "."


@dataclass(frozen=True, slots=True)
class MxAnswer:
    """The MX RRset of a domain (empty when the domain exists but has none)."""

    records: tuple[MxRecord, ...]
    ttl_s: float


@dataclass(frozen=True, slots=True)
class AddressAnswer:
    """A and AAAA addresses of a host, IPv4 first, in DNS order; TTL is the smaller one."""

    addresses: tuple[str, ...]
    ttl_s: float


class Resolver(Protocol):
    """What routing needs from DNS. Errors are the Empath ones listed above."""

    async def mx(self, domain: str) -> MxAnswer:
        """The domain's MX records; empty records when it has none (NoAnswer)."""
        ...

    async def addresses(self, host: str) -> AddressAnswer:
        """The host's A and AAAA addresses; empty when it has neither."""
        ...


# --- timings ---------------------------------------------------------------------

#: Histogram bucket upper bounds (seconds) for lookup durations.
DEFAULT_BUCKETS_S: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class _Timings:
    __slots__ = ("histogram", "recent_s")

    def __init__(self, bounds: tuple[float, ...], recent: int) -> None:
        self.histogram = Histogram(bounds)
        self.recent_s: deque[float] = deque(maxlen=recent)


class LookupStats:
    """Durations of resolver round trips per query type, and outcome counts.

    O(log buckets) per observation; read by the metrics collector at scrape time.
    The query types routing asks for (:class:`QueryType`) have their (zero) series from
    the start, so a dashboard or the runbook's ``histogram_quantile`` over
    ``empath_dns_lookup_duration_seconds`` answers before the first lookup.
    """

    __slots__ = ("_bounds", "_recent", "_timings", "outcomes")

    def __init__(
        self,
        buckets_s: Sequence[float] = DEFAULT_BUCKETS_S,
        recent: int = 256,
        known: Sequence[str] = tuple(QueryType),
    ) -> None:
        self._bounds: tuple[float, ...] = tuple(sorted(buckets_s))
        self._recent = recent
        self._timings: dict[str, _Timings] = {qt: _Timings(self._bounds, recent) for qt in known}
        #: ``(query_type, outcome)`` → count; outcome is ``ok``, ``no_answer`` or a DnsFailure.
        self.outcomes: Counter[tuple[str, str]] = Counter()

    @property
    def buckets_s(self) -> tuple[float, ...]:
        return self._bounds

    def observe(self, query_type: str, duration_s: float, outcome: str = "ok") -> None:
        """Record one round trip."""
        t = self._timings.get(query_type)
        if t is None:
            t = self._timings[query_type] = _Timings(self._bounds, self._recent)
        t.histogram.observe(duration_s)
        t.recent_s.append(duration_s)
        self.outcomes[(query_type, outcome)] += 1

    def query_types(self) -> tuple[str, ...]:
        return tuple(sorted(self._timings))

    def snapshot(self, query_type: str) -> HistogramCounts:
        """Cumulative histogram for one query type (all zeros if never observed)."""
        t = self._timings.get(query_type)
        return (t.histogram if t is not None else Histogram(self._bounds)).snapshot()

    def recent_s(self, query_type: str) -> tuple[float, ...]:
        """The most recent durations (bounded window), oldest first."""
        t = self._timings.get(query_type)
        return tuple(t.recent_s) if t else ()


# --- names and nameservers -------------------------------------------------------------


def normalize_name(name: str) -> str:
    """Lower case, no trailing dot: the form used for keys, logs and comparisons."""
    return name.strip().rstrip(".").lower()


def parse_nameserver(spec: str) -> tuple[str, int]:
    """``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"::1"`` or ``"[::1]:5353"`` → (address, port).

    Raises ConfigError: a nameserver must be an IP literal (we cannot resolve
    the resolver).
    """
    text = spec.strip()
    port = 53
    host = text
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"nameserver {spec!r}: missing ']'", path="delivery.dns.nameservers")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(
                    f"nameserver {spec!r}: expected ':port'", path="delivery.dns.nameservers"
                )
            port = _port(rest[1:], spec)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, spec)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"nameserver {spec!r}: expected an IP address, optionally with :port",
            path="delivery.dns.nameservers",
        ) from None
    return host, port


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(
            f"nameserver {spec!r}: bad port {text!r}", path="delivery.dns.nameservers"
        )
    return int(text)


def _to_dns_name(name: str, query_type: QueryType) -> dns.name.Name:
    try:
        return dns.name.from_text(normalize_name(name) + ".")
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise failure_error(DnsFailure.INVALID_NAME, name, query_type, str(exc)) from None


# --- the real resolver ----------------------------------------------------------------

#: Longest single try against one nameserver before trying again/the next one.
_MAX_TRY_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class DnsSettings:
    """``delivery.dns``: nameservers ("host" or "host:port"; empty: the system's)
    and the timeout of one lookup."""

    nameservers: tuple[str, ...]
    timeout_s: float


class DnsResolver:
    """dnspython's async resolver behind the :class:`Resolver` protocol.

    ``nameservers`` empty → the system resolver (``/etc/resolv.conf``); else
    those servers only (``"host[:port]"``), e.g. a test's dnsmasq.
    """

    __slots__ = ("_clock", "_resolver", "nameservers", "stats", "timeout_s")

    def __init__(
        self,
        settings: DnsSettings,
        *,
        stats: LookupStats | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.stats = stats if stats is not None else LookupStats()
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._resolver = self._build(settings.nameservers, settings.timeout_s)
        self.nameservers = tuple(settings.nameservers)
        self.timeout_s = settings.timeout_s

    @staticmethod
    def _build(nameservers: Sequence[str], timeout_s: float) -> dns.asyncresolver.Resolver:
        if timeout_s <= 0:
            raise ConfigError("must be > 0", path="delivery.dns.timeout_secs")
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            servers: list[dns.nameserver.Nameserver | str] = []
            for spec in nameservers:
                address, port = parse_nameserver(spec)
                servers.append(dns.nameserver.Do53Nameserver(address, port))
            resolver.nameservers = servers
        else:
            try:
                resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.exception.DNSException as exc:
                raise ConfigError(
                    f"no system resolver configuration ({exc}); set nameservers",
                    path="delivery.dns.nameservers",
                ) from None
        # lifetime bounds the whole lookup; each try gets a share, so a dead
        # first server leaves time for the next one (and a lost UDP datagram
        # is re-sent instead of waiting out the whole lifetime).
        resolver.timeout = min(_MAX_TRY_S, timeout_s / max(1, len(resolver.nameservers)))
        resolver.lifetime = timeout_s
        resolver.search = []
        resolver.cache = None  # the MX cache is ours (TTL clamps, LRU, counters)
        return resolver

    def reconfigure(self, settings: DnsSettings) -> None:
        """Apply new settings (SIGHUP); validates fully before changing anything."""
        resolver = self._build(settings.nameservers, settings.timeout_s)
        self._resolver = resolver
        self.nameservers = tuple(settings.nameservers)
        self.timeout_s = settings.timeout_s

    async def mx(self, domain: str) -> MxAnswer:
        qname = _to_dns_name(domain, QueryType.MX)
        answer = await self._query(qname, QueryType.MX, domain)
        if answer.rrset is None:
            return MxAnswer((), float(answer.chaining_result.minimum_ttl))
        records = tuple(
            MxRecord(
                int(rr.preference),
                "." if rr.exchange == dns.name.root else normalize_name(rr.exchange.to_text()),
            )
            for rr in answer.rrset
        )
        return MxAnswer(records, float(answer.chaining_result.minimum_ttl))

    async def addresses(self, host: str) -> AddressAnswer:
        qname = _to_dns_name(host, QueryType.A)
        results = await asyncio.gather(
            self._query(qname, QueryType.A, host),
            self._query(qname, QueryType.AAAA, host),
            return_exceptions=True,
        )
        addresses: list[str] = []
        ttls: list[float] = []
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, DnsNameNotFoundError | DnsTemporaryError):
                    raise result
                errors.append(result)
                continue
            if result.rrset is not None:
                addresses.extend(rr.address for rr in result.rrset)
                ttls.append(float(result.chaining_result.minimum_ttl))
        if addresses:
            # One family answering is enough; the other's failure only costs choice.
            return AddressAnswer(tuple(addresses), min(ttls))
        if errors:
            # Prefer the temporary error: "try later" beats "does not exist" when unsure.
            temporary = [e for e in errors if isinstance(e, DnsTemporaryError)]
            raise (temporary or errors)[0]
        return AddressAnswer((), 0.0)

    async def records(self, name: str, query_type: QueryType) -> tuple[tuple[str, ...], float]:
        """The A or TXT records of ``name`` (addresses; TXT strings joined) and
        their TTL; an empty tuple when there are none.  NXDOMAIN raises
        :class:`DnsNameNotFoundError`, the rest :class:`DnsTemporaryError`."""
        answer = await self._query(_to_dns_name(name, query_type), query_type, name)
        if answer.rrset is None:
            return (), float(answer.chaining_result.minimum_ttl)
        if query_type is QueryType.TXT:
            texts = tuple(b"".join(rr.strings).decode("utf-8", "replace") for rr in answer.rrset)
        else:
            texts = tuple(rr.to_text() for rr in answer.rrset)
        return texts, float(answer.chaining_result.minimum_ttl)

    async def txt(self, name: str) -> tuple[str, ...]:
        """Every TXT record of ``name``, each with its strings joined (RFC 6376 §3.6.2.2);
        () when the name exists without TXT records (``empathctl dkim check``)."""
        texts, _ttl = await self.records(name, QueryType.TXT)
        return texts

    async def _query(
        self, qname: dns.name.Name, query_type: QueryType, shown: str
    ) -> dns.resolver.Answer:
        started = self._clock.monotonic()
        outcome = "ok"
        try:
            answer = await self._resolver.resolve(
                qname, query_type.value, search=False, raise_on_no_answer=False
            )
            if answer.rrset is None:
                outcome = "no_answer"
            return answer
        except dns.resolver.NXDOMAIN:
            outcome = DnsFailure.NXDOMAIN
            raise failure_error(DnsFailure.NXDOMAIN, shown, query_type) from None
        except dns.resolver.YXDOMAIN:
            outcome = DnsFailure.INVALID_NAME
            raise failure_error(DnsFailure.INVALID_NAME, shown, query_type, "YXDOMAIN") from None
        except dns.exception.Timeout:
            outcome = DnsFailure.TIMEOUT
            raise failure_error(DnsFailure.TIMEOUT, shown, query_type) from None
        except dns.resolver.NoNameservers as exc:
            outcome = DnsFailure.SERVFAIL
            raise failure_error(DnsFailure.SERVFAIL, shown, query_type, _first_error(exc)) from None
        except dns.exception.DNSException as exc:
            outcome = DnsFailure.ERROR
            raise failure_error(DnsFailure.ERROR, shown, query_type, str(exc)) from None
        finally:
            self.stats.observe(query_type.value, self._clock.monotonic() - started, outcome)


def _first_error(exc: dns.resolver.NoNameservers) -> str:
    errors = exc.kwargs.get("errors") or []
    if not errors:
        return ""
    server, _tcp, _port, error, *_ = errors[0]
    return f"{server}: {error}"
