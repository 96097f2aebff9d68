"""A small reader and writer for RON (Rusty Object Notation).

Theory of operation
-------------------
No maintained RON library exists for Python 3.11, so Empath owns this one. It
covers the part of the grammar configuration files use:

* structs, named or anonymous: ``Empath ( key: value, ... )`` / ``( key: value )``
* tuples ``( a, b )``, named tuples ``Name ( a, b )``, the unit ``()`` and bare
  enum variants (``File``)
* maps ``{ "key": value }`` whose keys are quoted strings, bare words, numbers
  or booleans
* lists ``[ a, b ]``, trailing commas everywhere
* strings with escapes (``\\n \\t \\" \\\\ \\u{1F600} \\x41``), raw strings
  ``r"..."`` / ``r#"..."#``, char literals ``'c'`` (read as one-character strings)
* integers (sign, ``0x``/``0o``/``0b``, ``_`` separators), floats (``1.0``,
  ``1e3``, ``-0.5``, ``inf``, ``NaN``), ``true``/``false``, ``None``/``Some(x)``
* ``//`` line comments and nested ``/* /* */ */`` block comments, and
  ``#![enable(...)]`` attributes at the top (accepted and ignored)

:func:`parse` is a recursive-descent reader straight over the text (config files
are small; there is no separate tokenizer). It returns a tree of frozen node
objects, each carrying the 1-based ``line``/``column`` where it starts, so that
the schema binder (``empath.config.load``) can point at the exact offending
value. Every syntax error raises :class:`~empath.errors.ConfigError` with the
file, line and column; no other exception escapes the reader, whatever the
input (nesting depth is bounded so hostile input cannot exhaust the stack).

:func:`dumps` writes plain Python values back as RON: a ``dict`` whose keys are
all identifiers becomes a struct, any other ``dict`` (or a :class:`MapValue`)
becomes a map; lists and tuples become lists. ``to_python(parse(dumps(v)))``
equals ``v`` for every such value (tuples come back as lists).

The writer lives in ``empath.config.ron_write`` (re-exported here); the
round-trip contract between the two is tested in ``tests/unit/test_config_ron.py``.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Final

from empath.config.ron_write import MapValue, dumps, is_identifier
from empath.errors import ConfigError

__all__ = [
    "MapValue",
    "RonBool",
    "RonField",
    "RonIdent",
    "RonList",
    "RonMap",
    "RonMapEntry",
    "RonNode",
    "RonNone",
    "RonNumber",
    "RonSome",
    "RonStr",
    "RonStruct",
    "RonTuple",
    "RonUnit",
    "dumps",
    "is_identifier",
    "parse",
    "to_python",
]

MAX_DEPTH: Final = 100

# --- nodes -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RonNode:
    """Base of every parsed value: where it starts in the text (1-based)."""

    line: int
    column: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RonStr(RonNode):
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RonNumber(RonNode):
    """An integer (``value`` is ``int``) or a float (``value`` is ``float``)."""

    value: int | float


@dataclass(frozen=True, slots=True, kw_only=True)
class RonBool(RonNode):
    value: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RonNone(RonNode):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class RonSome(RonNode):
    value: RonNode


@dataclass(frozen=True, slots=True, kw_only=True)
class RonUnit(RonNode):
    """``()``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RonIdent(RonNode):
    """A bare word in value position: an enum unit variant such as ``File``."""

    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RonList(RonNode):
    items: tuple[RonNode, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RonTuple(RonNode):
    """``( a, b )`` or ``Name ( a, b )``."""

    name: str | None
    items: tuple[RonNode, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RonField(RonNode):
    """One ``key: value`` of a struct; the position is the key's."""

    key: str
    value: RonNode


@dataclass(frozen=True, slots=True, kw_only=True)
class RonStruct(RonNode):
    """``Name ( key: value, ... )``; ``fields`` keeps the written order."""

    name: str | None
    fields: dict[str, RonField]


@dataclass(frozen=True, slots=True, kw_only=True)
class RonMapEntry(RonNode):
    """One ``key: value`` of a map; the position is the key's."""

    key: RonStr | RonNumber | RonBool
    value: RonNode


@dataclass(frozen=True, slots=True, kw_only=True)
class RonMap(RonNode):
    entries: tuple[RonMapEntry, ...]


# --- reader ------------------------------------------------------------------

_WS: Final = re.compile(r"[ \t\r\n\f\v\ufeff]*")
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMENT_EDGE: Final = re.compile(r"/\*|\*/")
_ATTRIBUTE: Final = re.compile(r"#!\[[^\[\]]*\]")
_DECIMAL: Final = re.compile(
    r"(?:[0-9][0-9_]*(?:\.(?![A-Za-z_.])[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][+-]?[0-9_]+)?"
)
_RADIX: Final = {
    "0x": (16, re.compile(r"[0-9A-Fa-f_]+")),
    "0o": (8, re.compile(r"[0-7_]+")),
    "0b": (2, re.compile(r"[01_]+")),
}
_PLAIN_CHUNK: Final = re.compile(r'[^"\\]+')
_HEX: Final = re.compile(r"[0-9A-Fa-f]+")
_SIMPLE_ESCAPES: Final = {
    '"': '"',
    "'": "'",
    "\\": "\\",
    "/": "/",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "0": "\0",
    "b": "\b",
    "f": "\f",
}
_KEYWORDS: Final = frozenset({"true", "false", "None", "Some", "inf", "NaN"})


class _Reader:
    __slots__ = ("depth", "file", "i", "line_starts", "n", "s")

    def __init__(self, text: str, file: str) -> None:
        self.s = text
        self.n = len(text)
        self.i = 0
        self.file = file
        self.depth = 0
        self.line_starts = [0, *(m.end() for m in re.finditer("\n", text))]

    # positions and errors

    def where(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.line_starts, offset)
        return line, offset - self.line_starts[line - 1] + 1

    def error(self, message: str, offset: int | None = None) -> ConfigError:
        line, column = self.where(self.i if offset is None else offset)
        return ConfigError(message, file=self.file, line=line, column=column)

    def unexpected(self, wanted: str) -> ConfigError:
        if self.i >= self.n:
            return self.error(f"unexpected end of input, expected {wanted}")
        return self.error(f"unexpected {self.s[self.i]!r}, expected {wanted}")

    # whitespace and comments

    def skip(self) -> None:
        s = self.s
        while True:
            self.i = _WS.match(s, self.i).end()  # type: ignore[union-attr]
            if s.startswith("//", self.i):
                end = s.find("\n", self.i)
                self.i = self.n if end < 0 else end + 1
            elif s.startswith("/*", self.i):
                self.skip_block_comment()
            else:
                return

    def skip_block_comment(self) -> None:
        start = self.i
        depth = 0
        for m in _COMMENT_EDGE.finditer(self.s, start):
            depth += 1 if m.group() == "/*" else -1
            if depth == 0:
                self.i = m.end()
                return
        raise self.error("unterminated block comment", start)

    def expect(self, char: str, wanted: str) -> None:
        if self.s.startswith(char, self.i):
            self.i += 1
        else:
            raise self.unexpected(wanted)

    # document

    def document(self) -> RonNode:
        self.skip()
        while self.s.startswith("#!", self.i):
            m = _ATTRIBUTE.match(self.s, self.i)
            if m is None:
                raise self.error("malformed #![...] attribute")
            self.i = m.end()
            self.skip()
        if self.i >= self.n:
            raise self.error("empty document, expected a value")
        node = self.value()
        self.skip()
        if self.i < self.n:
            raise self.error(f"unexpected {self.s[self.i]!r} after the end of the document")
        return node

    def value(self) -> RonNode:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"values nested deeper than {MAX_DEPTH} levels")
        try:
            return self.value_inner()
        finally:
            self.depth -= 1

    def value_inner(self) -> RonNode:
        s, i = self.s, self.i
        if i >= self.n:
            raise self.unexpected("a value")
        c = s[i]
        line, column = self.where(i)
        if c == '"':
            return RonStr(value=self.string(), line=line, column=column)
        if c == "r" and (s.startswith('r"', i) or s.startswith("r#", i)):
            return RonStr(value=self.raw_string(), line=line, column=column)
        if c == "'":
            return RonStr(value=self.char(), line=line, column=column)
        if c == "[":
            return self.list_(line, column)
        if c == "{":
            return self.map_(line, column)
        if c == "(":
            self.i += 1
            return self.paren(None, line, column)
        if c.isdigit() or c in "+-.":
            return RonNumber(value=self.number(), line=line, column=column)
        m = _IDENT.match(s, i)
        if m is None:
            raise self.unexpected("a value")
        word = m.group()
        self.i = m.end()
        if word in {"true", "false"}:
            return RonBool(value=word == "true", line=line, column=column)
        if word == "None":
            return RonNone(line=line, column=column)
        if word in ("inf", "NaN"):
            return RonNumber(value=float(word), line=line, column=column)
        self.skip()
        has_parens = s.startswith("(", self.i)
        if word == "Some":
            if not has_parens:
                raise self.unexpected("'(' after Some")
            self.i += 1
            self.skip()
            inner = self.value()
            self.skip()
            if s.startswith(",", self.i):
                self.i += 1
                self.skip()
            self.expect(")", "')' closing Some(...)")
            return RonSome(value=inner, line=line, column=column)
        if has_parens:
            self.i += 1
            return self.paren(word, line, column)
        return RonIdent(name=word, line=line, column=column)

    # compound values

    def list_(self, line: int, column: int) -> RonList:
        self.i += 1
        items: list[RonNode] = []
        while True:
            self.skip()
            if self.s.startswith("]", self.i):
                self.i += 1
                return RonList(items=tuple(items), line=line, column=column)
            items.append(self.value())
            self.skip()
            if self.s.startswith(",", self.i):
                self.i += 1
            elif not self.s.startswith("]", self.i):
                raise self.unexpected("',' or ']'")

    def map_(self, line: int, column: int) -> RonMap:
        self.i += 1
        entries: list[RonMapEntry] = []
        seen: set[tuple[type, Any]] = set()
        while True:
            self.skip()
            if self.s.startswith("}", self.i):
                self.i += 1
                return RonMap(entries=tuple(entries), line=line, column=column)
            start = self.i
            key_line, key_column = self.where(start)
            key: RonNode
            m = _IDENT.match(self.s, start)
            if m is not None and m.group() not in _KEYWORDS:
                key = RonStr(value=m.group(), line=key_line, column=key_column)
                self.i = m.end()
            else:
                key = self.value()
            if not isinstance(key, RonStr | RonNumber | RonBool):
                raise self.error("map keys must be strings, numbers or booleans", start)
            marker = (type(key.value), key.value)
            if marker in seen:
                raise self.error(f"duplicate map key {key.value!r}", start)
            seen.add(marker)
            self.skip()
            self.expect(":", "':' after a map key")
            self.skip()
            value = self.value()
            entries.append(RonMapEntry(key=key, value=value, line=key_line, column=key_column))
            self.skip()
            if self.s.startswith(",", self.i):
                self.i += 1
            elif not self.s.startswith("}", self.i):
                raise self.unexpected("',' or '}'")

    def peek_colon(self, offset: int) -> bool:
        saved = self.i
        self.i = offset
        self.skip()
        found = self.s.startswith(":", self.i) and not self.s.startswith("::", self.i)
        self.i = saved
        return found

    def paren(self, name: str | None, line: int, column: int) -> RonNode:
        """After ``(``: a struct when the first item is ``ident:``, else a tuple or unit."""
        self.skip()
        if self.s.startswith(")", self.i):
            self.i += 1
            if name is None:
                return RonUnit(line=line, column=column)
            return RonStruct(name=name, fields={}, line=line, column=column)
        m = _IDENT.match(self.s, self.i)
        if m is not None and self.peek_colon(m.end()):
            return self.struct_body(name, line, column)
        items: list[RonNode] = []
        while True:
            self.skip()
            if self.s.startswith(")", self.i):
                self.i += 1
                return RonTuple(name=name, items=tuple(items), line=line, column=column)
            items.append(self.value())
            self.skip()
            if self.s.startswith(",", self.i):
                self.i += 1
            elif not self.s.startswith(")", self.i):
                raise self.unexpected("',' or ')'")

    def struct_body(self, name: str | None, line: int, column: int) -> RonStruct:
        fields: dict[str, RonField] = {}
        while True:
            self.skip()
            if self.s.startswith(")", self.i):
                self.i += 1
                return RonStruct(name=name, fields=fields, line=line, column=column)
            m = _IDENT.match(self.s, self.i)
            if m is None:
                raise self.unexpected("a field name or ')'")
            key = m.group()
            key_line, key_column = self.where(self.i)
            if key in fields:
                raise self.error(f"duplicate field {key!r}")
            self.i = m.end()
            self.skip()
            self.expect(":", f"':' after field name {key!r}")
            self.skip()
            value = self.value()
            fields[key] = RonField(key=key, value=value, line=key_line, column=key_column)
            self.skip()
            if self.s.startswith(",", self.i):
                self.i += 1
            elif not self.s.startswith(")", self.i):
                raise self.unexpected("',' or ')'")

    # scalars

    def number(self) -> int | float:
        s, start = self.s, self.i
        i = start
        sign = 1
        if s[i] in "+-":
            sign = -1 if s[i] == "-" else 1
            i += 1
            for word in ("inf", "NaN"):
                if s.startswith(word, i) and not _ident_char_at(s, i + len(word)):
                    self.i = i + len(word)
                    return sign * float(word)
        radix = _RADIX.get(s[i : i + 2])
        if radix is not None:
            base, digits_re = radix
            m = digits_re.match(s, i + 2)
            if m is None or not m.group().strip("_"):
                raise self.error("invalid number: no digits after the radix prefix", start)
            digits, end = m.group().replace("_", ""), m.end()
            self.check_number_end(end, start)
            self.i = end
            return sign * int(digits, base)
        m = _DECIMAL.match(s, i)
        if m is None:
            raise self.error("invalid number", start)
        text = m.group().replace("_", "")
        self.check_number_end(m.end(), start)
        mantissa = re.split("[eE]", text)[0]
        if not any(ch.isdigit() for ch in mantissa) or text[-1] in "eE+-":
            raise self.error("invalid number", start)
        self.i = m.end()
        if any(ch in text for ch in ".eE"):
            return sign * float(text)
        try:
            return sign * int(text)
        except ValueError:
            raise self.error("integer literal too long", start) from None

    def check_number_end(self, end: int, start: int) -> None:
        if end < self.n and (_ident_char_at(self.s, end) or self.s[end] == "."):
            raise self.error("invalid number", start)

    def string(self) -> str:
        s, start = self.s, self.i
        i = start + 1
        parts: list[str] = []
        while True:
            m = _PLAIN_CHUNK.match(s, i)
            if m is not None:
                parts.append(m.group())
                i = m.end()
            if i >= self.n:
                raise self.error("unterminated string", start)
            if s[i] == '"':
                self.i = i + 1
                return "".join(parts)
            text, i = self.escape(i)
            parts.append(text)

    def escape(self, i: int) -> tuple[str, int]:
        """Decode the escape at ``s[i] == '\\'``; returns (text, next offset)."""
        s = self.s
        if i + 1 >= self.n:
            raise self.error("unterminated escape", i)
        c = s[i + 1]
        simple = _SIMPLE_ESCAPES.get(c)
        if simple is not None:
            return simple, i + 2
        if c == "\n" or (c == "\r" and s.startswith("\n", i + 2)):
            return "", _WS.match(s, i + 1).end()  # type: ignore[union-attr]
        if c == "x":
            digits = s[i + 2 : i + 4]
            if len(digits) != 2 or not _HEX.fullmatch(digits):
                raise self.error("\\x escape needs two hex digits", i)
            return chr(int(digits, 16)), i + 4
        if c == "u":
            if s.startswith("{", i + 2):
                close = s.find("}", i + 3)
                digits = s[i + 3 : close] if close >= 0 else ""
                end = close + 1
            else:
                digits = s[i + 2 : i + 6]
                end = i + 6
            if not (1 <= len(digits) <= 6 and _HEX.fullmatch(digits)):
                raise self.error("\\u escape needs \\u{1-6 hex digits} or four hex digits", i)
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise self.error("\\u escape beyond U+10FFFF", i)
            return chr(code), end
        raise self.error(f"invalid escape \\{c}", i)

    def raw_string(self) -> str:
        s, start = self.s, self.i
        i = start + 1
        hashes = 0
        while i < self.n and s[i] == "#":
            hashes += 1
            i += 1
        if not s.startswith('"', i):
            raise self.error("raw string needs '\"' after r and its #s", start)
        closing = '"' + "#" * hashes
        end = s.find(closing, i + 1)
        if end < 0:
            raise self.error("unterminated raw string", start)
        self.i = end + len(closing)
        return s[i + 1 : end]

    def char(self) -> str:
        s, start = self.s, self.i
        i = start + 1
        if i >= self.n or s[i] in "'\n":
            raise self.error("empty or unterminated char literal", start)
        if s[i] == "\\":
            text, i = self.escape(i)
        else:
            text, i = s[i], i + 1
        if not s.startswith("'", i):
            raise self.error("char literal must hold exactly one character", start)
        self.i = i + 1
        return text


def _ident_char_at(s: str, i: int) -> bool:
    return i < len(s) and (s[i].isalnum() or s[i] == "_")


def parse(text: str, *, file: str = "<config>") -> RonNode:
    """Parse one RON document; raises ConfigError with file:line:column on bad syntax."""
    return _Reader(text, file).document()


def to_python(node: RonNode) -> Any:
    """Plain Python value of a node: structs and maps become dicts, lists and tuples
    lists, ``Some(x)`` is ``x``, ``None`` and ``()`` are None, enum variants their name."""
    if isinstance(node, RonStr | RonNumber | RonBool):
        return node.value
    if isinstance(node, RonStruct):
        return {k: to_python(f.value) for k, f in node.fields.items()}
    if isinstance(node, RonMap):
        return {e.key.value: to_python(e.value) for e in node.entries}
    if isinstance(node, RonList | RonTuple):
        return [to_python(item) for item in node.items]
    if isinstance(node, RonSome):
        return to_python(node.value)
    if isinstance(node, RonIdent):
        return node.name
    return None  # RonNone, RonUnit
