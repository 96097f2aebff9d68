"""The client side of the control socket (used by `empathctl`, tests and benches).

Blocking and small on purpose: `empathctl` starts, sends a request or two and
exits, so start-up time is what an operator feels - and, during an incident, CPU the
daemon's machine spends on each view.  This module imports only
:mod:`empath.control.wire` and the C-level ``_socket`` (the ``socket`` module builds
its enums at import, ``makefile`` brings ``io`` buffering this does not need: lines
are split here).  The config loader is imported only when the socket has to be found
through the config file.

Socket discovery (DESIGN §1, §5): ``--socket``, else ``$EMPATH_CONTROL_SOCKET``,
else the ``control_socket`` of the config the daemon would use (``--config``,
``$EMPATH_CONFIG``, ``./empath.config.ron``, ``/etc/empath/empath.config.ron``),
else the default ``/run/empath/empath.sock``.

Before a token (or any request) goes out, the client makes sure it talks to a
socket nobody else could have put there (:func:`check_socket_owner`): the socket
file is owned by root, by the invoking user, or by the owner of its directory when
nobody else may write to that directory (``/run/empath`` of the shipped unit, owned
by the daemon's user) - never a socket another user created in ``/tmp``.  After
connecting, the server's credentials (SO_PEERCRED) must be the socket's owner's (or
root's), so swapping the file between the check and the connect does not help.
"""

from __future__ import annotations

import _socket
import os
import sys

from empath.control.wire import (
    AUTH_ERROR,
    PROTOCOL_VERSION,
    SOCKET_ENV_VAR,
    encode_request,
    loads,
)
from empath.errors import ControlError

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)

if TYPE_CHECKING:  # the CLI path imports neither typing nor collections (start-up time)
    from collections.abc import Iterator, Mapping
    from typing import Any, Final, NamedTuple

CONFIG_CANDIDATES: Final = ("empath.config.ron", "/etc/empath/empath.config.ron")
DEFAULT_SOCKET: Final = "/run/empath/empath.sock"  # config/model.py's default
HOW_TO_SET: Final = (
    f"set it with --socket PATH or ${SOCKET_ENV_VAR}, or control_socket in the config"
)


if TYPE_CHECKING:

    class SocketChoice(NamedTuple):
        path: str
        source: str  # where the path came from, for error messages

else:

    class SocketChoice(tuple):  # namedtuple's shape without importing collections
        __slots__ = ()

        def __new__(cls, path, source):
            return tuple.__new__(cls, (path, source))

        path = property(lambda self: self[0])
        source = property(lambda self: self[1])

        def __repr__(self):
            return f"SocketChoice(path={self[0]!r}, source={self[1]!r})"


class Unreachable(ControlError):  # noqa: N818 - reads as the situation
    """The daemon could not be reached (exit 3)."""

    exit_code = 3


class UntrustedSocket(Unreachable):
    """The socket at the path could have been created by another user (exit 3): the
    client refuses to send it anything, a token least of all."""


class AuthFailed(ControlError):  # noqa: N818
    """The daemon refused the token (exit 4)."""

    exit_code = 4


class CommandFailed(ControlError):  # noqa: N818
    """The daemon ran the command and it failed (exit 1)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def discover_socket(
    cli_socket: str | None, cli_config: str | None, env: Mapping[str, str] = os.environ
) -> SocketChoice:
    """Which control socket to use; raises Unreachable when the config cannot be read."""
    if cli_socket:
        return SocketChoice(cli_socket, "--socket")
    if env.get(SOCKET_ENV_VAR):
        return SocketChoice(env[SOCKET_ENV_VAR], f"${SOCKET_ENV_VAR}")
    path = config_path(cli_config, env)
    if path is None:
        return SocketChoice(DEFAULT_SOCKET, "the default (no config file found)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise Unreachable(f"cannot find the control socket: {exc}; {HOW_TO_SET}") from None
    # Not the schema (empath.config.load): a file broken elsewhere (mid-edit, before
    # `config reload`) still names the socket, and this runs before every command.
    value = scan_control_socket(text)
    if value is _UNSURE:
        from empath.config.ron import parse, to_python
        from empath.errors import ConfigError

        try:
            tree = to_python(parse(text, file=str(path)))
        except ConfigError as exc:
            raise Unreachable(f"cannot find the control socket: {exc}; {HOW_TO_SET}") from None
        value = tree.get("control_socket") if isinstance(tree, dict) else None
    if value is None:
        return SocketChoice(DEFAULT_SOCKET, f"the default (no control_socket in {path})")
    if not isinstance(value, str) or not value:
        raise Unreachable(f"control_socket in {path} is not a path; {HOW_TO_SET}")
    return SocketChoice(value, f"control_socket in {path}")


_UNSURE: Final = object()
_OPEN: Final = frozenset("([{")
_CLOSE: Final = frozenset(")]}")


def scan_control_socket(text: str) -> object:
    """The top-level ``control_socket`` string of a RON config, read without the RON
    module (start-up time): None when the key is absent, :data:`_UNSURE` for anything
    but a plain ``control_socket: "..."`` (the caller then uses the real reader).

    Skips ``//`` and (nested) ``/* */`` comments and strings, and tracks bracket
    depth: only a key at depth 1 (inside the top-level struct) counts.
    """
    i, n, depth = 0, len(text), 0
    while i < n:
        c = text[i]
        if c == "/" and text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif c == "/" and text.startswith("/*", i):
            nest, i = 1, i + 2
            while i < n and nest:
                if text.startswith("/*", i):
                    nest, i = nest + 1, i + 2
                elif text.startswith("*/", i):
                    nest, i = nest - 1, i + 2
                else:
                    i += 1
        elif c == '"':
            end = _string_end(text, i)
            if end < 0:
                return _UNSURE
            key = text[i + 1 : end - 1]
            i = end
            if depth == 1 and key == "control_socket":
                return _value_after(text, i)
        elif c in _OPEN:
            depth += 1
            i += 1
        elif c in _CLOSE:
            depth -= 1
            i += 1
        elif c == "r" and text.startswith(('r"', "r#"), i):
            return _UNSURE  # raw strings: leave them to the real reader
        elif depth == 1 and text.startswith("control_socket", i) and not _word(text, i - 1):
            end = i + len("control_socket")
            if not _word(text, end):
                return _value_after(text, end)
            i = end
        else:
            i += 1
    return None


def _word(text: str, i: int) -> bool:
    return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")


def _string_end(text: str, i: int) -> int:
    """Index just past the string starting at ``text[i] == '"'``; -1 if unterminated."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == '"':
            return j + 1
        else:
            j += 1
    return -1


def _value_after(text: str, i: int) -> object:
    """The plain string after ``: `` at ``i``, else _UNSURE."""
    rest = text[i:].lstrip()
    if not rest.startswith(":"):
        return _UNSURE
    rest = rest[1:].lstrip()
    if not rest.startswith('"'):
        return _UNSURE
    end = _string_end(rest, 0)
    value = rest[1 : end - 1] if end > 0 else ""
    return value if value and "\\" not in value else _UNSURE


def config_path(cli_config: str | None, env: Mapping[str, str]) -> str | None:
    """The daemon's config discovery (``empath.config.load.discover_config_path``, which
    a test keeps equal): ``--config``, ``$EMPATH_CONFIG``, then the first existing of
    ./empath.config.ron and /etc/empath/empath.config.ron; None when none exists.
    Raises Unreachable when an explicitly named file is missing."""
    for named, source in ((cli_config, "--config"), (env.get("EMPATH_CONFIG"), "$EMPATH_CONFIG")):
        if named:
            if not os.path.isfile(named):
                raise Unreachable(f"cannot find the control socket: {source} {named} is not a file")
            return named
    for candidate in CONFIG_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    return None


def check_socket_owner(path: str, euid: int | None = None) -> int | None:
    """The owner uid of the socket at ``path`` when it is safe to talk to (module doc);
    None when nothing is there.  Raises :class:`UntrustedSocket` otherwise."""
    me = os.geteuid() if euid is None else euid
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_uid in (0, me):
        return st.st_uid
    directory = os.path.dirname(os.path.abspath(path))
    try:
        dst = os.stat(directory)
    except OSError:
        dst = None
    if dst is not None and dst.st_uid == st.st_uid and not dst.st_mode & 0o022:
        return st.st_uid  # e.g. /run/empath, the daemon user's own directory
    raise UntrustedSocket(
        f"refusing to send anything to {path}: the socket is owned by uid {st.st_uid}, "
        f"neither root nor you (uid {me}), in {directory}, which "
        + (
            "others may write to"
            if dst is not None and dst.st_mode & 0o022
            else "that user does not own"
        )
        + "; another user may have created it to collect your token. "
        "Use a directory only the daemon's user can write to "
        '(control_socket: "/run/empath/empath.sock", the default) and check who runs the daemon'
    )


def _peer_uid(sock: _socket.socket) -> int | None:
    try:
        raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    except (OSError, AttributeError):
        return None
    return int.from_bytes(raw[4:8], sys.byteorder, signed=True)  # struct ucred {pid, uid, gid}


RECV_BYTES: Final = 256 * 1024


class ControlClient:
    """One connection to the daemon; many requests over it."""

    def __init__(self, choice: SocketChoice, token: str | None = None, timeout_s: float = 60.0):
        self.choice = choice
        self.token = token
        self.timeout_s = timeout_s
        self._sock: _socket.socket | None = None
        self._rest = b""  # received after the last whole line
        self._next_id = 1

    def connect(self) -> None:
        owner = check_socket_owner(self.choice.path)  # None: nothing there (connect says so)
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.choice.path)
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc)
            raise Unreachable(
                f"cannot reach the Empath daemon at {self.choice.path} "
                f"({self.choice.source}): {reason}; is it running? {HOW_TO_SET}"
            ) from None
        server_uid = _peer_uid(sock)
        if owner is not None and server_uid is not None and server_uid not in (0, owner):
            sock.close()
            raise UntrustedSocket(
                f"refusing to talk to {self.choice.path}: the process serving it runs as uid "
                f"{server_uid}, not as the socket's owner (uid {owner}) or root"
            )
        self._sock = sock
        self._rest = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, cmd: str, args: dict[str, Any]) -> int:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        rid = self._next_id
        self._next_id += 1
        try:
            self._sock.sendall(encode_request(rid, cmd, args, self.token))
        except OSError as exc:
            self.close()
            raise Unreachable(f"connection to {self.choice.path} lost: {exc}") from None
        return rid

    def _readline(self) -> bytes:
        """The next line, its newline included; what is left at EOF (b"": closed)."""
        assert self._sock is not None
        rest = self._rest
        end = rest.find(b"\n") + 1
        if end:
            self._rest = rest[end:]
            return rest[:end]
        parts = [rest]
        while True:
            chunk = self._sock.recv(RECV_BYTES)
            end = chunk.find(b"\n") + 1
            if not chunk or end:
                parts.append(chunk[:end] if end else chunk)
                self._rest = chunk[end:] if end else b""
                return b"".join(parts)
            parts.append(chunk)

    def _frame(self) -> dict[str, Any]:
        if self._sock is None:
            raise Unreachable(f"connection to {self.choice.path} lost")
        try:
            line = self._readline()
        except OSError as exc:
            self.close()
            raise Unreachable(f"connection to {self.choice.path} lost: {exc}") from None
        if not line:
            self.close()
            raise Unreachable(f"the daemon at {self.choice.path} closed the connection")
        try:
            frame = loads(line)
        except ValueError:
            frame = None
        if not isinstance(frame, dict) or frame.get("v") != PROTOCOL_VERSION:
            raise ControlError(f"unexpected reply from the daemon: {line[:200]!r}")
        if not frame.get("ok"):
            err = frame.get("error") or {}
            code = str(err.get("code", ""))
            message = str(err.get("message", "unknown error"))
            if code == AUTH_ERROR:
                raise AuthFailed(message)
            raise CommandFailed(code, message)
        return frame

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Send one request and return its reply's data (raises ControlError)."""
        self._send(cmd, args or {})
        frame = self._frame()
        while frame.get("more"):  # a streaming reply to a unary call: drain it
            frame = self._frame()
        return frame.get("data")

    def stream(self, cmd: str, args: dict[str, Any] | None = None) -> Iterator[list[Any]]:
        """Send one request and yield the item chunks of its streamed reply."""
        self._send(cmd, args or {})
        while True:
            frame = self._frame()
            if not frame.get("more"):
                return
            yield frame["items"]
