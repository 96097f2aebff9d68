"""The control protocol's constants and JSON codec, importing nothing (`empathctl` start-up).

The protocol itself is described in :mod:`empath.control.protocol` (DESIGN §5), which
re-exports everything here; `empathctl` imports this module alone.  The stdlib
``json`` package compiles six regular expressions at import and so brings ``re`` and
``enum`` along: most of what a view such as `empathctl queue summary` spends before
it sends a byte.  Its C accelerator ``_json`` - the code ``json.loads`` and
``json.dumps`` run anyway - needs neither.  :func:`loads` and :func:`dumps` call it
directly with ``json``'s default settings (strict strings, ``NaN``/``Infinity`` read
as floats, ASCII output, circular references refused), and fall back to ``json``
where ``_json`` is missing; tests/unit/test_control_wire.py compares them with
``json`` on generated documents.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)

if TYPE_CHECKING:
    from typing import Any, Final

PROTOCOL_VERSION: Final = 1
MAX_REQUEST_BYTES: Final = 64 * 1024
TOKEN_ENV_VAR: Final = "EMPATH_CONTROL_TOKEN"  # noqa: S105 - a variable name
SOCKET_ENV_VAR: Final = "EMPATH_CONTROL_SOCKET"
AUTH_ERROR: Final = "auth"  # ErrorCode.AUTH: the code the client maps to exit 4

_WHITESPACE: Final = " \t\n\r"  # JSON's (RFC 8259 section 2)

try:
    import _json
except ImportError:  # pragma: no cover - CPython always has it
    _json = None  # type: ignore[assignment]


class _DecoderSettings:
    """The attributes ``_json.make_scanner`` reads: ``json.JSONDecoder()``'s."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # "NaN", "Infinity", "-Infinity"


# typeshed types the context as a scanner; the C code reads only the attributes above
_scan: Any = None if _json is None else _json.make_scanner(_DecoderSettings())  # type: ignore[arg-type]


def loads(data: bytes | str) -> Any:
    """One JSON document (UTF-8 when ``data`` is bytes); ValueError when it is not."""
    text = (data.decode("utf-8") if isinstance(data, bytes) else data).strip(_WHITESPACE)
    if _scan is None:  # pragma: no cover
        import json

        return json.loads(text)
    try:
        value, end = _scan(text, 0)
    except StopIteration as exc:
        raise ValueError(f"not JSON: expecting a value at character {exc.value}") from None
    if end != len(text):
        raise ValueError(f"not JSON: extra data at character {end}")
    return value


def _unencodable(obj: object) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: Any) -> str:
    """``json.dumps(obj, separators=(",", ":"))``: compact, ASCII."""
    if _json is None:  # pragma: no cover
        import json

        return json.dumps(obj, separators=(",", ":"))
    # A fresh encoder each time: its circular-reference marks would outlive a failed call.
    encode = _json.make_encoder(
        {}, _unencodable, _json.encode_basestring_ascii, None, ":", ",", False, False, True
    )
    return "".join(encode(obj, 0))


def encode_request(
    request_id: int, cmd: str, args: dict[str, Any], token: str | None = None
) -> bytes:
    obj: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "cmd": cmd, "args": args}
    if token is not None:
        obj["token"] = token
    return dumps(obj).encode() + b"\n"
