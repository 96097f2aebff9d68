"""The control socket's wire protocol (DESIGN §5), shared by the daemon and `empathctl`.

Theory of operation
-------------------
A Unix stream socket carrying newline-delimited JSON, one object per line, many
requests per connection, one request in flight at a time (the client waits for
the last reply frame before it sends the next request).

Request::

    {"v": 1, "id": 7, "cmd": "queue.list", "args": {"status": "retry"}, "token": "..."}

``token`` only when ``control_auth`` is on.  Reply (one frame)::

    {"v": 1, "id": 7, "ok": true, "data": {...}}
    {"v": 1, "id": 7, "ok": false, "error": {"code": "not_found", "message": "..."}}

A *streamed* reply (``queue.list``) is any number of ``{"v":1,"id":7,"ok":true,
"more":true,"items":[...]}`` frames followed by one frame without ``more`` that
carries ``data`` (the total).  Neither side ever holds the whole list: the daemon
renders a bounded chunk, waits until the socket drains, renders the next; the
client prints each chunk as it arrives.

Every frame carries the protocol version ``v``.  A request with another version
gets a ``version`` error naming the one spoken here.  A request line longer than
:data:`MAX_REQUEST_BYTES` gets a ``too_large`` error and the connection is closed
(the rest of that line cannot be framed); any other malformed line gets a
``bad_request`` error and the connection stays usable.

`empathctl` does not import this module (``enum`` and ``json`` cost it start-up time):
it uses :mod:`empath.control.wire`, which holds the constants and the request encoder
re-exported here.  The daemon decodes requests here and encodes its replies with orjson
in ``server``.
"""

from __future__ import annotations

import enum
import json
from collections import namedtuple

from empath.control.wire import (
    AUTH_ERROR,
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    SOCKET_ENV_VAR,
    TOKEN_ENV_VAR,
    encode_request,
)
from empath.errors import EmpathError

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)

if TYPE_CHECKING:
    from typing import Any, NamedTuple

__all__ = [
    "MAX_REQUEST_BYTES",
    "PROTOCOL_VERSION",
    "SOCKET_ENV_VAR",
    "TOKEN_ENV_VAR",
    "ErrorCode",
    "Request",
    "RequestError",
    "encode_request",
    "parse_request",
]


class ErrorCode(enum.StrEnum):
    """Why a request failed; the CLI maps these to exit codes."""

    BAD_REQUEST = "bad_request"  # not JSON, not an object, missing/ill-typed fields
    TOO_LARGE = "too_large"  # request line over MAX_REQUEST_BYTES (connection closed)
    VERSION = "version"  # unsupported protocol version
    UNKNOWN_COMMAND = "unknown_command"
    AUTH = AUTH_ERROR  # token missing or wrong
    NOT_FOUND = "not_found"  # unknown message id
    FAILED = "failed"  # the command ran and failed (refused, DNS error, bad config)
    TIMEOUT = "timeout"  # the command exceeded the per-request time limit
    BUSY = "busy"  # too many control connections
    INTERNAL = "internal"  # a bug: logged by the daemon


if TYPE_CHECKING:

    class Request(NamedTuple):
        """A validated request line."""

        id: int | str | None
        cmd: str
        args: dict[str, Any]
        token: str | None

else:
    Request = namedtuple("Request", "id cmd args token")


class RequestError(EmpathError):
    """A request line that cannot be served; ``code`` says why."""

    def __init__(self, code: ErrorCode, message: str, request_id: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def parse_request(line: bytes) -> Request:
    """Decode and validate one request line (without its newline)."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, deep nesting
        raise RequestError(ErrorCode.BAD_REQUEST, f"not a JSON object: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError(ErrorCode.BAD_REQUEST, "a request is a JSON object")
    rid = obj.get("id")
    if not isinstance(rid, int | str) or isinstance(rid, bool):
        rid = None
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise RequestError(
            ErrorCode.VERSION,
            f"unsupported protocol version {version!r}; this daemon speaks {PROTOCOL_VERSION}",
            rid,
        )
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise RequestError(ErrorCode.BAD_REQUEST, "'cmd' must be a non-empty string", rid)
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise RequestError(ErrorCode.BAD_REQUEST, "'args' must be an object", rid)
    token = obj.get("token")
    if token is not None and not isinstance(token, str):
        raise RequestError(ErrorCode.BAD_REQUEST, "'token' must be a string", rid)
    return Request(rid, cmd, args, token)
