"""The ``dkim:`` configuration section (DESIGN §12): signing domains, selectors, rotation.

Kept apart from ``model.py`` (which imports it into :class:`~empath.config.model.Config`)
so the schema of one feature reads in one place.  The checks here are on the values
only; the key files themselves (readable, type, size, mode) are checked when the
keys are loaded (``empath.dkim.keys``), at start, on reload and by ``--check-config``.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from empath.config.checks import non_empty, normalise_domain, positive, required, rule

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
Canonicalization = Literal["relaxed/relaxed", "relaxed/simple", "simple/simple", "simple/relaxed"]

# RFC 6376 §5.4.1: the fields a signer SHOULD sign, plus the MIME fields and
# Message-ID (which every large signer - Gmail, OpenDKIM's defaults - signs too).
DEFAULT_HEADERS: Final = (
    "From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID", "MIME-Version",
    "Content-Type", "Content-Transfer-Encoding", "Resent-Date", "Resent-From",
    "Resent-To", "Resent-Cc", "In-Reply-To", "References", "List-Id", "List-Help",
    "List-Unsubscribe", "List-Unsubscribe-Post", "List-Subscribe", "List-Post",
    "List-Owner", "List-Archive",
)  # fmt: skip
# Signed once more than they occur, so that adding one later breaks the signature
# (RFC 6376 §8.15 "over-signing").
DEFAULT_OVERSIGN: Final = (
    "From", "To", "Subject", "Date", "Reply-To", "Cc", "Message-ID", "MIME-Version",
    "Content-Type",
)  # fmt: skip

_SELECTOR: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*")
_FIELD_NAME: Final = re.compile(r"[!-9;-~]+")
# never signed: they change in transit, or are ours to add
_NEVER_SIGN: Final = frozenset({"received", "return-path", "dkim-signature", "bcc", "resent-bcc"})


def selector_name(value: str) -> str | None:
    if not _SELECTOR.fullmatch(value) or len(value) > 63:
        return f"{value!r} is not a valid selector (letters, digits, '-', dot-separated)"
    return None


def header_name(value: str) -> str | None:
    if not _FIELD_NAME.fullmatch(value):
        return f"{value!r} is not a header field name"
    if value.lower() in _NEVER_SIGN:
        return f"{value} must not be signed (it changes in transit)"
    return None


def parse_time(value: str) -> float:
    """``2026-12-01`` or ``2026-12-01T12:00:00Z`` (UTC when no offset) → epoch seconds."""
    text = value.strip()
    if len(text) == 10:
        text += "T00:00:00"
    when = datetime.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def timestamp(value: str) -> str | None:
    try:
        parse_time(value)
    except ValueError:
        return f"{value!r} is not a date (2026-12-01) or date-time (2026-12-01T12:00:00Z)"
    return None


def template(value: str) -> str | None:
    if "{" in value.replace("{YYYYMM}", "").replace("{YYYY}", "").replace("{MM}", "").replace(
        "{DD}", ""
    ).replace("{r|e}", ""):
        return "only {YYYY}, {MM}, {DD}, {YYYYMM} and {r|e} may be used"
    return selector_name(value.replace("{", "").replace("}", "").replace("|", ""))


@dataclass(frozen=True, slots=True)
class DkimSelectorConfig:
    """One key: ``selector._domainkey.<domain>`` publishes its public half."""

    selector: str = required(check=selector_name)
    key: str = required(check=non_empty)  # PEM private key (PKCS#8 or PKCS#1), mode 0600
    algorithm: Algorithm = "rsa-sha256"
    not_before: str | None = rule(None, check=timestamp)  # signs from then (UTC)
    not_after: str | None = rule(None, check=timestamp)  # and stops then

    @property
    def window(self) -> tuple[float | None, float | None]:
        return (
            None if self.not_before is None else parse_time(self.not_before),
            None if self.not_after is None else parse_time(self.not_after),
        )

    def consistency_errors(self) -> list[tuple[str, str]]:
        start, end = self.window
        if start is not None and end is not None and end <= start:
            return [("not_after", "must be later than not_before")]
        return []


def _non_empty_list(value: tuple[object, ...]) -> str | None:
    return None if value else "must list at least one selector"


@dataclass(frozen=True, slots=True)
class DkimDomainConfig:
    """How mail whose ``From:`` is this domain (or, with ``subdomains``, below it) is signed."""

    selectors: tuple[DkimSelectorConfig, ...] = rule((), check=_non_empty_list)
    subdomains: bool = False
    headers: tuple[str, ...] = rule(DEFAULT_HEADERS, check_each=header_name)
    oversign: tuple[str, ...] = rule(DEFAULT_OVERSIGN, check_each=header_name)
    canonicalization: Canonicalization = "relaxed/relaxed"

    def consistency_errors(self) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        names = [s.selector for s in self.selectors]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            errors.append(("selectors", f"selector {dup[0]!r} is listed twice"))
        if "from" not in {h.lower() for h in self.headers}:
            errors.append(("headers", "must include From (RFC 6376 §5.4)"))
        return errors


@dataclass(frozen=True, slots=True)
class DkimRotationConfig:
    """``empathctl dkim rotate``: how new selectors are named and how long the old
    one keeps signing once the new one is live."""

    overlap_days: float = rule(7.0, check=positive)
    selector_template: str = rule("s{YYYYMM}{r|e}", check=template)
    # where rotation state lives; None: dkim-rotation.json in the spool directory
    state_file: str | None = rule(None, check=non_empty)
    # how often the daemon checks the published keys (DNS) of every selector
    check_interval_secs: float = rule(3600.0, check=positive)


@dataclass(frozen=True, slots=True)
class DkimConfig:
    domains: Mapping[str, DkimDomainConfig] = rule(factory=dict, lower_keys=True)
    rotation: DkimRotationConfig = field(default_factory=DkimRotationConfig)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "domains", {normalise_domain(k): v for k, v in self.domains.items()}
        )
