"""Destinations the operator suspended (`empathctl queue suspend DOMAIN [--for 2h]`).

Theory of operation
-------------------
A suspended domain gets no delivery attempt until it is resumed or its suspension
expires; its units stay queued with their status (they are not held one by one).
The scheduler reads :attr:`Suspensions.until` (domain -> wall-clock end, ``inf``
for "until resumed") before it asks the policy about a due unit: a suspended
domain's units join its line silently, and the line is looked at again at the
suspension's end (or the scheduler's re-check interval).  Nothing is read per
unit while no domain is suspended (an empty dict is falsy).

Suspensions outlive a restart: every change is written to ``suspended.json`` in
the spool directory (atomically: a temporary file, fsync, rename).  In cluster
mode the shared copy is a Redis hash and each node's loop replaces the local set
with it (:meth:`Suspensions.replace_all`), so one `suspend` stops the whole
cluster; the local file keeps a restarted node from delivering before it has
read Redis.

Pure apart from :func:`load`/:meth:`Suspensions.save`; the clock is injected.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from empath.clock import Clock

FILE_NAME: Final = "suspended.json"


@dataclass(frozen=True, slots=True)
class Suspension:
    """One suspended domain."""

    domain: str
    since: float  # wall clock
    until: float  # wall clock; inf = until resumed
    reason: str = ""

    def active(self, now: float) -> bool:
        return now < self.until

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "since": self.since,
            "until": None if math.isinf(self.until) else self.until,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Suspension:
        until = data.get("until")
        return cls(
            domain=str(data["domain"]).lower(),
            since=float(data.get("since", 0.0)),
            until=math.inf if until is None else float(until),
            reason=str(data.get("reason", "")),
        )


Listener = Callable[[str], None]


class Suspensions:
    """The suspended domains of this node (the cluster's, when clustered)."""

    def __init__(self, clock: Clock, path: str | None = None) -> None:
        self._clock = clock
        self.path = path  # the JSON file, or None (memory spool: not persisted)
        self._by_domain: dict[str, Suspension] = {}
        # domain -> wall-clock end: what the scheduler reads on its hot path
        self.until: dict[str, float] = {}
        self._listeners: list[Listener] = []

    def on_change(self, listener: Listener) -> None:
        """``listener(domain)`` after a domain is suspended, resumed or expires."""
        self._listeners.append(listener)

    def __len__(self) -> int:
        return len(self.active())

    def get(self, domain: str) -> Suspension | None:
        s = self._by_domain.get(domain)
        if s is None:
            return None
        if not s.active(self._clock.now()):
            self._drop(domain)
            return None
        return s

    def active(self) -> dict[str, Suspension]:
        """Every suspension still in force (expired ones are forgotten here)."""
        now = self._clock.now()
        for domain in [d for d, s in self._by_domain.items() if not s.active(now)]:
            self._drop(domain)
        return dict(self._by_domain)

    def suspend(self, domain: str, for_s: float | None, reason: str) -> Suspension:
        now = self._clock.now()
        until = math.inf if for_s is None else now + for_s
        s = Suspension(domain.lower(), now, until, reason)
        self._set(s)
        self.save()
        return s

    def resume(self, domain: str) -> Suspension | None:
        s = self._by_domain.get(domain.lower())
        if s is None:
            return None
        self._drop(s.domain)
        self.save()
        return s

    def replace_all(self, records: Mapping[str, Suspension]) -> list[str]:
        """Make the set equal to ``records`` (the cluster's); the domains that changed."""
        changed = [d for d in self._by_domain if d not in records]
        changed += [d for d, s in records.items() if self._by_domain.get(d) != s]
        if not changed:
            return []
        for domain in changed:
            if domain in records:
                self._set(records[domain])
            else:
                self._drop(domain)
        self.save()
        return changed

    def _set(self, s: Suspension) -> None:
        self._by_domain[s.domain] = s
        self.until[s.domain] = s.until
        for listener in self._listeners:
            listener(s.domain)

    def _drop(self, domain: str) -> None:
        self._by_domain.pop(domain, None)
        self.until.pop(domain, None)
        for listener in self._listeners:
            listener(domain)

    # -- persistence ------------------------------------------------------------

    def load(self) -> int:
        """Read the file (a missing or unreadable one is an empty set); how many."""
        if self.path is None:
            return 0
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            records = [Suspension.from_json(r) for r in data.get("suspended", [])]
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return 0
        now = self._clock.now()
        for s in records:
            if s.active(now):
                self._set(s)
        return len(self._by_domain)

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path + ".tmp"
        body = json.dumps({"suspended": [s.to_json() for s in self._by_domain.values()]})
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
