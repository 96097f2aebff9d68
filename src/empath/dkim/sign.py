"""Making DKIM-Signature fields (RFC 6376 §3.5, §5; RFC 8463 for Ed25519): pure, no I/O.

Header selection, the signature field's folding and the ``b=``-stripping of the
field being signed are dkimpy's (the library behind many Python mail filters, tested
against other implementations); canonicalisation follows dkimpy's rules byte for byte
without its per-field regular expressions (dkim/canon.py, checked against dkimpy by a
property test); the private-key
operation is ``cryptography``'s (OpenSSL): dkimpy's own RSA is pure Python, about
25 times slower for the same bytes - PKCS#1 v1.5 signatures are deterministic.

:func:`sign` takes the header fields exactly as they will be spooled and the body,
and returns one ``DKIM-Signature`` field per :class:`SignSpec`, to be prepended.
The body hash is computed once per body canonicalisation and shared by the
signatures that use it (dual RSA + Ed25519 hashes the body once).

What is signed (``h=``): each configured name once per occurrence in the message,
bottom-up as RFC 6376 §5.4.2 has verifiers pick them, and once more for the
"over-signed" names (§8.15), so that a field added later - a second ``From:``, a
``Reply-To:`` that was absent - breaks the signature.  ``l=`` (body length) is never
used: it lets anyone append to a signed body.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import dkim  # dkimpy
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from empath.config.dkim import Algorithm
from empath.dkim.canon import Policy
from empath.dkim.keys import PrivateKey

_SIG_NAME = b"DKIM-Signature"
_PADDING = padding.PKCS1v15()
_PREHASHED = Prehashed(hashes.SHA256())


@dataclass(frozen=True, slots=True)
class SignSpec:
    """One signature to make: ``d=``, ``s=``, the key and what to sign."""

    domain: str
    selector: str
    algorithm: Algorithm
    key: PrivateKey
    canonicalization: str  # "relaxed/relaxed", ...
    headers: tuple[str, ...]  # lower-case names, in order
    oversign: frozenset[str]  # lower-case names


def parse_fields(raw_fields: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """Raw ``Name: value\\r\\n`` fields → dkimpy's ``(name, value-with-CRLF)`` pairs."""
    out: list[tuple[bytes, bytes]] = []
    for raw in raw_fields:
        colon = raw.find(b":")
        out.append((raw[:colon], raw[colon + 1 :]))
    return out


def header_list(counts: dict[str, int], spec: SignSpec) -> list[bytes]:
    """The ``h=`` names: each configured one per occurrence, plus one for over-signed."""
    out: list[bytes] = []
    oversign = spec.oversign
    for name, raw in _encoded(spec.headers):
        n = counts.get(name, 0) + (name in oversign)
        if n:
            out.extend([raw] * n)
    return out


@functools.cache
def _encoded(names: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    return tuple((n, n.encode("ascii")) for n in names)


def name_counts(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for raw_name, _ in headers:
        lower = raw_name.decode("ascii", "replace").strip().lower()
        counts[lower] = counts.get(lower, 0) + 1
    return counts


@functools.cache
def policy_of(canonicalization: str) -> Policy:
    """The canonicalisation policy for ``relaxed/simple`` etc. (dkimpy's rules, faster:
    dkim/canon.py), made once."""
    return Policy(canonicalization)


def body_hash(body: bytes, canonicalization: str) -> bytes:
    policy = policy_of(canonicalization)
    return base64.b64encode(hashlib.sha256(policy.canonicalize_body(body)).digest())


@dataclass(frozen=True, slots=True)
class Unsigned:
    """A signature with everything computed but the private-key operation."""

    spec: SignSpec
    fields: tuple[tuple[bytes, bytes], ...]  # the tags, b= last and empty
    digest: bytes  # SHA-256 over the canonical signed fields and this one (b= empty)


def prepare(
    raw_fields: Sequence[bytes], body: bytes, specs: Sequence[SignSpec], now: int
) -> list[Unsigned]:
    """Canonicalise and hash (pure Python, holds the GIL): one :class:`Unsigned` a spec.

    Only the fields named in ``h=`` are canonicalised (dkimpy canonicalises each field
    by itself, so selecting first gives the same bytes), once per header
    canonicalisation; the body once per body canonicalisation."""
    headers = parse_fields(raw_fields)
    counts = name_counts(headers)
    body_hashes: dict[str, bytes] = {}
    canonical: dict[tuple[str, frozenset[str]], list[tuple[bytes, bytes]]] = {}
    out: list[Unsigned] = []
    for spec in specs:
        c_head, c_body = spec.canonicalization.split("/")
        bh = body_hashes.get(c_body)
        if bh is None:
            bh = body_hashes[c_body] = body_hash(body, spec.canonicalization)
        wanted = frozenset(spec.headers)
        key = (c_head, wanted)
        selected = canonical.get(key)
        if selected is None:
            chosen = [h for h in headers if h[0].decode("ascii", "replace").strip().lower()
                      in wanted]  # fmt: skip
            selected = canonical[key] = policy_of(spec.canonicalization).canonicalize_headers(
                chosen
            )
        out.append(_unsigned(selected, counts, bh, spec, now))
    return out


def _unsigned(
    selected: list[tuple[bytes, bytes]], counts: dict[str, int], bh: bytes, spec: SignSpec,
    now: int,
) -> Unsigned:  # fmt: skip
    include = header_list(counts, spec)
    fields: list[tuple[bytes, bytes]] = [
        (b"v", b"1"),
        (b"a", spec.algorithm.encode("ascii")),
        (b"c", spec.canonicalization.encode("ascii")),
        (b"d", spec.domain.encode("ascii")),
        (b"s", spec.selector.encode("ascii")),
        (b"t", str(now).encode("ascii")),
        (b"h", b" : ".join(include)),  # spaces: fold points (FWS is allowed there)
        (b"bh", bh),
        # a placeholder as long as a signature pushes b= onto a line of its own, so the
        # folding of everything before it is the same with the real value (dkimpy's trick)
        (b"b", b"0" * 60),
    ]
    folded = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(_SIG_NAME))
    unsigned = dkim.RE_BTAG.sub(b"\\1", folded)
    hasher = hashlib.sha256()
    policy = policy_of(spec.canonicalization)
    dkim.hash_headers(hasher, policy, selected, include, (_SIG_NAME, b" " + unsigned),
                      dict(fields))  # fmt: skip
    fields[-1] = (b"b", b"")
    return Unsigned(spec, tuple(fields), hasher.digest())


def finish(pending: Sequence[Unsigned]) -> list[bytes]:
    """The private-key operations (OpenSSL; the GIL is released while RSA signs) and
    the final ``DKIM-Signature: ...\r\n`` fields."""
    out = []
    for u in pending:
        key = u.spec.key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            signature = key.sign(u.digest)  # RFC 8463 §3: Ed25519 over the SHA-256 hash
        else:
            signature = key.sign(u.digest, _PADDING, _PREHASHED)
        fields = (*u.fields[:-1], (b"b", base64.b64encode(signature)))
        value = dkim.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n",
                          namelen=len(_SIG_NAME))  # fmt: skip
        out.append(_SIG_NAME + b": " + bytes(value))
    return out


def sign(
    raw_fields: Sequence[bytes], body: bytes, specs: Sequence[SignSpec], now: int
) -> list[bytes]:
    """One ``DKIM-Signature: ...\r\n`` field per spec (module doc)."""
    return finish(prepare(raw_fields, body, specs, now))
