"""Finding, reading, checking and printing the configuration.

Theory of operation
-------------------
1. :func:`discover_config_path` picks the file (DESIGN §1): ``--config``, else
   ``$EMPATH_CONFIG``, else ``./empath.config.ron``, else
   ``/etc/empath/empath.config.ron``. An explicitly named file that is missing is
   an error; it never falls through to the next candidate.
2. :func:`load_config` reads it as UTF-8 and hands it to :func:`loads_config`,
   which parses it with ``empath.config.ron`` into positioned nodes and *binds*
   them onto the dataclasses of ``empath.config.model``.
3. Binding is generic: :class:`_Binder` walks a dataclass's fields and type hints
   and recurses. Structs may be written as RON structs or as maps with string
   keys; options accept ``None``, ``Some(x)`` or a bare ``x``; integers are
   accepted for floats, never the reverse. Unknown keys, missing required keys,
   wrong types and values failing a field's ``check`` raise ConfigError naming
   ``file:line:column`` and the key path
   (``delivery.domains."gmail.com".rate_limit: expected an integer``).
4. :func:`render_config` prints the effective configuration (defaults filled in)
   as RON that loads back to an equal :class:`~empath.config.model.Config`;
   ``empath --check-config`` prints it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, get_args, get_origin, get_type_hints

from empath.config.checks import Check, CrossChecked, normalise_domain
from empath.config.model import Config
from empath.config.ron import (
    MapValue,
    RonBool,
    RonIdent,
    RonList,
    RonMap,
    RonNode,
    RonNone,
    RonNumber,
    RonSome,
    RonStr,
    RonStruct,
    RonTuple,
    RonUnit,
    dumps,
    is_identifier,
    parse,
)
from empath.errors import ConfigError
from empath.textsafe import redact_url

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_LOCATIONS",
    "bind",
    "config_to_plain",
    "discover_config_path",
    "format_key_path",
    "load_config",
    "loads_config",
    "render_config",
]

CONFIG_ENV_VAR: Final = "EMPATH_CONFIG"
DEFAULT_CONFIG_LOCATIONS: Final = (
    Path("empath.config.ron"),
    Path("/etc/empath/empath.config.ron"),
)

PathSegment = str | int


# --- discovery and loading ---------------------------------------------------


def discover_config_path(
    cli_path: str | None = None,
    env: Mapping[str, str] = os.environ,
    *,
    candidates: Sequence[Path] = DEFAULT_CONFIG_LOCATIONS,
) -> Path:
    """The config file to use: ``--config``, ``$EMPATH_CONFIG``, then the first of
    ``candidates`` (./empath.config.ron, /etc/empath/empath.config.ron) that exists."""
    if cli_path:
        return _must_exist(Path(cli_path), "--config")
    env_path = env.get(CONFIG_ENV_VAR)
    if env_path:
        return _must_exist(Path(env_path), f"${CONFIG_ENV_VAR}")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(
        [
            "--config (not given)",
            f"${CONFIG_ENV_VAR} (not set)",
            *(f"./{p}" if not p.is_absolute() else str(p) for p in candidates),
        ]
    )
    raise ConfigError(f"no configuration file found; tried {tried}", file="empath.config.ron")


def _must_exist(path: Path, source: str) -> Path:
    if not path.is_file():
        reason = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"config file named by {source} {reason}", file=str(path))
    return path


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and check a config file; the result records ``source_path``."""
    name = os.fspath(path)
    config = loads_config(read_text(name), file=name)
    return dataclasses.replace(config, source_path=os.path.abspath(name))


def read_text(name: str, what: str = "config file") -> str:
    """A RON file's text; ConfigError naming the file (and line:column of bad UTF-8)."""
    try:
        data = Path(name).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror or exc}", file=name) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8", "replace")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        raise ConfigError("not valid UTF-8", file=name, line=line, column=column) from None


def loads_config(text: str, *, file: str = "<config>") -> Config:
    """Parse and check config text; ``file`` is the name used in error messages."""
    return bind(parse(text, file=file), Config, file=file)


T = typing.TypeVar("T")


def bind(node: RonNode, schema: type[T], *, file: str = "<config>") -> T:
    """Bind a parsed RON tree onto a schema dataclass (raising ConfigError)."""
    result: T = _Binder(file).value(node, schema, [])
    return result


# --- key paths ---------------------------------------------------------------


def format_key_path(path: list[PathSegment] | tuple[PathSegment, ...]) -> str:
    """``["delivery", "domains", "gmail.com", "rate_limit"]`` →
    ``delivery.domains."gmail.com".rate_limit``; list indices as ``[0]``."""
    out: list[str] = []
    for segment in path:
        if isinstance(segment, int):
            out.append(f"[{segment}]")
            continue
        text = segment if is_identifier(segment) else dumps(segment).strip()
        out.append(f".{text}" if out else text)
    return "".join(out)


# --- binder ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _FieldSpec:
    name: str
    type: Any
    required: bool
    check: Check | None
    check_each: Check | None
    lower_keys: bool


@dataclasses.dataclass(frozen=True, slots=True)
class _Schema:
    fields: dict[str, _FieldSpec]
    by_key: dict[str, str]  # written key (name or alias) -> field name


@functools.cache
def _schema(cls: type) -> _Schema:
    hints = get_type_hints(cls)
    specs: dict[str, _FieldSpec] = {}
    by_key: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("ron", True):
            continue
        specs[f.name] = _FieldSpec(
            name=f.name,
            type=hints[f.name],
            required=f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            check=meta.get("check"),
            check_each=meta.get("check_each"),
            lower_keys=bool(meta.get("lower_keys", False)),
        )
        by_key[f.name] = f.name
        for alias in meta.get("aliases", ()):
            by_key[alias] = f.name
    return _Schema(specs, by_key)


_TYPE_NAMES: Final = {
    bool: "a boolean (true or false)",
    int: "an integer",
    float: "a number",
    str: "a string",
}
_UNION_TYPES: Final = (typing.Union, types.UnionType)


class _Binder:
    __slots__ = ("file",)

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, where: RonNode, path: list[PathSegment], message: str) -> ConfigError:
        return ConfigError(
            message,
            file=self.file,
            line=where.line,
            column=where.column,
            path=format_key_path(path),
        )

    def value(
        self,
        node: RonNode,
        tp: Any,
        path: list[PathSegment],
        *,
        each: Check | None = None,
        lower_keys: bool = False,
    ) -> Any:
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.struct(node, tp, path)
        if tp is Any:
            return self.plain(node, path)
        origin = get_origin(tp)
        args = get_args(tp)
        if origin in _UNION_TYPES:
            inner = [a for a in args if a is not type(None)]
            if len(inner) != 1 or len(args) != 2:
                raise TypeError(f"schema type {tp!r}: only `X | None` unions are supported")
            if isinstance(node, RonNone):
                return None
            if isinstance(node, RonSome):
                node = node.value
            return self.value(node, inner[0], path, each=each, lower_keys=lower_keys)
        if origin is Literal:
            word = node.value if isinstance(node, RonStr) else None
            word = node.name if isinstance(node, RonIdent) else word
            if word not in args:
                choices = ", ".join(dumps(a).strip() for a in args)
                raise self.fail(node, path, f"expected one of {choices}")
            return word
        if origin is tuple:
            return self.sequence(node, args[0], path, each)
        if origin in (Mapping, dict):
            return self.mapping(node, args[1], path, each, lower_keys)
        return self.scalar(node, tp, path)

    def plain(self, node: RonNode, path: list[PathSegment]) -> Any:
        """A free-form value (a module's ``arguments``): maps → dict, lists → list,
        scalars as they are, ``None`` → None; nothing is checked but the syntax."""
        if isinstance(node, RonStr | RonNumber | RonBool):
            return node.value
        if isinstance(node, RonNone):
            return None
        if isinstance(node, RonSome):
            return self.plain(node.value, path)
        if isinstance(node, RonIdent):
            return node.name
        if isinstance(node, RonList) or (isinstance(node, RonTuple) and node.name is None):
            return [self.plain(item, [*path, i]) for i, item in enumerate(node.items)]
        if isinstance(node, RonMap):
            out: dict[str, Any] = {}
            for entry in node.entries:
                if not isinstance(entry.key, RonStr):
                    raise self.fail(entry, path, "map keys must be strings")
                out[entry.key.value] = self.plain(entry.value, [*path, entry.key.value])
            return out
        if isinstance(node, RonStruct) and node.name is None:
            return {k: self.plain(f.value, [*path, k]) for k, f in node.fields.items()}
        if isinstance(node, RonUnit):
            return {}
        raise self.fail(node, path, "expected a map, a list or a plain value")

    def scalar(self, node: RonNode, tp: Any, path: list[PathSegment]) -> Any:
        if tp is bool and isinstance(node, RonBool):
            return node.value
        if tp is str and isinstance(node, RonStr):
            return node.value
        if isinstance(node, RonNumber):
            if tp is int and isinstance(node.value, int):
                return node.value
            if tp is float:
                return float(node.value)
        if tp not in _TYPE_NAMES:
            raise TypeError(f"unsupported schema type {tp!r}")
        raise self.fail(node, path, f"expected {_TYPE_NAMES[tp]}")

    def sequence(
        self, node: RonNode, item_type: Any, path: list[PathSegment], each: Check | None
    ) -> tuple[Any, ...]:
        if not isinstance(node, RonList) and not (isinstance(node, RonTuple) and node.name is None):
            raise self.fail(node, path, "expected a list [ ... ]")
        items = []
        for index, item in enumerate(node.items):
            item_path = [*path, index]
            value = self.value(item, item_type, item_path)
            self.run_check(each, value, item, item_path)
            items.append(value)
        return tuple(items)

    def mapping(
        self,
        node: RonNode,
        value_type: Any,
        path: list[PathSegment],
        each: Check | None,
        lower_keys: bool,
    ) -> dict[str, Any]:
        entries: list[tuple[str, RonNode, RonNode]] = []
        if isinstance(node, RonMap):
            for entry in node.entries:
                if not isinstance(entry.key, RonStr):
                    raise self.fail(entry, path, "map keys must be strings")
                entries.append((entry.key.value, entry.value, entry))
        elif isinstance(node, RonStruct) and node.name is None:
            entries = [(k, f.value, f) for k, f in node.fields.items()]
        elif not isinstance(node, RonUnit):
            raise self.fail(node, path, 'expected a map { "key": value, ... }')
        result: dict[str, Any] = {}
        for key, value_node, key_node in entries:
            name = normalise_domain(key) if lower_keys else key
            if lower_keys and name in result:
                raise self.fail(key_node, [*path, key], "duplicate key (keys are case-insensitive)")
            if lower_keys and not name:
                raise self.fail(key_node, [*path, key], "empty domain name")
            entry_path = [*path, key]
            value = self.value(value_node, value_type, entry_path)
            self.run_check(each, value, value_node, entry_path)
            result[name] = value
        return result

    def struct(self, node: RonNode, cls: type, path: list[PathSegment]) -> Any:
        entries: list[tuple[str, RonNode, RonNode]]
        if isinstance(node, RonStruct):
            entries = [(k, f.value, f) for k, f in node.fields.items()]
        elif isinstance(node, RonMap):
            entries = []
            for entry in node.entries:
                if not isinstance(entry.key, RonStr):
                    raise self.fail(entry, path, "expected a field name (a string key)")
                entries.append((entry.key.value, entry.value, entry))
        elif isinstance(node, RonUnit):
            entries = []
        else:
            raise self.fail(node, path, "expected a struct ( key: value, ... )")
        schema = _schema(cls)
        kwargs: dict[str, Any] = {}
        written_as: dict[str, str] = {}
        value_nodes: dict[str, RonNode] = {}
        for key, value_node, key_node in entries:
            name = schema.by_key.get(key)
            key_path = [*path, key]
            if name is None:
                hint = difflib.get_close_matches(key, list(schema.by_key), n=1)
                if hint:
                    message = f"unknown key (did you mean {hint[0]!r}?)"
                else:
                    message = f"unknown key; known keys: {', '.join(schema.fields)}"
                raise self.fail(key_node, key_path, message)
            if name in kwargs:
                raise self.fail(key_node, key_path, f"also given as {written_as[name]!r}")
            spec = schema.fields[name]
            value = self.value(
                value_node, spec.type, key_path, each=spec.check_each, lower_keys=spec.lower_keys
            )
            self.run_check(spec.check, value, value_node, key_path)
            kwargs[name] = value
            written_as[name] = key
            value_nodes[name] = value_node
        for spec in schema.fields.values():
            if spec.required and spec.name not in kwargs:
                raise self.fail(node, path, f"missing required key {spec.name!r}")
        obj = cls(**kwargs)
        if isinstance(obj, CrossChecked):
            for name, message in obj.consistency_errors():
                raise self.fail(value_nodes.get(name, node), [*path, name], message)
        return obj

    def run_check(
        self, check: Check | None, value: Any, node: RonNode, path: list[PathSegment]
    ) -> None:
        if check is None or value is None:
            return
        message = check(value)
        if message is not None:
            raise self.fail(node, path, message)


# --- rendering ---------------------------------------------------------------


def config_to_plain(value: Any, *, redact: bool = False) -> Any:
    """Dataclasses → dicts (config keys only), mappings → :class:`MapValue`, tuples → lists.

    ``redact``: the password in a ``secret`` field (``cluster.redis_url``,
    ``metrics.endpoint``) is replaced (:func:`~empath.textsafe.redact_url`) - for
    everything printed or logged."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            if not f.metadata.get("ron", True):
                continue
            item = getattr(value, f.name)
            if redact and f.metadata.get("secret") and isinstance(item, str):
                out[f.name] = redact_url(item)
            else:
                out[f.name] = config_to_plain(item, redact=redact)
        return out
    if isinstance(value, Mapping):
        return MapValue({k: config_to_plain(v, redact=redact) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return [config_to_plain(v, redact=redact) for v in value]
    return value


def render_config(config: Config) -> str:
    """The effective configuration as RON (loads back to an equal Config, except that
    passwords in URLs read ``REDACTED``: `empath --check-config` output lands in
    journald as the unit's ExecStartPre)."""
    header = "// Effective Empath configuration (defaults filled in)\n"
    if config.source_path:
        header += "// read from " + config.source_path.replace("\n", "\\n") + "\n"
    return header + dumps(config_to_plain(config, redact=True), name="Empath")
