"""The MX cache: routing answers kept for their TTL, bounded by an LRU.

Theory of operation
-------------------
An entry maps ``(kind, name)`` to a :class:`Resolution` — the exchangers of a
domain (``EntryKind.MX``: MX hosts with their addresses, or the implicit MX)
or the addresses of one host (``EntryKind.HOST``: an ``mx_override`` naming a
host). Entries are produced by a *loader* (``mx.dns_loader(resolver)``) and
live in an ``OrderedDict`` kept in least-recently-used order:

* **TTL.** A positive entry lives ``clamp(ttl, min_cache_ttl_secs,
  max_cache_ttl_secs)`` seconds, where ``ttl`` is the smallest TTL of the
  records it was built from. Time is the injected clock's ``monotonic()``.
* **Negative caching** (RFC 2308 in spirit): a *permanent* failure — NXDOMAIN,
  null MX, a domain with neither MX nor address — is stored for
  ``negative_ttl_secs`` and re-raised (as a fresh exception) on every hit.
* **Temporary failures are not cached.** A SERVFAIL or timeout is asked again
  on the next attempt: retry backoff and the per-domain circuit breaker
  already pace those attempts, and a resolver that recovers should be used at
  once. Concurrent lookups of one key share a single in-flight query
  (single flight), so a burst of deliveries to an uncached domain costs one
  round trip and one timeout at worst, never one per message.
* **Serve-stale** (RFC 8767).  A positive entry whose TTL ran out is kept for
  ``serve_stale_secs`` more (default a day; 0 turns it off).  A lookup of it asks
  the resolver as usual; if the resolver fails *temporarily* (timeout, SERVFAIL,
  no route) the last good answer is returned instead, counted in ``stale_served``
  (``empath_dns_stale_answers_total``), and kept as the answer for
  ``STALE_ANSWER_TTL_S`` (30 s, RFC 8767's recommendation) before the resolver is
  tried again.  A permanent answer (NXDOMAIN, null MX) is authoritative and
  replaces it.  ``clear``/``invalidate``/``refresh`` mark entries for refresh
  instead of throwing the last good answer away: clearing the cache during a DNS
  outage (the runbook's first step) cannot stop mail that was flowing.
* **LRU bound.** After a store, while there are more than ``cache_size``
  entries, the least recently used one is dropped and counted as an eviction
  (an already-expired entry that falls out is not counted: it was dead, not
  crowded out). ``cache_size`` 0 disables caching.
* **Counters** for ``empath_dns_cache_{hits,misses,evictions}_total``: a hit
  is a lookup answered without resolver traffic (from an entry, positive or
  negative, or by joining an in-flight query); a miss is a lookup that started
  a query. Operator refreshes count as neither.

Operator operations (``empathctl dns list-cache | clear-cache | refresh``):
:meth:`MxCache.entries` (live entries, and stale ones being served, marked),
:meth:`MxCache.clear`, :meth:`MxCache.refresh`;
:meth:`MxCache.reconfigure` applies new settings on SIGHUP (shrinking keeps the
most recently used entries; existing entries keep their expiry).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from empath.clock import Clock
from empath.dns.resolver import normalize_name
from empath.errors import ConfigError, DeliveryError, PermanentDeliveryError
from empath.supervisor import Track, untracked

__all__ = [
    "CacheEntryInfo",
    "EntryKind",
    "Exchanger",
    "Loader",
    "MxCache",
    "Resolution",
]


class EntryKind(StrEnum):
    """What an entry answers: a domain's mail exchangers, or one host's addresses."""

    MX = "MX"
    HOST = "HOST"


@dataclass(frozen=True, slots=True)
class Exchanger:
    """One mail exchanger: its MX preference, name and resolved addresses."""

    preference: int
    host: str
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Resolution:
    """A routing answer: exchangers sorted by preference (DNS order within one).

    ``ttl_s`` is the raw (unclamped) TTL; ``implicit`` marks an implicit MX.
    """

    exchangers: tuple[Exchanger, ...]
    ttl_s: float
    implicit: bool = False


STALE_ANSWER_TTL_S: Final = 30.0  # RFC 8767 §5: a stale answer is reused this long

#: Produces the Resolution for ``(kind, name)``; raises DeliveryError subclasses.
Loader = Callable[[EntryKind, str], Coroutine[Any, Any, Resolution]]


@dataclass(frozen=True, slots=True)
class CacheEntryInfo:
    """One live entry, as ``empathctl dns list-cache`` shows it."""

    name: str
    kind: EntryKind
    exchangers: tuple[Exchanger, ...]
    ttl_remaining_s: float
    negative: bool
    error: str
    enhanced: str
    stale: bool = False  # the last good answer, served while the resolver fails

    def line(self) -> str:
        """One line per entry (the runbook counts lines with ``wc -l``)."""
        ttl = f"ttl={int(self.ttl_remaining_s + 0.999)}s"
        if self.negative:
            return f"{self.name} {self.kind} {ttl} negative {self.enhanced} {self.error}"
        hosts = " ".join(
            f"{e.preference} {e.host} [{','.join(e.addresses)}]" for e in self.exchangers
        )
        return f"{self.name} {self.kind} {ttl}{' stale' if self.stale else ''} {hosts}"


class _Entry:
    __slots__ = ("error", "expires_at", "resolution", "stale", "stale_until")

    def __init__(
        self,
        resolution: Resolution | None,
        error: DeliveryError | None,
        expires_at: float,
        stale_until: float = 0.0,
    ) -> None:
        self.resolution = resolution
        self.error = error
        self.expires_at = expires_at
        self.stale_until = stale_until  # a positive answer may be served stale until then
        self.stale = False  # being served stale now


_Key = tuple[EntryKind, str]


def _clone(error: DeliveryError) -> DeliveryError:
    """A fresh instance, so concurrent raisers do not share one traceback."""
    return type(error)(error.text, code=error.code, enhanced=error.enhanced, mx=error.mx)


@dataclass(frozen=True, slots=True)
class CacheLimits:
    """``delivery.dns`` cache settings: entries kept, TTL clamps, negative TTL."""

    cache_size: int
    min_cache_ttl_secs: float
    max_cache_ttl_secs: float
    negative_ttl_secs: float
    serve_stale_secs: float = 86400.0


class MxCache:
    """TTL-honouring, negatively caching, LRU-bounded cache of routing answers."""

    def __init__(
        self, loader: Loader, *, clock: Clock, limits: CacheLimits, track: Track = untracked
    ) -> None:
        """``track`` starts the shared queries (the daemon's supervisor keeps them)."""
        self._track = track
        self._loader = loader
        self._clock = clock
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._inflight: dict[_Key, asyncio.Task[Resolution]] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.stale_served = 0  # lookups answered with a stale entry (RFC 8767)
        self.serve_stale_secs = 0.0
        self.cache_size = 0
        self.min_cache_ttl_secs = 0.0
        self.max_cache_ttl_secs = 0.0
        self.negative_ttl_secs = 0.0
        self.reconfigure(limits)

    # --- settings ----------------------------------------------------------

    def reconfigure(self, limits: CacheLimits) -> None:
        """Apply new limits (SIGHUP). Shrinking evicts least recently used entries."""
        cache_size = limits.cache_size
        min_cache_ttl_secs = limits.min_cache_ttl_secs
        max_cache_ttl_secs = limits.max_cache_ttl_secs
        negative_ttl_secs = limits.negative_ttl_secs
        if cache_size < 0:
            raise ConfigError("must be >= 0", path="delivery.dns.cache_size")
        if min_cache_ttl_secs < 0 or negative_ttl_secs < 0 or limits.serve_stale_secs < 0:
            raise ConfigError("TTLs must be >= 0", path="delivery.dns")
        if max_cache_ttl_secs < min_cache_ttl_secs:
            raise ConfigError(
                "max_cache_ttl_secs must be >= min_cache_ttl_secs", path="delivery.dns"
            )
        self.cache_size = cache_size
        self.min_cache_ttl_secs = float(min_cache_ttl_secs)
        self.max_cache_ttl_secs = float(max_cache_ttl_secs)
        self.negative_ttl_secs = float(negative_ttl_secs)
        self.serve_stale_secs = float(limits.serve_stale_secs)
        self._trim()

    def __len__(self) -> int:
        """Live entries (those kept only for serve-stale, past their TTL, do not count)."""
        now = self._clock.monotonic()
        return sum(1 for e in self._entries.values() if e.expires_at > now)

    # --- lookups -----------------------------------------------------------

    async def lookup(self, kind: EntryKind, name: str) -> Resolution:
        """The cached Resolution, else load it (once, however many callers wait).

        Raises the loader's DeliveryError; permanent ones are cached negatively.
        """
        key = (kind, normalize_name(name))
        entry = self._entries.get(key)
        stale: _Entry | None = None
        if entry is not None:
            now = self._clock.monotonic()
            if entry.expires_at > now:
                self._entries.move_to_end(key)
                self.hits += 1
                if entry.error is not None:
                    raise _clone(entry.error)
                assert entry.resolution is not None
                return entry.resolution
            if entry.resolution is not None and entry.stale_until > now:
                stale = entry  # ask again; fall back on it if the resolver fails
            else:
                del self._entries[key]  # expired: not an eviction
        task = self._inflight.get(key)
        if task is None:
            self.misses += 1
            task = self._start(key)
        else:
            self.hits += 1
        if stale is None:
            return await self._join(task)
        try:
            return await self._join(task)
        except PermanentDeliveryError:
            raise  # authoritative (NXDOMAIN, null MX): not a resolver failure
        except DeliveryError:
            return self._serve_stale(key, stale)

    def _serve_stale(self, key: _Key, stale: _Entry) -> Resolution:
        """RFC 8767: the resolver failed; answer with the last good data, and keep using
        it for ``STALE_ANSWER_TTL_S`` before asking again."""
        self.stale_served += 1
        if self._entries.get(key) is stale:
            stale.stale = True
            stale.expires_at = min(self._clock.monotonic() + STALE_ANSWER_TTL_S, stale.stale_until)
            self._entries.move_to_end(key)
        assert stale.resolution is not None
        return stale.resolution

    def peek(self, kind: EntryKind, name: str) -> Resolution | None:
        """The live positive entry without loading, touching LRU order or counting."""
        entry = self._entries.get((kind, normalize_name(name)))
        if entry is None or entry.expires_at <= self._clock.monotonic():
            return None
        return entry.resolution

    def _start(self, key: _Key) -> asyncio.Task[Resolution]:
        # The lookups waiting on this key await it (one query however many wait) and
        # _finished reads its outcome; the supervisor keeps it for shutdown.
        task = self._track(self._loader(*key), name=f"empath-dns-{key[1]}")
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._finished(key, t))
        return task

    @staticmethod
    async def _join(task: asyncio.Task[Resolution]) -> Resolution:
        # shield: a cancelled waiter must not cancel the query others wait for.
        try:
            return await asyncio.shield(task)
        except DeliveryError as exc:
            raise _clone(exc) from None

    def _finished(self, key: _Key, task: asyncio.Task[Resolution]) -> None:
        if task.cancelled():
            error: BaseException | None = None
        else:
            error = task.exception()  # retrieved here even if every waiter went away
        if self._inflight.get(key) is not task:
            return  # cleared or refreshed meanwhile: a newer answer owns the key
        del self._inflight[key]
        if task.cancelled():
            return
        now = self._clock.monotonic()
        if error is None:
            resolution = task.result()
            ttl_s = min(max(resolution.ttl_s, self.min_cache_ttl_secs), self.max_cache_ttl_secs)
            expires = now + ttl_s
            self._store(key, _Entry(resolution, None, expires, expires + self.serve_stale_secs))
        elif isinstance(error, PermanentDeliveryError):
            self._store(key, _Entry(None, error, now + self.negative_ttl_secs))
        # Temporary failures and foreign exceptions are not cached (see module doc).

    def _store(self, key: _Key, entry: _Entry) -> None:
        if self.cache_size == 0:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        self._trim()

    def _trim(self) -> None:
        now = self._clock.monotonic()
        while len(self._entries) > self.cache_size:
            _key, old = self._entries.popitem(last=False)
            if old.expires_at > now:
                self.evictions += 1

    # --- operator operations -------------------------------------------------

    def entries(self) -> list[CacheEntryInfo]:
        """Live entries sorted by name then kind; expired ones are dropped on the way."""
        now = self._clock.monotonic()
        out: list[CacheEntryInfo] = []
        for key, entry in list(self._entries.items()):
            if entry.expires_at <= now:
                if entry.resolution is None or entry.stale_until <= now:
                    del self._entries[key]
                continue  # kept for serve-stale, not live: not listed
            kind, name = key
            err = entry.error
            out.append(
                CacheEntryInfo(
                    name=name,
                    kind=kind,
                    exchangers=entry.resolution.exchangers if entry.resolution else (),
                    ttl_remaining_s=entry.expires_at - now,
                    negative=err is not None,
                    error=err.text if err is not None else "",
                    enhanced=err.enhanced if err is not None else "",
                    stale=entry.stale,
                )
            )
        out.sort(key=lambda e: (e.name, e.kind))
        return out

    def clear(self) -> int:
        """Mark every live entry for refresh (and forget in-flight queries); returns how
        many.  Negative entries go; positive ones keep their answer for serve-stale:
        the next lookup asks the resolver, and falls back on it only if that fails."""
        now = self._clock.monotonic()
        n = 0
        for key, entry in list(self._entries.items()):
            if entry.expires_at > now:
                n += 1
            self._expire(key, entry, now)
        self._inflight.clear()
        return n

    def _expire(self, key: _Key, entry: _Entry, now: float) -> None:
        if entry.resolution is None or self.serve_stale_secs <= 0 or entry.stale_until <= now:
            del self._entries[key]
        else:
            entry.expires_at = min(entry.expires_at, now)

    def invalidate(self, name: str) -> int:
        """Mark the live entries for ``name`` (both kinds) for refresh; returns how many."""
        now = self._clock.monotonic()
        n = 0
        for kind in EntryKind:
            key = (kind, normalize_name(name))
            self._inflight.pop(key, None)
            entry = self._entries.get(key)
            if entry is not None:
                n += entry.expires_at > now
                self._expire(key, entry, now)
        return n

    async def refresh(self, domain: str, kind: EntryKind = EntryKind.MX) -> Resolution:
        """Resolve the domain again now (its entries marked for refresh first).

        Returns the new Resolution; raises the DeliveryError the lookup ends in
        (a permanent one is cached negatively, as for any lookup; after a temporary
        one, deliveries keep the last good answer under serve-stale).
        """
        self.invalidate(domain)
        return await self._join(self._start((kind, normalize_name(domain))))
