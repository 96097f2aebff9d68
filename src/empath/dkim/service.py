"""The daemon's DKIM service: keys in, signer configured, rotation and DNS checks.

Built by the composition root (``app.py``) from the config: it loads the rotation
state and every key (:func:`~empath.dkim.policy.build_table`, which fails naming the
bad file) and installs the table in the :class:`~empath.dkim.signer.DkimSigner` step.
``prepare``/``apply`` split a reload: the new config's keys are all loaded and
checked before anything changes, so a bad key refuses the reload and the old keys
keep signing.

Control operations (``empathctl dkim list|check|rotate``, control/dkim.py) and the
periodic DNS check run here; each change of the rotation state is saved to disk
before the new table is installed, so a restart signs with the same selectors.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from empath.clock import Clock
from empath.config.dkim import Algorithm, DkimConfig
from empath.config.model import Config
from empath.dkim import dnscheck, keys, rotation
from empath.dkim.policy import KeyTable, SelectorKey, build_table
from empath.dkim.signer import DkimSigner, DkimStats
from empath.errors import ConfigError
from empath.logs import get_logger

log = get_logger("config", __name__)


def state_path(config: Config) -> Path:
    explicit = config.dkim.rotation.state_file
    return Path(explicit) if explicit else Path(config.spool.path) / "dkim-rotation.json"


def check_keys(config: Config) -> None:
    """Load every key the config (and its rotation state) names; ConfigError naming
    the first bad one (``empath --check-config`` and start-up)."""
    if config.dkim.domains:
        build_table(config.dkim, rotation.load(state_path(config)), keys.KeyCache())


@dataclass(frozen=True, slots=True)
class Prepared:
    config: DkimConfig
    path: Path
    state: rotation.RotationState
    table: KeyTable


class DkimService:
    """See module doc."""

    def __init__(
        self, config: Config, clock: Clock, stats: DkimStats, txt: dnscheck.TxtLookup
    ) -> None:
        self._clock = clock
        self._txt = txt
        self._cache = keys.KeyCache()
        self._lock = asyncio.Lock()
        self.signer = DkimSigner(clock, stats)
        ready = self.prepare(config)
        self._config = ready.config
        self._path = ready.path
        self.state = ready.state
        self.signer.install(ready.table)

    @property
    def table(self) -> KeyTable:
        return self.signer.table

    @property
    def enabled(self) -> bool:
        return self.signer.enabled

    def prepare(self, config: Config) -> Prepared:
        """Load and check everything ``config`` needs (raises ConfigError); no change."""
        path = state_path(config)
        state = rotation.load(path) if config.dkim.domains else rotation.RotationState()
        return Prepared(config.dkim, path, state, build_table(config.dkim, state, self._cache))

    def apply(self, ready: Prepared) -> None:
        self._config = ready.config
        self._path = ready.path
        self.state = ready.state
        self.signer.install(ready.table)

    def close(self) -> None:
        self.signer.close()

    def _commit(self, state: rotation.RotationState) -> None:
        """Save the state, then sign with it (a key that fails to load raises first)."""
        table = build_table(self._config, state, self._cache)
        if state != self.state:
            rotation.save(self._path, state)
        self.state = state
        self.signer.install(table)

    def _domain(self, domain: str) -> str:
        domain = domain.lower().rstrip(".")
        if domain not in self._config.domains:
            raise ConfigError(f"{domain} is not a DKIM signing domain (dkim.domains)")
        return domain

    def _active(self) -> list[rotation.Active]:
        return [
            rotation.Active(s.domain, s.selector, s.algorithm, s.start, s.end)
            for s in self.table.all_selectors()
            if not s.pending
        ]

    # --- dkim list -----------------------------------------------------------------

    def listing(self) -> list[dict[str, Any]]:
        now = self._clock.now()
        made = self.signer.stats.by_selector
        rows = []
        for s in self.table.all_selectors():
            check = self.state.checks.get(rotation.ref(s.domain, s.selector))
            rows.append(
                {
                    "domain": s.domain,
                    "selector": s.selector,
                    "algorithm": s.algorithm,
                    "bits": s.key.bits,
                    "key": s.key.path,
                    "key_age_s": round(max(0.0, now - s.key.mtime), 1),
                    "state": _state(s, now),
                    "not_before": s.start,
                    "not_after": s.end,
                    "source": s.source,
                    "signatures": made.get((s.domain, s.selector), 0),
                    "dns_checked_at": None if check is None else check.at,
                    "dns_ok": None if check is None else check.ok,
                    "dns_detail": "" if check is None else check.detail,
                }
            )
        return rows

    def published_gauges(self) -> list[tuple[str, str, str, float]]:
        """(domain, selector, algorithm, 1|0) for each signing selector checked so far."""
        now = self._clock.now()
        out: list[tuple[str, str, str, float]] = []
        for s in self.table.all_selectors():
            check = self.state.checks.get(rotation.ref(s.domain, s.selector))
            if check is not None and s.signs_at(now):
                out.append((s.domain, s.selector, s.algorithm, 1.0 if check.ok else 0.0))
        return out

    # --- dkim check ----------------------------------------------------------------

    async def check(self, domain: str) -> dict[str, Any]:
        """DNS-check every selector of ``domain`` that signs or waits to (module doc of
        dnscheck); a pending rotation selector found published starts signing."""
        domain = self._domain(domain)
        async with self._lock:
            return await self._check(domain)

    async def _check(self, domain: str) -> dict[str, Any]:
        now = self._clock.now()
        dk = self.table.domains[domain]
        results = []
        state = self.state
        activated = []
        for s in dk.selectors:
            if s.end is not None and s.end <= now:
                continue  # retired: its record may go
            kind = "ed25519" if s.algorithm == "ed25519-sha256" else "rsa"
            ok, detail = await dnscheck.check_selector(
                self._txt, domain, s.selector, kind, s.key.public_p
            )
            state = rotation.checked(state, domain, s.selector, rotation.DnsCheck(now, ok, detail))
            if ok and s.pending:
                overlap = self._config.rotation.overlap_days * 86400
                state = rotation.published(state, domain, s.selector, now, overlap, self._active())
                activated.append(s.selector)
                log.info("DKIM selector published, signing with it now", dkim_domain=domain,
                         selector=s.selector)  # fmt: skip
            results.append(
                {"selector": s.selector, "algorithm": s.algorithm, "pending": s.pending,
                 "ok": ok, "detail": detail}
            )  # fmt: skip
        warnings = await dnscheck.alignment(self._txt, domain, dk.subdomains)
        await asyncio.to_thread(self._commit, state)  # fsync: not on the event loop
        return {
            "domain": domain,
            "selectors": results,
            "activated": activated,
            "warnings": warnings,
            "alignment": dnscheck.alignment_note(domain, dk.subdomains),
            "ok": all(r["ok"] for r in results if not r["pending"]),
        }

    async def check_all(self) -> None:
        """The periodic check (``rotation.check_interval_secs``)."""
        for domain in list(self.table.domains):
            try:
                async with self._lock:
                    await self._check(domain)
            except Exception as exc:
                log.warn("DKIM DNS check failed", dkim_domain=domain, error=repr(exc))

    async def check_loop(self) -> None:
        while True:
            if self.enabled:
                await self.check_all()
            await self._clock.sleep(self._config.rotation.check_interval_secs)

    # --- dkim rotate ----------------------------------------------------------------

    async def rotate(
        self, domain: str, algorithms: list[Algorithm], *, now_flag: bool, bits: int
    ) -> dict[str, Any]:
        domain = self._domain(domain)
        async with self._lock:
            return await asyncio.to_thread(self._rotate, domain, algorithms, now_flag, bits)

    def _rotate(
        self, domain: str, algorithms: list[Algorithm], now_flag: bool, bits: int
    ) -> dict[str, Any]:
        now = self._clock.now()
        dk = self.table.domains[domain]
        if not algorithms:  # the algorithms signing now, e.g. both of a dual setup
            algorithms = list(dict.fromkeys(s.algorithm for s in dk.signing(now))) or ["rsa-sha256"]
        state = self.state
        taken = {s.selector for s in dk.selectors}
        made = []
        for algorithm in algorithms:
            selector = rotation.next_selector(
                self._config.rotation.selector_template, algorithm, now, taken
            )
            taken.add(selector)
            path = _key_dir(dk.selectors, algorithm, self._path, domain) / f"{selector}.key"
            private = keys.generate(algorithm, bits)
            keys.write_key(path, private)
            state = rotation.rotate(
                state,
                rotation.RotatedSelector(domain, selector, algorithm, str(path), time.time()),
            )
            txt = keys.txt_value(private)
            made.append(
                {"selector": selector, "algorithm": algorithm, "key": str(path), "txt": txt,
                 "zone": keys.zone_line(selector, domain, txt)}
            )  # fmt: skip
        if now_flag:
            overlap = self._config.rotation.overlap_days * 86400
            for m in made:
                state = rotation.published(state, domain, m["selector"], now, overlap,
                                           self._active())  # fmt: skip
        self._commit(state)
        log.info("DKIM rotation started", dkim_domain=domain,
                 selectors=",".join(m["selector"] for m in made), now=now_flag)  # fmt: skip
        return {"domain": domain, "selectors": made, "active_now": now_flag,
                "overlap_days": self._config.rotation.overlap_days}  # fmt: skip


def _key_dir(
    selectors: tuple[SelectorKey, ...], algorithm: Algorithm, state: Path, domain: str
) -> Path:
    """Next to the domain's current key of that algorithm (else any of its keys, else
    ``dkim-keys/<domain>`` beside the state file)."""
    for s in sorted(selectors, key=lambda s: s.algorithm != algorithm):
        return Path(s.key.path).parent
    return state.parent / "dkim-keys" / domain


def _state(s: SelectorKey, now: float) -> str:
    if s.pending:
        return "pending-dns"
    if s.end is not None and s.end <= now:
        return "retired"
    if s.start is not None and now < s.start:
        return "scheduled"
    if s.end is not None:
        return "retiring"
    return "active"
