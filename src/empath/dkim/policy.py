"""Which keys sign which message: the key table and the per-message plan (pure).

:func:`build_table` turns the ``dkim:`` config and the rotation state into a
:class:`KeyTable`, loading (and checking) every key through a :class:`KeyCache`; it
raises :class:`~empath.errors.ConfigError` naming the file of the first bad key, so
start-up fails and a reload is refused before anything changes.

:func:`plan` decides, for one message, from its header fields and the time:

* the signing domain: the RFC 5322 ``From:`` domain when the table has it, else the
  nearest parent listed with ``subdomains: true`` (``d=`` is then the parent, which
  DMARC's relaxed alignment accepts).  No ``From:``, several ``From:`` fields or
  addresses of different domains: not signed (DMARC receivers reject those anyway);
* the selectors: those whose window holds ``now`` (config ``not_before``/``not_after``
  narrowed by rotation), minus any whose ``d=``/``s=`` pair already signed this
  message (a message passing through Empath twice is not signed twice; no DNS
  lookup is needed for that).

The caller checks first that the client is trusted or authenticated.

:func:`scan_raw` reads the ``From:`` value straight from a message's received bytes
when its header block is plain (every line a ``name:`` field or a continuation, no
``DKIM-Signature``): the signer then neither splits the message into fields on the
event loop nor re-joins it; the key process gets the bytes as they are.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from dkim.util import InvalidTagValueList, parse_tag_value

from empath.config.dkim import Algorithm, DkimConfig
from empath.dkim.keys import KeyCache, LoadedKey
from empath.dkim.rotation import RotationState, window
from empath.dkim.sign import SignSpec


@dataclass(frozen=True, slots=True)
class SelectorKey:
    domain: str
    selector: str
    algorithm: Algorithm
    key: LoadedKey
    start: float | None  # signs from (None: always)
    end: float | None  # until (None: no end)
    pending: bool  # a rotation selector waiting for its DNS record
    source: str  # "config" or "rotation"
    spec: SignSpec  # what plan() hands the signer: made once per table, not per message

    def signs_at(self, now: float) -> bool:
        return (
            not self.pending
            and (self.start is None or self.start <= now)
            and (self.end is None or now < self.end)
        )


@dataclass(frozen=True, slots=True)
class DomainKeys:
    domain: str
    subdomains: bool
    headers: tuple[str, ...]  # lower case
    oversign: frozenset[str]
    canonicalization: str
    selectors: tuple[SelectorKey, ...]
    # the plan of every message (not already signed by it) when no selector has a
    # window or waits for DNS: made once per table, not per message
    steady: Plan | None = None

    def signing(self, now: float) -> tuple[SelectorKey, ...]:
        return tuple(s for s in self.selectors if s.signs_at(now))


@dataclass(frozen=True, slots=True)
class KeyTable:
    domains: Mapping[str, DomainKeys]

    def for_domain(self, from_domain: str) -> DomainKeys | None:
        """The entry for a From: domain: itself, else a parent with ``subdomains``."""
        keys = self.domains.get(from_domain)
        if keys is not None:
            return keys
        labels = from_domain.split(".")
        for i in range(1, len(labels) - 1):
            keys = self.domains.get(".".join(labels[i:]))
            if keys is not None and keys.subdomains:
                return keys
        return None

    def all_selectors(self) -> list[SelectorKey]:
        return [s for d in self.domains.values() for s in d.selectors]


EMPTY_TABLE = KeyTable({})


def build_table(config: DkimConfig, state: RotationState, cache: KeyCache) -> KeyTable:
    """Load every configured and rotated key (module doc); ConfigError on a bad one."""
    domains: dict[str, DomainKeys] = {}
    for domain, dc in config.domains.items():
        headers = tuple(dict.fromkeys(h.lower() for h in dc.headers))
        oversign = frozenset(h.lower() for h in dc.oversign)
        selectors: list[SelectorKey] = []
        names = set()
        for i, sc in enumerate(dc.selectors):
            where = f"dkim.domains.{domain}.selectors[{i}]"
            key = cache.load(sc.key, sc.algorithm, where=where)
            start, end = sc.window
            effective = window(state, domain, sc.selector, start, end)
            span = effective if effective is not None else (start, end)
            spec = SignSpec(domain, sc.selector, sc.algorithm, key.private,
                            dc.canonicalization, headers, oversign)  # fmt: skip
            selectors.append(SelectorKey(domain, sc.selector, sc.algorithm, key, *span,
                                         False, "config", spec))  # fmt: skip
            names.add(sc.selector)
        for rs in state.rotated(domain):
            if rs.selector in names:
                continue  # the operator copied it into the config: the config wins
            where = f"dkim rotation state ({domain} selector {rs.selector})"
            key = cache.load(rs.key, rs.algorithm, where=where)
            effective = window(state, domain, rs.selector, None, None)
            span = effective if effective is not None else (None, None)
            spec = SignSpec(domain, rs.selector, rs.algorithm, key.private,
                            dc.canonicalization, headers, oversign)  # fmt: skip
            selectors.append(SelectorKey(domain, rs.selector, rs.algorithm, key, *span,
                                         effective is None, "rotation", spec))  # fmt: skip
        steady = all(s.start is None and s.end is None and not s.pending for s in selectors)
        domains[domain] = DomainKeys(
            domain=domain,
            subdomains=dc.subdomains,
            headers=headers,
            oversign=oversign,
            canonicalization=dc.canonicalization,
            selectors=tuple(selectors),
            steady=Plan(domain, tuple(s.spec for s in selectors), ()) if steady else None,
        )
    return KeyTable(domains)


# --- per message ---------------------------------------------------------------------

# A plain header block: every line ends in CRLF; a field's line starts with its name,
# printable ASCII up to the colon (no blank before it); a continuation starts with
# SP/HT.  Such lines are fields and continuations for transport.acceptance's
# split_message too, so both read the same fields (only line starts are looked at:
# a lone CR or LF inside a line is part of the line for both).
_FIELD_START: Final = re.compile(rb"[!-9;-~]+:")
_NOT_A_LINE_START: Final = re.compile(rb"\r\n(?![!-9;-~]+:|[ \t])")


def scan_raw(raw: bytes) -> tuple[int, list[str]] | None:
    """``(length of the header block with its last CRLF, [From: value])`` of a message
    whose header block is plain and carries no DKIM-Signature (module doc); the list
    is empty without a ``From:``.  None for anything else (the caller splits)."""
    end = raw.find(b"\r\n\r\n")
    if end < 0 or _FIELD_START.match(raw) is None:
        return None
    if _NOT_A_LINE_START.search(raw, 0, end) is not None:
        return None
    head = end + 2
    lowered = b"\r\n" + raw[:head].lower()  # every field now follows a CRLF
    if lowered.find(b"\r\ndkim-signature:") >= 0:  # (find: see dkim/canon.py)
        return None  # the split path reads them (an earlier hop's signatures)
    start = lowered.find(b"\r\nfrom:")
    if start < 0:
        return head, []
    if lowered.find(b"\r\nfrom:", start + 2) >= 0:
        return None  # several From: fields (not signed; the split path says so)
    stop = raw.find(b"\r\n", start)  # start: the field's offset in raw (2 added, 2 for CRLF)
    while raw[stop + 2] in (0x20, 0x09):  # folded: the block's last CRLF is followed by CR
        stop = raw.find(b"\r\n", stop + 2)
    value = raw[start + 5 : stop].decode("utf-8", "replace").replace("\r\n", "")
    return head, [value.strip(" \t")]


_SIMPLE_FROM: Final = re.compile(
    r'[^<>",@]*<[^<>",@\s]+@([A-Za-z0-9.-]+)>|[^<>",@\s]+@([A-Za-z0-9.-]+)'
)


def from_domain(from_values: Sequence[str]) -> str | None:
    """The one domain of the From: field(s) (lower case, A-labels), or None."""
    if len(from_values) != 1:
        return None
    simple = _SIMPLE_FROM.fullmatch(from_values[0].strip())
    if simple is not None:  # "a@b", "<a@b>", "Name <a@b>": most mail, without the parser
        return (simple.group(1) or simple.group(2)).rstrip(".").lower() or None
    domains = set()
    for _name, addr in email.utils.getaddresses(list(from_values)):
        at = addr.rfind("@")
        if at <= 0:
            return None
        domains.add(addr[at + 1 :].strip().rstrip(".").lower())
    if len(domains) != 1:
        return None
    domain = domains.pop()
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return domain or None


def existing_signatures(values: Sequence[str]) -> set[tuple[str, str]]:
    """``(d, s)`` of every DKIM-Signature field value (malformed ones are ignored)."""
    found = set()
    for value in values:
        try:
            tags = parse_tag_value(value.encode("utf-8", "replace"))
        except InvalidTagValueList:
            continue
        d = tags.get(b"d")
        s = tags.get(b"s")
        if d is not None and s is not None:
            d_text = d.decode("ascii", "replace").lower().rstrip(".")
            found.add((d_text, s.decode("ascii", "replace")))
    return found


class Plan:
    """What one message is signed with (a plain class: mypyc builds a frozen dataclass
    through an interpreted ``__init__``, and there is one per signed message)."""

    __slots__ = ("domain", "skipped", "specs")

    def __init__(
        self, domain: str, specs: tuple[SignSpec, ...], skipped: tuple[SelectorKey, ...]
    ) -> None:
        self.domain = domain  # d=
        self.specs = specs
        self.skipped = skipped  # already signed with this d=/s=


def plan(
    table: KeyTable, from_values: Sequence[str], dkim_values: Sequence[str], now: float
) -> Plan | None:
    """What to sign this message with (module doc); None when nothing applies."""
    if not table.domains:
        return None
    domain = from_domain(from_values)
    if domain is None:
        return None
    keys = table.for_domain(domain)
    if keys is None:
        return None
    if not dkim_values and keys.steady is not None and keys.steady.specs:
        return keys.steady
    active = keys.signing(now)
    if not active:
        return None
    if not dkim_values:  # nearly all mail: the table's specs as they are
        return Plan(keys.domain, tuple(sk.spec for sk in active), ())
    done = existing_signatures(dkim_values)
    specs = []
    skipped = []
    for sk in active:
        if (keys.domain, sk.selector) in done:
            skipped.append(sk)
        else:
            specs.append(sk.spec)
    return Plan(keys.domain, tuple(specs), tuple(skipped))
