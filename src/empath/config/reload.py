"""What a reload applies now and what waits for a restart (DESIGN §10; issue 14 defect 1).

Theory of operation
-------------------
A running daemon can take some settings at once (relay access, delivery, DNS,
DSN, control auth, log level, audit redaction, modules, the readiness threshold)
and not others (the listening sockets, the spool, the control socket, the health
listener, metrics, cluster, the hostname every session greets with, the log
format).  :data:`RELOADABLE` lists the first kind, by key path; everything else is
restart-only - an allow-list, so a section added later is reported as waiting for
a restart until whoever adds it applies it on reload and lists it here.

:func:`plan_reload` splits a newly read file against the running config into the
config the daemon will actually run (the running one with every reloadable part
taken from the file) and the changes still **pending** until a restart.  The
daemon stores the *applied* config - never the file's - so every later comparison
(`config check`, the next reload, `system status`, the
``empath_config_restart_pending`` gauge) still sees what is pending.

:func:`config_changes` is the human diff (``key.path: old -> new``), compared on
the real values and printed with passwords redacted.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client.core import GaugeMetricFamily, Metric

from empath.config.model import Config

# Key paths a reload applies (a path covers everything under it).
RELOADABLE: Final = (
    "smtp_controller.relay",
    "delivery",
    "dsn",
    "control_auth",
    "health.max_queue_size",
    "audit",
    "log.level",
    "modules",
    "dkim",
)


def is_reloadable(key: str) -> bool:
    """Whether a changed key (as :func:`config_changes` names it) applies on reload."""
    return any(key == p or key.startswith(p + ".") for p in RELOADABLE)


def is_restart_key(key: str) -> bool:
    return not is_reloadable(key)


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """``applied``: the config to run from now on; ``changes``: what the reload applies;
    ``pending``: changed settings that wait for a restart (lines as config_changes)."""

    applied: Config
    changes: tuple[str, ...]
    pending: tuple[str, ...]
    pending_keys: tuple[str, ...]


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    """Split ``new`` (just read from the file) against ``running`` (see module doc)."""
    applied = running
    for path in RELOADABLE:
        applied = _take(applied, new, path.split("."))
    applied = dataclasses.replace(applied, source_path=new.source_path)
    changes, _ = config_changes(running, applied)
    pending, pending_keys = config_changes(applied, new)
    return ReloadPlan(applied, tuple(changes), tuple(pending), tuple(pending_keys))


def _take(running: Any, new: Any, path: list[str]) -> Any:
    """``running`` with the value at ``path`` taken from ``new`` (frozen dataclasses)."""
    name = path[0]
    if not hasattr(running, name) or not hasattr(new, name):
        return running  # a section this build does not have
    if len(path) == 1:
        return dataclasses.replace(running, **{name: getattr(new, name)})
    inner_running = getattr(running, name)
    inner_new = getattr(new, name)
    if not (dataclasses.is_dataclass(inner_running) and dataclasses.is_dataclass(inner_new)):
        return dataclasses.replace(running, **{name: inner_new})
    return dataclasses.replace(running, **{name: _take(inner_running, inner_new, path[1:])})


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


_MISSING: Final = object()


def config_changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """Human lines ``key.path: old -> new`` and the changed keys that need a restart.

    Compared on the real values, printed redacted: a changed Redis password shows as
    ``(password changed)``, never in clear."""
    from empath.config.load import config_to_plain

    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    shown_a: dict[str, Any] = {}
    shown_b: dict[str, Any] = {}
    _flatten(config_to_plain(old), "", a)
    _flatten(config_to_plain(new), "", b)
    _flatten(config_to_plain(old, redact=True), "", shown_a)
    _flatten(config_to_plain(new, redact=True), "", shown_b)
    changes: list[str] = []
    restart: list[str] = []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key, _MISSING) == b.get(key, _MISSING):
            continue
        before = "(unset)" if key not in a else json.dumps(shown_a[key], default=str)
        after = "(unset)" if key not in b else json.dumps(shown_b[key], default=str)
        line = f"{key}: {before} -> {after}"
        if before == after:
            line += "  (password changed)"
        if is_restart_key(key):
            line += "  (applies after a restart)"
            restart.append(key)
        changes.append(line)
    return changes, restart


class ReloadMetrics:
    """``empath_config_restart_pending`` (gauge): how many changed settings the last
    reload read that only a restart applies; 0 when the daemon runs its file as read.
    A MetricsSource (joins the collector at scrape time)."""

    def __init__(self, pending: Callable[[], int]) -> None:
        self._pending = pending

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "empath_config_restart_pending",
            "Changed settings read by the last reload that apply only after a restart",
            value=self._pending(),
        )
