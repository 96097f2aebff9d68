"""Text from the network, made safe to print: one helper per kind of output.

Senders, header lines, body previews and remote replies are chosen by whoever
sends us mail (or runs the MX we deliver to).  Printed raw they can drive the
operator's terminal (ESC/CSI sequences, OSC 52 writes to the clipboard, BEL,
C1 controls such as U+009B CSI), split a line for a line-oriented tool (U+0085
NEL, U+2028/U+2029 are line breaks to Python's ``splitlines`` and to JavaScript)
or forge fields of a line that the runbook greps.  Three outputs, three rules:

- :func:`terminal` - human-readable text (``queue view``, text logs): every
  character that is not printable becomes a visible escape (``\\x1b``, ``\\u2028``);
  printable text, spaces and tabs are kept as they are.
- :func:`list_field` - one field of a ``key: value, key: value`` line (``queue
  list``): additionally spaces, commas and backslashes are escaped, so a field can
  hold neither a separator nor the ``key: `` shape of another field, and the
  escaping cannot be forged (a literal backslash is ``\\\\``).
- :func:`json_line` - an encoded JSON document (logs, ``--json``): JSON already
  escapes C0 controls; the C1 controls and U+2028/U+2029 that it leaves raw are
  escaped too (``\\u0085``), so one record stays one line for any splitter.

Printable text goes through each of them unchanged, at the cost of one C-level
scan (``str.isprintable`` / ``bytes.isascii``).  A leaf module: no imports from
the package, so logs, the control server and the CLI can all use it.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)

if TYPE_CHECKING:
    import re

__all__ = ["json_line", "json_text", "list_field", "terminal"]


class _Unsafe:
    """The JSON escapes' patterns, compiled at their first use: `empathctl` imports this
    module and would otherwise import ``re`` (and ``enum``) for output that is ASCII."""

    bytes_: re.Pattern[bytes] | None = None
    str_: re.Pattern[str] | None = None

    @classmethod
    def compile(cls) -> None:
        import re

        cls.bytes_ = re.compile(rb"\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")
        cls.str_ = re.compile("[\x80-\x9f\u2028\u2029]")


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def terminal(text: str) -> str:
    """``text`` with every non-printable character but the tab shown as an escape."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == "\t" else _escape_char(ch) for ch in text)


_LIST_SPECIAL = frozenset(" ,\\")


def list_field(text: str) -> str:
    """``text`` as one field of a ``queue list`` line: no space, comma, backslash or
    non-printable character is left raw (see the module doc)."""
    if text.isprintable() and " " not in text and "," not in text and "\\" not in text:
        return text
    return "".join(
        _escape_char(ch) if ch in _LIST_SPECIAL or not ch.isprintable() else ch for ch in text
    )


def _json_escape(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(match.group().decode("utf-8"))


def json_line(line: bytes) -> bytes:
    """A UTF-8 JSON document with C1 controls and U+2028/U+2029 escaped as ``\\uXXXX``
    (valid JSON either way; this form survives any line splitter and terminal)."""
    if line.isascii():
        return line
    if _Unsafe.bytes_ is None:
        _Unsafe.compile()
    assert _Unsafe.bytes_ is not None
    return _Unsafe.bytes_.sub(_json_escape, line)


def json_text(text: str) -> str:
    """:func:`json_line` for a JSON document held as ``str``."""
    if text.isascii():
        return text
    if _Unsafe.str_ is None:
        _Unsafe.compile()
    assert _Unsafe.str_ is not None
    return _Unsafe.str_.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


REDACTED = "REDACTED"  # (no typing import: empathctl start-up)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``REDACTED``: the userinfo's
    (``redis://:pw@host``, ``redis://user:pw@host``) and a ``password=`` query
    parameter (redis-py reads one).  The user name, host, port and path stay, so the
    operator still sees where it points; everything else is returned unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # userinfo ends at the last "@" before any query (a password may hold "/" or "@")
    query_at = rest.find("?")
    at = rest.rfind("@", 0, query_at if query_at >= 0 else len(rest))
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        if colon:
            rest = f"{user}:{REDACTED}{rest[at:]}"
        elif user and scheme.startswith("redis"):  # redis://PASSWORD@host: a bare password
            rest = f"{REDACTED}{rest[at:]}"
    out = f"{scheme}://{rest}"
    base, q, query = out.partition("?")
    if q:
        params = [
            f"{k}={REDACTED}" if k.lower() in ("password", "pass", "pwd") else f"{k}{eq}{v}"
            for k, eq, v in (p.partition("=") for p in query.split("&"))
        ]
        out = base + "?" + "&".join(params)
    return out
