"""Key rotation state (``empathctl dkim rotate``): pure decisions over a small JSON file.

Theory of operation
-------------------
The config lists each domain's selectors; rotation adds to that, without editing
the operator's config file, in a state file (``dkim.rotation.state_file``, default
``<spool>/dkim-rotation.json``, versioned JSON written atomically):

* ``rotate`` records a *pending* selector (a new key file, not yet signing) for a
  domain and algorithm: its public key must be in DNS before receivers can verify
  it;
* ``published`` (called when ``dkim check`` - by hand, or the daemon's periodic
  check - sees the pending selector's TXT record match its key, or at once with
  ``rotate --now``) makes it *active* from that moment and gives every older active
  selector of the same domain and algorithm a retirement time ``overlap_days``
  later: both sign during the overlap (receivers holding mail signed with the old
  key, or caching its DNS record, still verify it), then only the new one;
* ``checked`` records the last DNS check of each selector for ``dkim list`` and
  the ``empath_dkim_key_published`` gauge (alert DkimKeyNotPublished).

The effective signing window of a selector is its config ``not_before``/``not_after``
narrowed by the state (active from / retired at); :func:`window` computes it, and
the signer compares it with the injected clock per message (virtual time in
tests).  Every function here returns a new :class:`RotationState`; the caller
saves it (:func:`save`) and rebuilds the key table, as a reload does.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from empath.config.dkim import Algorithm
from empath.errors import ConfigError

VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class RotatedSelector:
    """A selector created by ``rotate``; ``active_from`` None while pending DNS."""

    domain: str
    selector: str
    algorithm: Algorithm
    key: str
    created_at: float
    active_from: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "selector": self.selector,
            "algorithm": self.algorithm,
            "key": self.key,
            "created_at": self.created_at,
            "active_from": self.active_from,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RotatedSelector:
        algorithm = str(data["algorithm"])
        if algorithm not in ("rsa-sha256", "ed25519-sha256"):
            raise ValueError(f"unknown algorithm {algorithm!r}")
        active = data.get("active_from")
        return cls(
            domain=str(data["domain"]),
            selector=str(data["selector"]),
            algorithm="rsa-sha256" if algorithm == "rsa-sha256" else "ed25519-sha256",
            key=str(data["key"]),
            created_at=float(data["created_at"]),
            active_from=None if active is None else float(active),
        )


@dataclass(frozen=True, slots=True)
class DnsCheck:
    """The last DNS check of one selector."""

    at: float
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class RotationState:
    """Everything rotation adds to the config (module doc).  Keys of ``retire_at`` and
    ``checks`` are ``"domain/selector"``."""

    selectors: tuple[RotatedSelector, ...] = ()
    retire_at: dict[str, float] = field(default_factory=dict)
    checks: dict[str, DnsCheck] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "selectors": [s.to_json() for s in self.selectors],
            "retire_at": dict(sorted(self.retire_at.items())),
            "checks": {k: v.to_json() for k, v in sorted(self.checks.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RotationState:
        if data.get("version") != VERSION:
            raise ValueError(f"unsupported version {data.get('version')!r}")
        return cls(
            selectors=tuple(RotatedSelector.from_json(s) for s in data.get("selectors", [])),
            retire_at={str(k): float(v) for k, v in data.get("retire_at", {}).items()},
            checks={
                str(k): DnsCheck(float(v["at"]), bool(v["ok"]), str(v.get("detail", "")))
                for k, v in data.get("checks", {}).items()
            },
        )

    def rotated(self, domain: str) -> tuple[RotatedSelector, ...]:
        return tuple(s for s in self.selectors if s.domain == domain)


def ref(domain: str, selector: str) -> str:
    return f"{domain}/{selector}"


# --- decisions -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Active:
    """A selector that signs (or would) for ``dkim list``/``published`` decisions."""

    domain: str
    selector: str
    algorithm: Algorithm
    start: float | None
    end: float | None

    def signs_at(self, now: float) -> bool:
        return (self.start is None or self.start <= now) and (self.end is None or now < self.end)


def window(
    state: RotationState,
    domain: str,
    selector: str,
    start: float | None,
    end: float | None,
) -> tuple[float | None, float | None] | None:
    """The effective window of a selector (config window narrowed by the state);
    None while it is a rotation selector still pending DNS."""
    for rs in state.selectors:
        if rs.domain == domain and rs.selector == selector:
            if rs.active_from is None:
                return None
            start = rs.active_from if start is None else max(start, rs.active_from)
    retire = state.retire_at.get(ref(domain, selector))
    if retire is not None:
        end = retire if end is None else min(end, retire)
    return start, end


def next_selector(template: str, algorithm: Algorithm, now: float, taken: set[str]) -> str:
    """The template's name for ``now`` (UTC), with a number added while it is taken."""
    t = time.gmtime(now)
    name = (
        template.replace("{YYYYMM}", f"{t.tm_year:04d}{t.tm_mon:02d}")
        .replace("{YYYY}", f"{t.tm_year:04d}")
        .replace("{MM}", f"{t.tm_mon:02d}")
        .replace("{DD}", f"{t.tm_mday:02d}")
        .replace("{r|e}", "e" if algorithm == "ed25519-sha256" else "r")
    )
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}{n}", n + 1
    return candidate


def rotate(state: RotationState, new: RotatedSelector) -> RotationState:
    """Record a pending selector (``rotate`` without ``--now``)."""
    return replace(state, selectors=(*state.selectors, new))


def published(
    state: RotationState,
    domain: str,
    selector: str,
    now: float,
    overlap_s: float,
    active: list[Active],
) -> RotationState:
    """A pending selector's DNS record is live: it signs from ``now``; every other
    selector of that domain and algorithm in ``active`` that has no end yet retires
    ``overlap_s`` later.  Unchanged when the selector is not pending."""
    target = next(
        (s for s in state.selectors if s.domain == domain and s.selector == selector), None
    )
    if target is None or target.active_from is not None:
        return state
    selectors = tuple(replace(s, active_from=now) if s is target else s for s in state.selectors)
    retire = dict(state.retire_at)
    for a in active:
        if (
            a.domain == domain
            and a.algorithm == target.algorithm
            and a.selector != selector
            and a.end is None
            and ref(domain, a.selector) not in retire
        ):
            retire[ref(domain, a.selector)] = now + overlap_s
    return replace(state, selectors=selectors, retire_at=retire)


def checked(state: RotationState, domain: str, selector: str, check: DnsCheck) -> RotationState:
    checks = dict(state.checks)
    checks[ref(domain, selector)] = check
    return replace(state, checks=checks)


# --- the file ---------------------------------------------------------------------


def load(path: Path) -> RotationState:
    """The state on disk; empty when there is none; ConfigError when unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return RotationState()
    except OSError as exc:
        raise ConfigError(f"cannot read DKIM rotation state {path}: {exc.strerror}") from None
    try:
        return RotationState.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"DKIM rotation state {path} is damaged: {exc}") from None


def save(path: Path, state: RotationState) -> None:
    """Write atomically (temp file, fsync, rename, fsync the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(state.to_json(), indent=1).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
