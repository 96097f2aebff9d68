"""The RON writer: :func:`dumps` turns plain Python values into RON text that
``empath.config.ron.parse`` reads back (see that module for the grammar and the
round-trip contract)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["MapValue", "dumps", "is_identifier"]

_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class MapValue(dict[Any, Any]):
    """A dict :func:`dumps` always writes as a map ``{ "k": v }``, never as a struct."""


def is_identifier(key: object) -> bool:
    """Whether ``key`` can be written bare as a struct field name."""
    return isinstance(key, str) and _IDENT.fullmatch(key) is not None


_WRITE_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_NEEDS_ESCAPE: Final = re.compile(r'["\\\x00-\x1f\x7f-\x9f]|[^\w\s!-~]')
_WIDTH: Final = 88


def _quote(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        ch = m.group()
        known = _WRITE_ESCAPES.get(ch)
        if known is not None:
            return known
        if ch.isprintable():
            return ch
        return f"\\u{{{ord(ch):x}}}"

    return '"' + _NEEDS_ESCAPE.sub(sub, text) + '"'


def _scalar(value: Any) -> str | None:
    if value is None:
        return "None"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _quote(value)
    return None


def _dump(value: Any, level: int, indent: str) -> str:
    text = _scalar(value)
    if text is not None:
        return text
    if isinstance(value, list | tuple):
        items = [_dump(v, level + 1, indent) for v in value]
        return _block("[", "]", items, level, indent)
    if isinstance(value, Mapping):
        if value and not isinstance(value, MapValue) and all(map(is_identifier, value)):
            fields = [f"{k}: {_dump(v, level + 1, indent)}" for k, v in value.items()]
            return _block("(", ")", fields, level, indent)
        entries = []
        for k, v in value.items():
            key = _scalar(k)
            if key is None or k is None:
                raise TypeError(f"cannot write map key {k!r} as RON")
            entries.append(f"{key}: {_dump(v, level + 1, indent)}")
        return _block("{", "}", entries, level, indent)
    raise TypeError(f"cannot write {type(value).__name__} as RON")


def _block(open_: str, close: str, items: list[str], level: int, indent: str) -> str:
    if not items:
        return open_ + close
    flat = open_ + ", ".join(items) + close
    if "\n" not in flat and len(flat) + len(indent) * level <= _WIDTH:
        return flat
    inner = indent * (level + 1)
    body = "".join(f"{inner}{item},\n" for item in items)
    return f"{open_}\n{body}{indent * level}{close}"


def dumps(value: Any, *, name: str | None = None, indent: str = "    ") -> str:
    """RON text for a plain Python value (dict, list, tuple, str, int, float, bool, None).

    ``name`` prefixes the top-level struct (``Empath ( ... )``); short containers
    are written on one line, longer ones one item per line with trailing commas.
    """
    text = _dump(value, 0, indent)
    if name is not None:
        if not text.startswith("("):
            raise TypeError("only a struct (a dict with identifier keys) can be named")
        text = f"{name} {text}"
    return text + "\n"
