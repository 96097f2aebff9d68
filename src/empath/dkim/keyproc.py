"""DKIM private-key operations in a helper process (DESIGN §12).

Why a process: the event loop thread is what limits a relay's throughput on a small
machine, and a thread that makes the key operations still needs the GIL around each
of them - on this 2-vCPU VM every such hand-over cost the loop about as much CPU as an
Ed25519 signature (docs/bench.md, "DKIM signing on a quiet machine").  A child process
has its own interpreter: the loop writes a few bytes per signature into a pipe and
reads the signatures back, and the child uses the other core.

Protocol (pipes; every frame is ``type:u8 length:u32`` then the payload, big-endian):

* parent → child ``K`` key: ``id:u32`` then the private key, PKCS#8 DER (sent once per
  key and child, before the first request that uses it);
* parent → child ``S`` sign: ``request:u64 n:u32`` then ``n`` times ``key:u32 digest:32``;
* child → parent ``R`` result: ``request:u64 n:u32`` then ``n`` times ``length:u16 sig``;
* child → parent ``E`` error: ``request:u64`` then a UTF-8 message.

The child reads whatever the pipe holds, answers every complete request in one
write, and exits at end of input (the daemon closed the pipe or died); it ignores
SIGINT/SIGTERM/SIGHUP, so that a signal to the whole process group during a graceful
stop does not fail the messages being signed.  If the child dies, every request in
flight fails (the session answers ``451 4.3.0``) and the next one starts a new child.

The parent side, :class:`KeyProcess`, runs on the event loop: ``add_reader`` on the
child's stdout, non-blocking writes to its stdin (the rest queued behind
``add_writer`` if the pipe is full).  ``python -m empath.dkim.keyproc`` is the child.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Sequence
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from empath.dkim.keys import PrivateKey
from empath.dkim.sign import Unsigned
from empath.logs import get_logger

log = get_logger("smtp", __name__)

_HEAD: Final = struct.Struct("!BI")
_REQ: Final = struct.Struct("!QI")
_ITEM: Final = struct.Struct("!I32s")
_KEY_ID: Final = struct.Struct("!I")
_SIG_LEN: Final = struct.Struct("!H")
_ERR_ID: Final = struct.Struct("!Q")
K, S, R, E = b"K"[0], b"S"[0], b"R"[0], b"E"[0]
READ_SIZE: Final = 1 << 16


class KeyProcessError(Exception):
    """The key process died or answered an error; the message is refused (451)."""


class KeyProcess:
    """The parent's end (module doc): ``sign`` returns a future of the raw signatures."""

    def __init__(self, argv: Sequence[str] | None = None) -> None:
        self._argv = list(argv or (sys.executable, "-m", "empath.dkim.keyproc"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rfd = self._wfd = -1
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._writing = False  # add_writer is on: the pipe was full
        self._pending: dict[int, asyncio.Future[list[bytes]]] = {}
        self._next = 0
        # id(key) -> (key, its number in this child); the key is kept so the id is not reused
        self._keys: dict[int, tuple[PrivateKey, int]] = {}
        self._closed = False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def sign(self, pending: Sequence[Unsigned]) -> asyncio.Future[list[bytes]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[bytes]] = loop.create_future()
        if self._closed:
            fut.set_exception(KeyProcessError("the DKIM key process is closed"))
            return fut
        if self._proc is None or self._loop is not loop:
            self._stop("restarted")
            self._start(loop)
        out = bytearray()
        items = bytearray()
        for u in pending:
            items += _ITEM.pack(self._key_number(u.spec.key, out), u.digest)
        self._next += 1
        rid = self._next
        payload = _REQ.pack(rid, len(pending)) + items
        out += _HEAD.pack(S, len(payload)) + payload
        self._pending[rid] = fut
        self._send(out)
        return fut

    def close(self) -> None:
        """Stop the child (end of its input; killed if it does not exit promptly)."""
        self._closed = True
        self._stop("closed")

    # -- internals -------------------------------------------------------------------

    def _key_number(self, key: PrivateKey, out: bytearray) -> int:
        known = self._keys.get(id(key))
        if known is not None:
            return known[1]
        number = len(self._keys) + 1
        self._keys[id(key)] = (key, number)
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        payload = _KEY_ID.pack(number) + der
        out += _HEAD.pack(K, len(payload)) + payload
        return number

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                close_fds=True)  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        self._proc, self._loop = proc, loop
        self._wfd, self._rfd = proc.stdin.fileno(), proc.stdout.fileno()
        os.set_blocking(self._wfd, False)
        os.set_blocking(self._rfd, False)
        self._keys = {}
        self._inbuf.clear()
        self._outbuf.clear()
        self._writing = False
        loop.add_reader(self._rfd, self._readable)
        log.info("DKIM key process started", pid=proc.pid)

    def _stop(self, why: str) -> None:
        """Forget the child: fail what is in flight, close the pipes, reap it."""
        proc, loop = self._proc, self._loop
        if proc is None:
            return
        self._proc = None
        self._writing = False
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._rfd)
            loop.remove_writer(self._wfd)
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done() and not fut.get_loop().is_closed():
                fut.set_exception(KeyProcessError(f"DKIM key process {why}"))
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        try:
            proc.wait(timeout=2.0)  # end of input: it exits at once
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _died(self, why: str) -> None:
        proc = self._proc
        log.error("DKIM key process failed; messages in flight refused", error=why,
                  pid=None if proc is None else proc.pid)  # fmt: skip
        if proc is not None and proc.poll() is None:
            proc.kill()
        self._stop(why)

    def _send(self, data: bytes | bytearray) -> None:
        """Queue ``data``; written once per event-loop turn (requests of the messages
        finishing in the same turn go in one write, and come back in one read)."""
        out = self._outbuf
        if not out and self._loop is not None:
            self._loop.call_soon(self._flush, self._proc)
        out += data

    def _flush(self, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not self._proc or self._writing:
            return  # another child by now; or the rest waits for writability
        self._writable()
        if self._outbuf and proc is self._proc and self._loop is not None:
            self._writing = True
            self._loop.add_writer(self._wfd, self._writable)

    def _writable(self) -> None:
        try:
            n = os.write(self._wfd, self._outbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._died(f"write: {exc}")
            return
        del self._outbuf[:n]
        if not self._outbuf and self._writing and self._loop is not None:
            self._writing = False
            self._loop.remove_writer(self._wfd)

    def _readable(self) -> None:
        try:
            data = os.read(self._rfd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._died(f"read: {exc}")
            return
        if not data:
            code = None if self._proc is None else self._proc.poll()
            self._died(f"exited (status {code})")
            return
        buf = self._inbuf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= _HEAD.size:
            kind, length = _HEAD.unpack_from(buf, pos)
            if end - pos - _HEAD.size < length:
                break
            body = pos + _HEAD.size
            self._answer(kind, bytes(buf[body : body + length]))
            pos = body + length
        del buf[:pos]

    def _answer(self, kind: int, payload: bytes) -> None:
        if kind == R:
            rid, n = _REQ.unpack_from(payload, 0)
            sigs: list[bytes] = []
            pos = _REQ.size
            for _ in range(n):
                (length,) = _SIG_LEN.unpack_from(payload, pos)
                pos += _SIG_LEN.size
                sigs.append(payload[pos : pos + length])
                pos += length
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(sigs)
        elif kind == E:
            (rid,) = _ERR_ID.unpack_from(payload, 0)
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                text = payload[_ERR_ID.size :].decode("utf-8", "replace")
                fut.set_exception(KeyProcessError(text))


# --- the child ----------------------------------------------------------------------

_PADDING: Final = padding.PKCS1v15()
_PREHASHED: Final = Prehashed(hashes.SHA256())


def serve(rfd: int, wfd: int) -> None:
    """The child's loop (module doc); returns at end of input."""
    keys: dict[int, PrivateKey] = {}
    buf = bytearray()
    while True:
        data = os.read(rfd, READ_SIZE)
        if not data:
            return
        buf += data
        out = bytearray()
        pos = 0
        end = len(buf)
        while end - pos >= _HEAD.size:
            kind, length = _HEAD.unpack_from(buf, pos)
            if end - pos - _HEAD.size < length:
                break
            body = bytes(buf[pos + _HEAD.size : pos + _HEAD.size + length])
            pos += _HEAD.size + length
            if kind == K:
                (number,) = _KEY_ID.unpack_from(body, 0)
                key = serialization.load_der_private_key(body[_KEY_ID.size :], None)
                if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
                    raise SystemExit(f"keyproc: key {number} is neither RSA nor Ed25519")
                keys[number] = key
            elif kind == S:
                out += _signed(keys, body)
            else:
                raise SystemExit(f"keyproc: unknown frame type {kind}")
        del buf[:pos]
        view = memoryview(out)
        while view:
            view = view[os.write(wfd, view) :]


def _signed(keys: dict[int, PrivateKey], body: bytes) -> bytes:
    rid, n = _REQ.unpack_from(body, 0)
    try:
        parts = [_REQ.pack(rid, n)]
        pos = _REQ.size
        for _ in range(n):
            number, digest = _ITEM.unpack_from(body, pos)
            pos += _ITEM.size
            key = keys[number]
            if isinstance(key, ed25519.Ed25519PrivateKey):
                sig = key.sign(digest)
            else:
                sig = key.sign(digest, _PADDING, _PREHASHED)
            parts.append(_SIG_LEN.pack(len(sig)) + sig)
        payload = b"".join(parts)
        return _HEAD.pack(R, len(payload)) + payload
    except Exception as exc:  # a bad key or digest: this request fails, the child goes on
        message = _ERR_ID.pack(rid) + repr(exc).encode("utf-8", "replace")
        return _HEAD.pack(E, len(message)) + message


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    serve(sys.stdin.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    main()
