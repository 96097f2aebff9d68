"""Making DKIM-Signature fields (RFC 6376 §3.5, §5; RFC 8463 for Ed25519): pure, no I/O.

Compiled with mypyc (pyproject.toml): this runs once per signed message on the event
loop.  Canonicalisation follows dkimpy's rules byte for byte (dkim/canon.py, checked
against dkimpy by a property test); header selection (RFC 6376 §5.4.2: bottom-up,
one field per listed name), the signature field's folding and hashing are done here in
one pass over the fields; dkimpy, Mail::DKIM and OpenDKIM verify the result in the
tests.  The private-key operation is ``cryptography``'s (OpenSSL): dkimpy's own RSA is
pure Python, about 25 times slower for the same bytes - PKCS#1 v1.5 signatures are
deterministic.

:func:`sign` takes the header fields exactly as they will be spooled and the body,
and returns one ``DKIM-Signature`` field per :class:`SignSpec`, to be prepended.
The body hash is computed once per body canonicalisation and each signed field is
canonicalised once per header canonicalisation, shared by the signatures that use
them (dual RSA + Ed25519 does each once).

What is signed (``h=``): each configured name once per occurrence in the message,
bottom-up as RFC 6376 §5.4.2 has verifiers pick them, and once more for the
"over-signed" names (§8.15), so that a field added later - a second ``From:``, a
``Reply-To:`` that was absent - breaks the signature.  ``l=`` (body length) is never
used: it lets anyone append to a signed body.

The field is folded at 78 columns between tags (and between ``h=`` names, where RFC
6376 allows FWS around the colons); ``b=`` always starts a line of its own, so the
field hashed with an empty ``b=`` is the final one up to ``b=``, byte for byte, under
either header canonicalisation.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from empath.config.dkim import Algorithm
from empath.dkim.canon import body_canonical, relaxed_value
from empath.dkim.keys import PrivateKey
from empath.transport.acceptance import split_message

_SIG_NAME: Final = b"DKIM-Signature"
_SIG_RELAXED: Final = b"dkim-signature:"
_PADDING: Final = padding.PKCS1v15()
_PREHASHED: Final = Prehashed(hashes.SHA256())
LINE: Final = 78  # fold the signature field's lines at this width (RFC 5322 §2.1.1)
B64_CHUNK: Final = 72  # base64 of b= per line


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
    """Raw ``Name: value\\r\\n`` fields → ``(name, value-with-CRLF)`` pairs."""
    out: list[tuple[bytes, bytes]] = []
    for raw in raw_fields:
        colon = raw.find(b":")
        out.append((raw[:colon], raw[colon + 1 :]))
    return out


# One field of a plain header block (dkim/policy.py PLAIN_HEAD): name, colon, value
# with its continuation lines and final CRLF.
_PLAIN_FIELD: Final = re.compile(rb"([!-9;-~]+):([^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)")


def plain_fields(raw: bytes, head: int) -> list[tuple[bytes, bytes]]:
    """The ``(name, value-with-CRLF)`` pairs of ``raw[:head]``, a plain header block
    (checked by the caller: dkim/policy.py ``scan_raw``)."""
    fields: list[tuple[bytes, bytes]] = _PLAIN_FIELD.findall(raw, 0, head)
    size = 0
    for name, value in fields:
        size += len(name) + 1 + len(value)
    if size != head:  # a lone CR or LF inside a line (part of the line, as for the split)
        fields = parse_fields([f.raw for f in split_message(raw[:head])[0]])
    return fields


def field_name(name: bytes) -> str:
    """A field name as ``h=`` and the configuration spell it: stripped, lower case."""
    return name.decode("ascii", "replace").strip().lower()


def name_counts(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for raw_name, _ in headers:
        lower = field_name(raw_name)
        counts[lower] = counts.get(lower, 0) + 1
    return counts


def header_list(counts: dict[str, int], spec: SignSpec) -> list[str]:
    """The ``h=`` names: each configured one per occurrence, plus one for over-signed."""
    out: list[str] = []
    oversign = spec.oversign
    for name in spec.headers:
        n = counts.get(name, 0)
        if name in oversign:
            n += 1
        for _ in range(n):
            out.append(name)
    return out


def body_hash(body: bytes, c_body: str) -> bytes:
    hasher = _SHA256.copy()
    hasher.update(body_canonical(body, c_body))
    return _b64(hasher.digest())


def _b64(data: bytes) -> bytes:
    """Base64, no newline (``base64.b64encode`` is this call behind an interpreted
    frame, and the key process makes three per dual-signed message)."""
    return binascii.b2a_base64(data, newline=False)


class Unsigned:
    """A signature with everything computed but the private-key operation (a plain
    class, read-only by contract: mypyc builds a frozen dataclass through an
    interpreted ``__init__``, and there is one per signature)."""

    __slots__ = ("digest", "head", "spec")

    def __init__(self, spec: SignSpec, head: bytes, digest: bytes) -> None:
        self.spec = spec
        self.head = head  # the field's value up to and including ``b=`` (folded, leading SP)
        self.digest = digest  # SHA-256 over the canonical signed fields and this one (b= empty)


class _Message:
    """The header fields of one message, canonicalised lazily per field and mode."""

    __slots__ = ("canonical", "fields", "joined", "names")

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        self.fields = fields
        self.names = [field_name(n) for n, _ in fields]
        self.canonical: dict[tuple[bool, int], bytes] = {}
        self.joined: dict[tuple[bool, tuple[str, ...]], bytes] = {}

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.names:
            counts[name] = counts.get(name, 0) + 1
        return counts

    def field(self, i: int, relaxed: bool) -> bytes:
        """Field ``i`` canonicalised as it is hashed (``name:value\\r\\n``)."""
        key = (relaxed, i)
        done = self.canonical.get(key)
        if done is None:
            name, value = self.fields[i]
            if relaxed:
                done = name.lower().rstrip() + b":" + relaxed_value(value)
            else:
                done = name + b":" + value
            self.canonical[key] = done
        return done

    def selected(self, include: list[str], relaxed: bool) -> bytes:
        """The fields ``h=`` names, canonicalised and joined as they are hashed: each
        name's occurrences bottom-up (RFC 6376 §5.4.2); a name listed more often than
        present (over-signing) adds nothing.  The same for every signature with the
        same ``h=`` and header canonicalisation (dual RSA + Ed25519): made once."""
        key = (relaxed, tuple(include))
        done = self.joined.get(key)
        if done is not None:
            return done
        where: dict[str, list[int]] = {}  # name -> its fields' positions, bottom-up
        for i in range(len(self.names) - 1, -1, -1):
            name = self.names[i]
            found = where.get(name)
            if found is None:
                where[name] = [i]
            else:
                found.append(i)
        taken: dict[str, int] = {}
        parts: list[bytes] = []
        for name in include:
            at = where.get(name)
            if at is None:
                continue  # over-signed and absent: adds nothing
            n = taken.get(name, 0)
            if n < len(at):
                parts.append(self.field(at[n], relaxed))
            taken[name] = n + 1
        done = self.joined[key] = b"".join(parts)
        return done


def prepare(
    raw_fields: Sequence[bytes], body: bytes, specs: Sequence[SignSpec], now: int
) -> list[Unsigned]:
    """Canonicalise and hash (holds the GIL): one :class:`Unsigned` per spec."""
    return prepare_fields(parse_fields(raw_fields), body, specs, now)


def prepare_fields(
    fields: list[tuple[bytes, bytes]], body: bytes, specs: Sequence[SignSpec], now: int
) -> list[Unsigned]:
    """:func:`prepare` for fields already split into ``(name, value-with-CRLF)``."""
    message = _Message(fields)
    counts = message.counts()
    body_hashes: dict[str, bytes] = {}
    includes: dict[tuple[tuple[str, ...], frozenset[str]], list[str]] = {}
    stamp = str(now).encode("ascii")
    out: list[Unsigned] = []
    for spec in specs:
        c_head, _, c_body = spec.canonicalization.partition("/")
        if not c_body:
            c_body = "simple"
        bh = body_hashes.get(c_body)
        if bh is None:
            bh = body_hashes[c_body] = body_hash(body, c_body)
        relaxed = c_head == "relaxed"
        names = (spec.headers, spec.oversign)
        include = includes.get(names)
        if include is None:  # the same for every spec of a domain (dual RSA + Ed25519)
            include = includes[names] = header_list(counts, spec)
        form = _head_form(spec, include, len(stamp))
        head = form.head[0] + stamp + form.head[1] + bh + form.head[2]
        hashed = form.hashed
        hasher = _SHA256.copy()  # (a fresh hashlib.sha256() looks the digest up again)
        # the signed fields, then the signature field itself, b= empty, without its
        # final CRLF (§3.7)
        hasher.update(b"".join((message.selected(include, relaxed), hashed[0], stamp,
                                hashed[1], bh, hashed[2])))  # fmt: skip
        out.append(Unsigned(spec, head, hasher.digest()))
    return out


@dataclass(frozen=True, slots=True)
class _HeadForm:
    """A spec's signature field for one ``h=`` list, cut around ``t=`` and ``bh=``:
    the folded value (``head``) and the form hashed (``hashed``: canonicalised, name
    included, final CRLF excluded).  Both values have a fixed width (``t=`` has the
    same number of digits until 2286, ``bh=`` is a SHA-256 in base64), so the folding
    is the same for every message: made once, filled in per message."""

    spec: SignSpec
    head: tuple[bytes, bytes, bytes]
    hashed: tuple[bytes, bytes, bytes]


_T_MARK: Final = b"\x00"
_BH_MARK: Final = b"\x01" * 44  # base64 of 32 bytes
_SHA256: Final = hashlib.sha256()
_FORMS: dict[tuple[int, tuple[str, ...], int], _HeadForm] = {}


def _head_form(spec: SignSpec, include: list[str], digits: int) -> _HeadForm:
    key = (id(spec), tuple(include), digits)
    form = _FORMS.get(key)
    if form is not None and form.spec is spec:
        return form
    head = signature_head(spec, int(b"1" * digits), include, _BH_MARK)
    head = head.replace(b"t=" + b"1" * digits + b";", b"t=" + _T_MARK + b";", 1)
    if spec.canonicalization.partition("/")[0] == "relaxed":
        hashed = _SIG_RELAXED + relaxed_value(head)[:-2]
    else:
        hashed = _SIG_NAME + b":" + head
    form = _HeadForm(spec, _cut(head), _cut(hashed))
    if len(_FORMS) >= 4096:  # specs change only on reload; keep it bounded anyway
        _FORMS.clear()
    _FORMS[key] = form
    return form


def _cut(text: bytes) -> tuple[bytes, bytes, bytes]:
    before, _, rest = text.partition(_T_MARK)
    middle, _, after = rest.partition(_BH_MARK)
    return before, middle, after


def signature_head(spec: SignSpec, now: int, include: list[str], bh: bytes) -> bytes:
    """The folded value of the ``DKIM-Signature`` field up to ``b=`` (module doc)."""
    pieces = [
        b"v=1;",
        b"a=" + spec.algorithm.encode("ascii") + b";",
        b"c=" + spec.canonicalization.encode("ascii") + b";",
        b"d=" + spec.domain.encode("ascii") + b";",
        b"s=" + spec.selector.encode("ascii") + b";",
        b"t=" + str(now).encode("ascii") + b";",
    ]
    out = bytearray()
    width = len(_SIG_NAME) + 1  # "DKIM-Signature:"
    for piece in pieces:
        width = _add(out, width, piece, b" ")
    last = len(include) - 1
    for i, name in enumerate(include):
        text = name.encode("ascii") + (b";" if i == last else b":")
        # a new tag after a space; the next h= name straight after the colon
        width = _add(out, width, b"h=" + text, b" ") if i == 0 else _add(out, width, text, b"")
    _add(out, width, b"bh=" + bh + b";", b" ")
    out += b"\r\n b="
    return bytes(out)


def _add(out: bytearray, width: int, piece: bytes, sep: bytes) -> int:
    """Append ``sep + piece`` to the line, or fold before ``piece``; the new width."""
    if width + len(sep) + len(piece) > LINE and width > 1:
        out += b"\r\n "
        out += piece
        return 1 + len(piece)
    out += sep
    out += piece
    return width + len(sep) + len(piece)


def key_op(u: Unsigned) -> bytes:
    """The private-key operation (OpenSSL; the GIL is released while it runs).  Chosen by
    the spec's algorithm, which matches the key's type (dkim/keys.py checks it on load):
    ``isinstance`` against ``cryptography``'s abstract key classes runs an interpreted
    ``ABCMeta.__instancecheck__`` for every signature (and the key is held untyped: the
    compiled module would check it against those classes, which ``cryptography``'s own
    key types are only registered with)."""
    spec = u.spec
    key: Any = spec.key
    if spec.algorithm == "ed25519-sha256":
        signed: bytes = key.sign(u.digest)  # RFC 8463 §3: Ed25519 over the SHA-256 hash
    else:
        signed = key.sign(u.digest, _PADDING, _PREHASHED)
    return signed


def signature_field(u: Unsigned, signature: bytes) -> bytes:
    """The final ``DKIM-Signature: ...\\r\\n`` field with ``signature`` in ``b=``."""
    b64 = _b64(signature)
    lines = [b64[i : i + B64_CHUNK] for i in range(0, len(b64), B64_CHUNK)]
    return _SIG_NAME + b":" + u.head + b"\r\n ".join(lines) + b"\r\n"


def finish(pending: Sequence[Unsigned]) -> list[bytes]:
    """The key operations and the final fields, one per pending signature."""
    return [signature_field(u, key_op(u)) for u in pending]


def sign(
    raw_fields: Sequence[bytes], body: bytes, specs: Sequence[SignSpec], now: int
) -> list[bytes]:
    """One ``DKIM-Signature: ...\\r\\n`` field per spec (module doc)."""
    return finish(prepare(raw_fields, body, specs, now))


def sign_fields(
    fields: list[tuple[bytes, bytes]], body: bytes, specs: Sequence[SignSpec], now: int
) -> list[bytes]:
    """:func:`sign` for fields already split into ``(name, value-with-CRLF)``."""
    return finish(prepare_fields(fields, body, specs, now))
