"""A scripted :class:`empath.dns.resolver.Resolver` for unit tests.

Theory of operation
-------------------
The fake holds a tiny zone: MX RRsets per domain and addresses per host. A name
*exists* when any record (or an explicit empty entry) was scripted for it, so
it behaves like real DNS: an unknown name is NXDOMAIN, a known name without
the asked type is an empty answer (NoAnswer). Failures (``DnsFailure``) can be
scripted per name and optionally per query type; they raise exactly the errors
the real resolver raises (both use ``failure_error``). Lookups can be delayed
or held behind an ``asyncio.Event`` gate, for single-flight and cancellation
tests, and every query is counted per ``(query_type, name)``.

``addresses()`` asks A and AAAA like the real resolver (two counted queries);
IPv4 addresses come first.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter

from empath.dns.resolver import (
    AddressAnswer,
    DnsFailure,
    LookupStats,
    MxAnswer,
    MxRecord,
    QueryType,
    failure_error,
    normalize_name,
)

__all__ = ["FakeResolver"]


class FakeResolver:
    """Scripted answers, errors, delays and call counts; see the module docstring."""

    def __init__(self, *, stats: LookupStats | None = None) -> None:
        self.stats = stats if stats is not None else LookupStats()
        self._mx: dict[str, tuple[tuple[MxRecord, ...], float]] = {}
        self._addresses: dict[str, tuple[tuple[str, ...], float]] = {}
        self._existing: set[str] = set()
        self._failures: dict[tuple[str, QueryType | None], DnsFailure] = {}
        self._delays_s: dict[str, float] = {}
        self._gates: dict[str, asyncio.Event] = {}
        #: ``(query_type value, name)`` → number of queries asked.
        self.calls: Counter[tuple[str, str]] = Counter()

    # --- scripting -----------------------------------------------------------

    def add_mx(self, domain: str, *records: tuple[int, str], ttl_s: float = 300.0) -> None:
        """MX RRs ``(preference, exchange)``; exchange ``"."`` is the null MX."""
        name = normalize_name(domain)
        self._existing.add(name)
        self._mx[name] = (
            tuple(MxRecord(p, "." if x == "." else normalize_name(x)) for p, x in records),
            ttl_s,
        )

    def add_null_mx(self, domain: str, ttl_s: float = 300.0) -> None:
        self.add_mx(domain, (0, "."), ttl_s=ttl_s)

    def add_host(self, host: str, *addresses: str, ttl_s: float = 300.0) -> None:
        """A/AAAA records of ``host`` (IPv4 and IPv6 literals, any order)."""
        name = normalize_name(host)
        self._existing.add(name)
        self._addresses[name] = (tuple(addresses), ttl_s)

    def add_name(self, name: str) -> None:
        """A name that exists but has no MX or address records."""
        self._existing.add(normalize_name(name))

    def remove(self, name: str) -> None:
        """Forget every record of ``name`` (it becomes NXDOMAIN)."""
        key = normalize_name(name)
        self._existing.discard(key)
        self._mx.pop(key, None)
        self._addresses.pop(key, None)

    def fail(self, name: str, failure: DnsFailure, query_type: QueryType | None = None) -> None:
        """Make lookups of ``name`` fail (all query types, or just one)."""
        self._failures[(normalize_name(name), query_type)] = failure

    def heal(self, name: str) -> None:
        """Remove every scripted failure of ``name``."""
        key = normalize_name(name)
        for k in [k for k in self._failures if k[0] == key]:
            del self._failures[k]

    def delay(self, name: str, seconds: float) -> None:
        """Each query of ``name`` takes ``seconds`` (real asyncio time)."""
        self._delays_s[normalize_name(name)] = seconds

    def gate(self, name: str) -> asyncio.Event:
        """Queries of ``name`` wait until the returned event is set."""
        event = asyncio.Event()
        self._gates[normalize_name(name)] = event
        return event

    def call_count(self, name: str, query_type: QueryType | str | None = None) -> int:
        """Queries asked for ``name`` (of one type, or all types)."""
        key = normalize_name(name)
        if query_type is not None:
            return self.calls[(str(query_type), key)]
        return sum(n for (_t, k), n in self.calls.items() if k == key)

    # --- the Resolver protocol -------------------------------------------------

    async def mx(self, domain: str) -> MxAnswer:
        name = normalize_name(domain)
        await self._ask(name, QueryType.MX, domain)
        records, ttl_s = self._mx.get(name, ((), 0.0))
        return MxAnswer(records, ttl_s)

    async def addresses(self, host: str) -> AddressAnswer:
        name = normalize_name(host)
        results = await asyncio.gather(
            self._ask(name, QueryType.A, host),
            self._ask(name, QueryType.AAAA, host),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        addresses, ttl_s = self._addresses.get(name, ((), 0.0))
        v4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
        v6 = [a for a in addresses if ipaddress.ip_address(a).version == 6]
        got = ([] if isinstance(results[0], BaseException) else v4) + (
            [] if isinstance(results[1], BaseException) else v6
        )
        if got:
            return AddressAnswer(tuple(got), ttl_s)
        if errors:
            temporary = [e for e in errors if getattr(e, "permanent", True) is False]
            raise (temporary or errors)[0]
        return AddressAnswer((), 0.0)

    async def _ask(self, name: str, query_type: QueryType, shown: str) -> None:
        self.calls[(query_type.value, name)] += 1
        gate = self._gates.get(name)
        if gate is not None:
            await gate.wait()
        delay_s = self._delays_s.get(name)
        if delay_s:
            await asyncio.sleep(delay_s)
        failure = self._failures.get((name, query_type)) or self._failures.get((name, None))
        if failure is None and name not in self._existing:
            failure = DnsFailure.NXDOMAIN
        if failure is not None:
            self.stats.observe(query_type.value, delay_s or 0.0, failure.value)
            raise failure_error(failure, shown, query_type)
        has = name in (self._mx if query_type is QueryType.MX else self._addresses)
        self.stats.observe(query_type.value, delay_s or 0.0, "ok" if has else "no_answer")
