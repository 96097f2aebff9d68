"""The daemon's control socket server (DESIGN §5).

Theory of operation
-------------------
* **Binding.**  The socket is bound under ``umask 0o177`` so it is created mode
  0600 (there is no moment when it is wider), then chmod'ed 0600 for good measure.
  An existing path is probed first: if a daemon answers there, this one refuses to
  start (:class:`ControlSocketInUse`); a socket nobody answers on is stale and
  replaced; anything that is not a socket is left alone and refused.  The umask is
  process-wide, but the window is one ``bind`` on the event-loop thread during
  startup; a file another thread creates meanwhile only ends up narrower.
* **Connections** are served by one task each (asyncio streams): a slow, silent or
  hostile client only ever holds its own task.  Each request line is bounded by
  :data:`~empath.control.protocol.MAX_REQUEST_BYTES`; a line must arrive within
  ``idle_timeout_s``; a unary command must finish within ``request_timeout_s``;
  a reply chunk must drain within ``write_timeout_s`` (a client that stops reading
  is disconnected).  Past ``max_connections`` a new connection gets a ``busy``
  error and is closed.  While ``busy()`` says mail is flowing (SMTP sessions open),
  a streamed reply sleeps between chunks so that it takes at most ``stream_duty`` of
  the loop: a full ``queue list`` of a huge queue slows down, ingest does not.
* **Commands** come from a table of :class:`Command` (name → handler), so a new
  command is one entry (``cluster.status`` later).  A unary handler returns the
  reply's data; a streaming handler is an async iterator of item chunks, each sent
  as its own frame after the previous one drained (an empty chunk is a yield point
  for handlers that scan far between matches).  Handlers raise
  :class:`CommandError` for failures the operator should see.
* **Auth** (``control_auth``): the SHA-256 hex of the request's token is compared
  with every configured hash by ``hmac.compare_digest`` (constant time, no early
  exit on the first match).
* **Audit**: every request that names a command - and every refused one - is an
  INFO line with ``fields.audit=true``, component ``control``, the peer's uid and
  pid (SO_PEERCRED), the command, its arguments and the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from empath.clock import Clock, SystemClock, deadline
from empath.control.protocol import (
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    Request,
    RequestError,
    parse_request,
)
from empath.errors import EmpathError
from empath.logs import get_logger

log = get_logger("control", __name__)

REQUEST_TIMEOUT_S: Final = 30.0
IDLE_TIMEOUT_S: Final = 300.0
WRITE_TIMEOUT_S: Final = 30.0
MAX_CONNECTIONS: Final = 128
CLOSE_WAIT_S: Final = 5.0  # close(): how long cancelled connections may take to end
STREAM_DUTY: Final = 0.05  # share of the loop a streamed reply may take while mail flows
WRITE_HIGH_WATER: Final = 256 * 1024
_PEERCRED: Final = struct.Struct("3i")  # struct ucred {pid, uid, gid}


def encode_ok(request_id: int | str | None, data: Any) -> bytes:
    return orjson.dumps({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "data": data}) + b"\n"


def encode_items(request_id: int | str | None, items: list[Any]) -> bytes:
    """One chunk of a streamed reply."""
    return (
        orjson.dumps(
            {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "more": True, "items": items}
        )
        + b"\n"
    )


def encode_error(request_id: int | str | None, code: ErrorCode, message: str) -> bytes:
    return (
        orjson.dumps(
            {
                "v": PROTOCOL_VERSION,
                "id": request_id,
                "ok": False,
                "error": {"code": code.value, "message": message},
            }
        )
        + b"\n"
    )


class ControlSocketInUse(EmpathError):  # noqa: N818 - the name says what the operator sees
    """Another daemon answers on the control socket (or the path is not a socket)."""


class CommandError(EmpathError):
    """A command that ran and failed: the reply is an error with this code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end (SO_PEERCRED)."""

    uid: int | None
    pid: int | None


Args = Mapping[str, Any]
UnaryHandler = Callable[[Args], Awaitable[Any]]
StreamHandler = Callable[[Args], AsyncIterator[list[Any]]]


@dataclass(frozen=True, slots=True)
class Command:
    """One entry of the command table: ``unary`` returns data, ``stream`` yields chunks."""

    name: str
    unary: UnaryHandler | None = None
    stream: StreamHandler | None = None


def token_hash(token: str) -> str:
    """The lowercase hex SHA-256 of a token, as ``control_auth.token_hashes`` holds it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_ok(token: str | None, hashes: Sequence[str]) -> bool:
    """Constant-time check of ``token`` against every configured hash."""
    digest = token_hash(token or "")
    ok = False
    for h in hashes:
        ok |= hmac.compare_digest(digest, h.lower())
    return ok and bool(token)


def _peer_of(sock: Any) -> Peer:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, _gid = _PEERCRED.unpack(raw)
    except (OSError, AttributeError, struct.error):
        return Peer(None, None)
    return Peer(uid, pid)


def peer_allowed(peer: Peer, euid: int | None = None) -> bool:
    """Only root and the daemon's own user may talk to it (SO_PEERCRED): the socket's
    mode 0600 says the same, this holds even if someone widens the mode."""
    if peer.uid is None:  # no SO_PEERCRED on this platform: the file mode decides
        return True
    return peer.uid in (0, os.geteuid() if euid is None else euid)


def _probe(path: str, timeout_s: float = 1.0) -> bool:
    """True when something accepts connections on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(path)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
        return True


def bind_control_socket(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from creation (see module doc).
    A missing parent directory (``/run/empath`` outside the shipped unit) is created
    mode 0755, owned by this user, so no other user can put a socket there."""
    p = Path(path)
    try:
        p.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise ControlSocketInUse(
            f"cannot create the control socket's directory {p.parent}: {exc.strerror or exc}; "
            "set control_socket to a path this user may create (e.g. ./empath.sock), or run "
            "under the shipped systemd unit (RuntimeDirectory=empath makes /run/empath)"
        ) from None
    try:
        st = p.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketInUse(
                f"control socket path {path} exists and is not a socket; "
                "remove it or set control_socket to another path"
            )
        try:
            live = _probe(path)
        except OSError as exc:
            raise ControlSocketInUse(f"cannot probe control socket {path}: {exc}") from None
        if live:
            raise ControlSocketInUse(
                f"another Empath daemon is running with control socket {path}; "
                "stop it first or give this one another control_socket"
            )
        log.warn("Replacing stale control socket", path=path)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class ControlServer:
    """Serves the command table on a Unix socket; see the module docstring."""

    def __init__(
        self,
        path: str,
        commands: Mapping[str, Command],
        *,
        auth_enabled: bool = False,
        token_hashes: Sequence[str] = (),
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        busy: Callable[[], bool] = lambda: False,
        stream_duty: float = STREAM_DUTY,
        clock: Clock | None = None,
    ) -> None:
        self.path = path
        self._clock = clock or SystemClock()
        self.commands = commands
        self.request_timeout_s = request_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.write_timeout_s = write_timeout_s
        self.max_connections = max_connections
        self._busy = busy
        self._stream_duty = stream_duty
        self._auth_enabled = auth_enabled
        self._hashes: tuple[str, ...] = tuple(token_hashes)
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def configure_auth(self, enabled: bool, token_hashes: Sequence[str]) -> None:
        """Apply ``control_auth`` from a reloaded config."""
        self._auth_enabled = enabled
        self._hashes = tuple(token_hashes)

    # -- lifecycle ------------------------------------------------------------

    def bind(self) -> None:
        """Create the socket (refusing if another daemon owns it).  Not serving yet."""
        self._sock = bind_control_socket(self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)

    async def start(self) -> None:
        """Start accepting connections on the bound socket."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        self._server = await asyncio.start_unix_server(
            self._serve, sock=self._sock, limit=MAX_REQUEST_BYTES + 1
        )
        log.info("Control socket listening", path=self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            with contextlib.suppress(TimeoutError):
                async with deadline(self._clock, CLOSE_WAIT_S):
                    await asyncio.wait(self._conns)
        if self._server is None and self._sock is not None:
            self._sock.close()
        self._sock = None
        self._server = None
        self._unlink_if_ours()

    def _unlink_if_ours(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if self._inode == (st.st_dev, st.st_ino):
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    # -- one connection ---------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        # Request-scoped, not supervised: asyncio starts it; close() cancels and awaits it.
        self._conns.add(task)
        peer = _peer_of(writer.get_extra_info("socket"))
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        try:
            if not peer_allowed(peer):
                self._audit(peer, "", {}, "denied", "peer uid not allowed")
                await self._send(
                    writer,
                    encode_error(
                        None,
                        ErrorCode.AUTH,
                        f"uid {peer.uid} may not use this control socket "
                        f"(only root and uid {os.geteuid()}, the daemon's user)",
                    ),
                )
                return
            if len(self._conns) > self.max_connections:
                log.warn("Control connection refused: too many", peer_pid=peer.pid)
                await self._send(writer, encode_error(None, ErrorCode.BUSY, "too many connections"))
                return
            while await self._one_request(reader, writer, peer):
                pass
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("Control connection failed", peer_pid=peer.pid)
        finally:
            self._conns.discard(task)
            transport = writer.transport
            if transport.get_write_buffer_size():
                transport.abort()  # a client that stopped reading gets nothing more
            else:
                writer.close()

    async def _send(self, writer: asyncio.StreamWriter, frame: bytes) -> None:
        writer.write(frame)
        async with deadline(self._clock, self.write_timeout_s):
            await writer.drain()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> bool:
        """Read and answer one request.  False: close the connection."""
        try:
            async with deadline(self._clock, self.idle_timeout_s):
                line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            self._audit(peer, "", {}, "too_large")
            await self._send(
                writer,
                encode_error(
                    None, ErrorCode.TOO_LARGE, f"request longer than {MAX_REQUEST_BYTES} bytes"
                ),
            )
            return False
        if not line:
            return False
        if not line.endswith(b"\n"):
            # EOF in the middle of a line: a truncated request; say so, then close.
            await self._send(writer, encode_error(None, ErrorCode.BAD_REQUEST, "truncated request"))
            return False
        line = line.rstrip(b"\r\n")
        if not line.strip():
            return True  # blank lines are keep-alives
        try:
            req = parse_request(line)
        except RequestError as exc:
            self._audit(peer, "", {}, exc.code.value, exc.message)
            await self._send(writer, encode_error(exc.request_id, exc.code, exc.message))
            return True
        await self._dispatch(req, writer, peer)
        return True

    async def _dispatch(self, req: Request, writer: asyncio.StreamWriter, peer: Peer) -> None:
        if self._auth_enabled and not token_ok(req.token, self._hashes):
            why = "no token given" if not req.token else "wrong token"
            self._audit(peer, req.cmd, req.args, "denied", why)
            await self._send(
                writer,
                encode_error(
                    req.id,
                    ErrorCode.AUTH,
                    f"authentication failed ({why}); pass --token or set $EMPATH_CONTROL_TOKEN",
                ),
            )
            return
        command = self.commands.get(req.cmd)
        if command is None:
            self._audit(peer, req.cmd, req.args, ErrorCode.UNKNOWN_COMMAND.value)
            await self._send(
                writer,
                encode_error(req.id, ErrorCode.UNKNOWN_COMMAND, f"unknown command {req.cmd!r}"),
            )
            return
        try:
            if command.stream is not None:
                count = await self._stream(req, command.stream, writer)
                frame = encode_ok(req.id, {"count": count})
            else:
                assert command.unary is not None
                async with deadline(self._clock, self.request_timeout_s):
                    data = await command.unary(req.args)
                frame = encode_ok(req.id, data)
        except CommandError as exc:
            self._audit(peer, req.cmd, req.args, exc.code.value, exc.message)
            await self._send(writer, encode_error(req.id, exc.code, exc.message))
            return
        except RequestError as exc:
            self._audit(peer, req.cmd, req.args, exc.code.value, exc.message)
            await self._send(writer, encode_error(req.id, exc.code, exc.message))
            return
        except TimeoutError:
            msg = f"the command took longer than {self.request_timeout_s:g}s"
            self._audit(peer, req.cmd, req.args, ErrorCode.TIMEOUT.value, msg)
            await self._send(writer, encode_error(req.id, ErrorCode.TIMEOUT, msg))
            return
        except (ConnectionError, asyncio.CancelledError):
            self._audit(peer, req.cmd, req.args, "disconnected")
            raise
        except Exception as exc:
            log.exception("Control command crashed", command=req.cmd)
            self._audit(peer, req.cmd, req.args, ErrorCode.INTERNAL.value, str(exc))
            await self._send(writer, encode_error(req.id, ErrorCode.INTERNAL, f"internal: {exc}"))
            return
        self._audit(peer, req.cmd, req.args, "ok")
        await self._send(writer, frame)

    async def _stream(
        self, req: Request, handler: StreamHandler, writer: asyncio.StreamWriter
    ) -> int:
        count = 0
        pause = (1.0 - self._stream_duty) / self._stream_duty
        started = time.perf_counter()
        async for chunk in handler(req.args):
            if chunk:
                count += len(chunk)
                writer.write(encode_items(req.id, chunk))
            spent = time.perf_counter() - started
            # Mail first: while SMTP sessions are open, a long stream takes at most
            # stream_duty of the event loop (it sleeps the rest), so ingest keeps going.
            if self._busy():
                await self._clock.sleep(spent * pause)
            else:
                await asyncio.sleep(0)
            async with deadline(self._clock, self.write_timeout_s):
                await writer.drain()
            started = time.perf_counter()
        return count

    @staticmethod
    def _audit(peer: Peer, command: str, args: Args, outcome: str, error: str = "") -> None:
        fields: dict[str, Any] = {
            "peer_uid": peer.uid,
            "peer_pid": peer.pid,
            "command": command,
            "args": dict(args),
            "outcome": outcome,
        }
        if error:
            fields["error"] = error
        log.audit("Control command", **fields)
