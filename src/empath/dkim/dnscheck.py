"""``dkim check``: is each selector's public key published, and would mail align?

The lookups go through Empath's own resolver (``delivery.dns``), so the check sees
what the daemon sees.  For each selector ``S`` of domain ``D``: the TXT record at
``S._domainkey.D`` is parsed as RFC 6376 §3.6.1 tag=value; it matches when it is
``v=DKIM1`` (or has no ``v=``), its ``k=`` is the key's type (``rsa`` when absent)
and its ``p=`` is the key's public half.  An empty ``p=`` is a revoked key.

Then DMARC (RFC 7489): ``_dmarc.D`` should hold ``v=DMARC1``; mail Empath signs for
``D`` carries ``d=D`` (or, for a subdomain under ``subdomains: true``, ``d=`` the
parent), which aligns in relaxed mode (``adkim=r``, the default) and, for
subdomains, not in strict mode (``adkim=s``).  And SPF (RFC 7208): ``D`` should have
one ``v=spf1`` record.  These are warnings: signing works without them, but large
receivers want DMARC alignment to deliver mail to the inbox.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from empath.errors import DnsNameNotFoundError, DnsTemporaryError

TxtLookup = Callable[[str], Awaitable[tuple[str, ...]]]


def parse_tags(text: str) -> dict[str, str]:
    """``v=DKIM1; k=rsa; p=...`` → tags (whitespace inside values removed)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags[name.strip().lower()] = "".join(value.split())
    return tags


def match_record(records: tuple[str, ...], kind: str, public_p: str) -> tuple[bool, str]:
    """Does one of ``records`` publish this key?  ``(ok, detail)``."""
    if not records:
        return False, "no TXT record"
    details = []
    for record in records:
        tags = parse_tags(record)
        if tags.get("v", "DKIM1") != "DKIM1":
            details.append(f"not a DKIM record (v={tags.get('v')})")
            continue
        if tags.get("k", "rsa").lower() != kind:
            details.append(f"k={tags.get('k', 'rsa')}, the key is {kind}")
            continue
        p = tags.get("p")
        if p is None:
            details.append("no p= tag")
        elif not p:
            details.append("the key is revoked (empty p=)")
        elif p == public_p:
            return True, "published, matches the private key"
        else:
            details.append("p= does not match the private key")
    return False, "; ".join(details)


@dataclass(frozen=True, slots=True)
class Lookup:
    records: tuple[str, ...]
    error: str  # "" when the lookup answered (possibly with no records)


async def lookup(txt: TxtLookup, name: str) -> Lookup:
    try:
        return Lookup(await txt(name), "")
    except DnsNameNotFoundError:
        return Lookup((), "")
    except DnsTemporaryError as exc:
        return Lookup((), str(exc))


async def check_selector(txt: TxtLookup, domain: str, selector: str, kind: str, public_p: str
                         ) -> tuple[bool, str]:  # fmt: skip
    name = f"{selector}._domainkey.{domain}"
    found = await lookup(txt, name)
    if found.error:
        return False, f"{name}: lookup failed: {found.error}"
    ok, detail = match_record(found.records, kind, public_p)
    return ok, f"{name}: {detail}"


async def alignment(txt: TxtLookup, domain: str, subdomains: bool) -> list[str]:
    """Warnings about DMARC and SPF for mail signed ``d=domain`` (module doc)."""
    warnings: list[str] = []
    dmarc = await lookup(txt, f"_dmarc.{domain}")
    records = [r for r in dmarc.records if parse_tags(r).get("v") == "DMARC1"]
    if dmarc.error:
        warnings.append(f"_dmarc.{domain}: lookup failed: {dmarc.error}")
    elif not records:
        warnings.append(
            f"_dmarc.{domain}: no DMARC record; large receivers expect one "
            f'(e.g. "v=DMARC1; p=none; rua=mailto:dmarc@{domain}")'
        )
    else:
        tags = parse_tags(records[0])
        if tags.get("adkim", "r").lower() == "s" and subdomains:
            warnings.append(
                f"_dmarc.{domain}: adkim=s: mail From: a subdomain is signed d={domain} "
                "and will not align in strict mode"
            )
    spf = await lookup(txt, domain)
    spf_records = [r for r in spf.records if r.lower().startswith("v=spf1")]
    if spf.error:
        warnings.append(f"{domain}: SPF lookup failed: {spf.error}")
    elif not spf_records:
        warnings.append(f"{domain}: no SPF record (v=spf1); DKIM alone can align DMARC")
    elif len(spf_records) > 1:
        warnings.append(f"{domain}: {len(spf_records)} SPF records (RFC 7208 §3.2: permerror)")
    return warnings


def alignment_note(domain: str, subdomains: bool) -> str:
    """How Empath's signatures for ``domain`` align with From: (DMARC, RFC 7489 §3.1.1)."""
    note = f"DKIM d={domain} aligns with From: {domain} in strict and relaxed mode"
    if subdomains:
        note += f"; From: a subdomain of {domain} (signed d={domain}) aligns in relaxed mode only"
    return note
