"""DKIM signatures made in a helper process (DESIGN §12).

Why a process: the event loop thread is what limits a relay's throughput on a small
machine, and a thread that makes the key operations still needs the GIL around each
of them - on this 2-vCPU VM every such hand-over cost the loop about as much CPU as an
Ed25519 signature (docs/bench.md, "DKIM signing on a quiet machine").  A child process
has its own interpreter: the loop writes each message (as received, or as header fields
and body once a step has split it) into a pipe and reads the finished
``DKIM-Signature`` fields back; reading the fields, canonicalisation, hashing
(dkim/sign.py) and the private-key operations all run in the child, on the other core.

Protocol (pipes; every frame is ``type:u8 length:u32`` then the payload, big-endian):

* parent → child ``K`` key: ``id:u32`` then the private key, PKCS#8 DER (sent once per
  key and child, before the first request that uses it);
* parent → child ``P`` what to sign with: ``id:u32 key:u32`` then UTF-8 lines: domain,
  selector, algorithm, canonicalization, the ``h=`` names and the over-signed names
  (each ``:``-joined); sent once per :class:`~empath.dkim.sign.SignSpec` and child;
* parent → child ``M`` sign a message as received: ``request:u64 now:u64 specs:u16
  head:u32``, the spec ids (``u32`` each), then the message's bytes (the rest of the
  frame), whose first ``head`` bytes are a plain header block (dkim/policy.py
  ``scan_raw``) and the body starts ``head + 2`` bytes in (nearly all mail: the event
  loop neither splits the message nor copies its fields one by one);
* parent → child ``S`` sign header fields and body: ``request:u64 now:u64 specs:u16
  fields:u16``, the spec ids (``u32`` each), the header fields' lengths (``u32`` each),
  the fields' bytes, then the body (a message a step has already split or changed);
* child → parent ``R`` result: ``request:u64 n:u32``, ``n`` times ``length:u32``, then
  the ``n`` complete ``DKIM-Signature: ...\r\n`` fields one after the other, in the
  order of the specs (what an ``M`` request prepends, as one piece);
* child → parent ``E`` error: ``request:u64`` then a UTF-8 message.

The child reads whatever the pipe holds and answers each request as soon as it is
signed (a message waits for its own signatures, not for the others read with it); it
exits at end of input (the daemon closed the pipe or died); it ignores
SIGINT/SIGTERM/SIGHUP, so that a signal to the whole process group during a graceful
stop does not fail the messages being signed.  If the child dies, every request in
flight fails (the session answers ``451 4.3.0``) and the next one starts a new child.
A child that answers nothing for ``answer_limit_s`` (30 s) while requests wait is
taken for hung: killed, and the same happens (the acceptance step relies on that:
nothing else times its wait out).

The parent side, :class:`KeyProcess`, runs on the event loop: ``add_reader`` on the
child's stdout, non-blocking writes to its stdin (one write per loop turn for every
request made in it; the rest queued behind ``add_writer`` if the pipe is full).
The child is ``python -c "from empath.dkim.keyproc import main; main()"`` (not ``-m``:
this module is compiled with mypyc, and ``-m`` cannot run an extension module).
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from empath.dkim.keys import PrivateKey
from empath.dkim.sign import SignSpec, plain_fields, sign, sign_fields
from empath.logs import get_logger

log = get_logger("smtp", __name__)

_HEAD: Final = struct.Struct("!BI")
_SIGN: Final = struct.Struct("!QQHH")  # request, now, specs, fields
_RAW: Final = struct.Struct("!QQHI")  # request, now, specs, head
# an M frame's head for one and two specs (frame type, length, _RAW, the spec ids)
_RAW_FRAMES: Final = (struct.Struct("!BIQQHII"), struct.Struct("!BIQQHIII"))
_RESULT: Final = struct.Struct("!QI")  # request, signatures
_ID: Final = struct.Struct("!I")
_SPEC: Final = struct.Struct("!II")  # spec id, key id
_ERR_ID: Final = struct.Struct("!Q")
K, P, S, M, R, E = b"K"[0], b"P"[0], b"S"[0], b"M"[0], b"R"[0], b"E"[0]
READ_SIZE: Final = 1 << 16
ANSWER_LIMIT_S: Final = 30.0
CHILD: Final = "from empath.dkim.keyproc import main; main()"


class KeyProcessError(Exception):
    """The key process died or answered an error; the message is refused (451)."""


class KeyProcess:
    """The parent's end (module doc): ``sign`` returns a future of the raw signatures."""

    def __init__(
        self, argv: Sequence[str] | None = None, answer_limit_s: float = ANSWER_LIMIT_S
    ) -> None:
        self._limit = answer_limit_s
        self._watchdog: asyncio.TimerHandle | None = None
        self._answers = 0  # answers read from the child (the watchdog sees it move)
        self._argv = list(argv or (sys.executable, "-c", CHILD))
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rfd = self._wfd = -1
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._writing = False  # add_writer is on: the pipe was full
        # request -> its future: the fields joined (bytes) for M, a list of them for S
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._listed: set[int] = set()  # the S requests in _pending
        self._next = 0
        # id(key) -> (key, its number in this child); the key is kept so the id is not
        # reused; the same for the specs (the key table's, stable until a reload)
        self._keys: dict[int, tuple[PrivateKey, int]] = {}
        self._specs: dict[int, tuple[SignSpec, int]] = {}
        self._closed = False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def sign(
        self, fields: Sequence[bytes], body: bytes, specs: Sequence[SignSpec], now: int
    ) -> asyncio.Future[list[bytes]]:
        """One ``DKIM-Signature`` field per spec for the message (header ``fields`` as
        they will be spooled, ``body``), made in the child; a future of the fields."""
        fut, out = self._request()
        if out is None:
            return fut
        ids = [self._spec_number(spec, out) for spec in specs]
        rid = self._next
        n, m = len(ids), len(fields)
        size = _SIGN.size + 4 * (n + m) + sum(map(len, fields)) + len(body)
        out += _HEAD.pack(S, size)
        out += _SIGN.pack(rid, now, n, m)
        out += struct.pack(f"!{n}I{m}I", *ids, *map(len, fields))
        for f in fields:
            out += f
        out += body
        self._listed.add(rid)
        return fut

    def sign_raw(
        self, raw: bytes, head: int, specs: Sequence[SignSpec], now: int
    ) -> asyncio.Future[bytes]:
        """The ``DKIM-Signature`` fields, joined, for a message as received (``raw``,
        whose first ``head`` bytes are a plain header block: ``M`` in the module doc)."""
        fut, out = self._request()
        if out is None:
            return fut
        n = len(specs)
        if n == 1:
            first = self._spec_number(specs[0], out)
            frame = _RAW_FRAMES[0].pack(M, _RAW.size + 4 + len(raw), self._next, now, 1,
                                        head, first)  # fmt: skip
        elif n == 2:
            first = self._spec_number(specs[0], out)
            second = self._spec_number(specs[1], out)
            frame = _RAW_FRAMES[1].pack(M, _RAW.size + 8 + len(raw), self._next, now, 2,
                                        head, first, second)  # fmt: skip
        else:
            ids = [self._spec_number(spec, out) for spec in specs]
            frame = _HEAD.pack(M, _RAW.size + 4 * n + len(raw)) + _RAW.pack(
                self._next, now, n, head
            ) + struct.pack(f"!{n}I", *ids)  # fmt: skip
        out += frame
        out += raw
        return fut

    def _request(self) -> tuple[asyncio.Future[Any], bytearray | None]:
        """A new request's future (already failed if closed) and the buffer to frame
        it into; ``self._next`` is its number."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            fut.set_exception(KeyProcessError("the DKIM key process is closed"))
            return fut, None
        if self._proc is None or self._loop is not loop:
            self._stop("restarted")
            self._start(loop)
        out = self._outbuf
        if not out:
            loop.call_soon(self._flush, self._proc)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._limit, self._watch, self._answers)
        self._next += 1
        self._pending[self._next] = fut
        return fut, out

    def close(self) -> None:
        """Stop the child (end of its input; killed if it does not exit promptly)."""
        self._closed = True
        self._stop("closed")

    # -- internals -------------------------------------------------------------------

    def _watch(self, answers: int) -> None:
        """Every ``answer_limit_s`` while requests wait: no answer since the last look
        means a hung child (module doc)."""
        self._watchdog = None
        if not self._pending or self._proc is None or self._loop is None:
            return
        if self._answers == answers:
            self._died(f"no answer in {self._limit:g} s")
            return
        self._watchdog = self._loop.call_later(self._limit, self._watch, self._answers)

    def _spec_number(self, spec: SignSpec, out: bytearray) -> int:
        known = self._specs.get(id(spec))
        if known is not None:
            return known[1]
        key = self._key_number(spec.key, out)
        number = len(self._specs) + 1
        self._specs[id(spec)] = (spec, number)
        text = "\n".join((
            spec.domain, spec.selector, spec.algorithm, spec.canonicalization,
            ":".join(spec.headers), ":".join(sorted(spec.oversign)),
        )).encode("utf-8")  # fmt: skip
        out += _HEAD.pack(P, _SPEC.size + len(text)) + _SPEC.pack(number, key) + text
        return number

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
        out += _HEAD.pack(K, _ID.size + len(der)) + _ID.pack(number) + der
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
        self._specs = {}
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
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if loop is not None and not loop.is_closed():
            _forget(loop, self._rfd, self._wfd)
        pending, self._pending = self._pending, {}
        self._listed = set()
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
            _forget(self._loop, -1, self._wfd)

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
        if buf:  # the rest of a frame read last time
            buf += data
            data = bytes(buf)
            buf.clear()
        pos = 0
        end = len(data)
        while end - pos >= _HEAD.size:
            kind, length = _HEAD.unpack_from(data, pos)
            stop = pos + _HEAD.size + length
            if stop > end:
                break
            self._answer(kind, data, pos + _HEAD.size, stop)
            pos = stop
        if pos < end:
            buf += data[pos:]

    def _answer(self, kind: int, data: bytes, start: int, stop: int) -> None:
        """One frame, ``data[start:stop]``, from the child."""
        self._answers += 1
        if kind == R:
            rid, n = _RESULT.unpack_from(data, start)
            fields = start + _RESULT.size + 4 * n
            fut = self._pending.pop(rid, None)
            if fut is None or fut.done():
                self._listed.discard(rid)
                return
            if rid not in self._listed:
                fut.set_result(data[fields:stop])
                return
            self._listed.discard(rid)
            sigs: list[bytes] = []
            for (length,) in _ID.iter_unpack(data[start + _RESULT.size : fields]):
                sigs.append(data[fields : fields + length])
                fields += length
            fut.set_result(sigs)
        elif kind == E:
            (rid,) = _ERR_ID.unpack_from(data, start)
            self._listed.discard(rid)
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                text = data[start + _ERR_ID.size : stop].decode("utf-8", "replace")
                fut.set_exception(KeyProcessError(text))


def _forget(loop: asyncio.AbstractEventLoop, rfd: int, wfd: int) -> None:
    """Stop watching ``rfd`` for reading and ``wfd`` for writing (-1: not that one).
    Called untyped: uvloop's remove_reader/remove_writer answer None where asyncio's
    stubs promise a bool, and the compiled module checks a call's answer against its
    declared type (a TypeError that left a dead child's requests waiting, and a
    writer that was never removed)."""
    untyped: Any = loop
    if rfd >= 0:
        untyped.remove_reader(rfd)
    if wfd >= 0:
        untyped.remove_writer(wfd)


# --- the child ----------------------------------------------------------------------


def serve(rfd: int, wfd: int) -> None:
    """The child's loop (module doc); returns at end of input."""
    keys: dict[int, PrivateKey] = {}
    specs: dict[int, SignSpec] = {}
    buf = b""
    while True:
        data = os.read(rfd, READ_SIZE)
        if not data:
            return
        buf = buf + data if buf else data
        pos = 0
        end = len(buf)
        while end - pos >= _HEAD.size:
            kind, length = _HEAD.unpack_from(buf, pos)
            start = pos + _HEAD.size
            stop = start + length
            if stop > end:
                break
            pos = stop
            if kind in (M, S):
                answer = _signed(specs, buf, start, stop, kind == M)
                while answer:  # answered at once: the message waits for nothing else
                    answer = answer[os.write(wfd, answer) :]
            elif kind == K:
                (number,) = _ID.unpack_from(buf, start)
                key = serialization.load_der_private_key(buf[start + _ID.size : stop], None)
                if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
                    raise SystemExit(f"keyproc: key {number} is neither RSA nor Ed25519")
                keys[number] = key
            elif kind == P:
                number, key_id = _SPEC.unpack_from(buf, start)
                specs[number] = _spec(buf[start + _SPEC.size : stop], keys[key_id])
            else:
                raise SystemExit(f"keyproc: unknown frame type {kind}")
        buf = buf[pos:] if pos < end else b""


def _spec(text: bytes, key: PrivateKey) -> SignSpec:
    domain, selector, algorithm, canon, headers, oversign = text.decode("utf-8").split("\n")
    if algorithm not in ("rsa-sha256", "ed25519-sha256"):
        raise SystemExit(f"keyproc: unknown algorithm {algorithm!r}")
    return SignSpec(
        domain, selector, algorithm,  # type: ignore[arg-type]
        key, canon, tuple(headers.split(":")) if headers else (),
        frozenset(oversign.split(":")) if oversign else frozenset(),
    )  # fmt: skip


def _signed(specs: dict[int, SignSpec], buf: bytes, start: int, stop: int, raw: bool) -> bytes:
    """The answer frame to the M (``raw``) or S request ``buf[start:stop]``."""
    rid = 0
    try:
        if raw:
            rid, now, n, head = _RAW.unpack_from(buf, start)
            at = start + _RAW.size
            numbers = _IDS[n].unpack_from(buf, at) if n <= 2 else _ids(buf, at, n)
            message = buf[at + 4 * n : stop]
            made = sign_fields(plain_fields(message, head), message[head + 2 :],
                               [specs[i] for i in numbers], now)  # fmt: skip
        else:
            rid, now, n, m = _SIGN.unpack_from(buf, start)
            numbers = struct.unpack_from(f"!{n}I{m}I", buf, start + _SIGN.size)
            pos = start + _SIGN.size + 4 * (n + m)
            fields = []
            for length in numbers[n:]:
                fields.append(buf[pos : pos + length])
                pos += length
            made = sign(fields, buf[pos:stop], [specs[i] for i in numbers[:n]], now)
        n = len(made)
        if n == 2:  # dual signing: one pack for the frame's head
            first, second = made
            size = _RESULT.size + 8 + len(first) + len(second)
            return b"".join((_ANSWER2.pack(R, size, rid, 2, len(first), len(second)),
                             first, second))  # fmt: skip
        lengths = [len(field) for field in made]
        size = _RESULT.size + 4 * n + sum(lengths)
        return b"".join([_HEAD.pack(R, size), _RESULT.pack(rid, n),
                         struct.pack(f"!{n}I", *lengths), *made])  # fmt: skip
    except Exception as exc:  # a bad key or request: this one fails, the child goes on
        message = _ERR_ID.pack(rid) + repr(exc).encode("utf-8", "replace")
        return _HEAD.pack(E, len(message)) + message


_IDS: Final = (struct.Struct("!"), struct.Struct("!I"), struct.Struct("!II"))
_ANSWER2: Final = struct.Struct("!BIQIII")  # an R frame's head with two signatures


def _ids(buf: bytes, at: int, n: int) -> tuple[int, ...]:
    return struct.unpack_from(f"!{n}I", buf, at)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    serve(sys.stdin.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    main()
