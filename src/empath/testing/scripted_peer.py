"""A scripted SMTP server for tests: replies chosen per command and per recipient.

Theory of operation
-------------------
:class:`ScriptedPeer` is a small asyncio SMTP server (streams; speed does not
matter here) whose every reply comes from a :class:`PeerScript`.  A reply is a
string like ``"550 5.1.1 No such user"`` (``\\n`` separates the lines of a
multi-line reply) or a list of such strings, used one after another across the
peer's life (the last one repeats) — e.g. ``"data_end": ["451 4.3.0 later",
"250 2.0.0 ok"]`` answers the first message with 451 and the rest with 250.
Recipients have their own replies (``"rcpt": {"bad@x": "550 5.1.1 ..."}``),
other recipients get ``rcpt_default``.

The peer can withhold extensions (``extensions`` lists what EHLO offers),
refuse EHLO, greet with 4xx/5xx (``greeting``), drop the connection after a
command without answering (``disconnect_after``), delay replies
(``delay_secs``) and offer STARTTLS with a given certificate.

Everything is recorded: sessions (peer address, HELO name, TLS, commands) and
transactions (sender, MAIL parameters, accepted and rejected recipients, the
dot-unstuffed body, the final reply).  In-process tests read
``peer.sessions``/``peer.transactions``; as a subprocess
(``python -m empath.testing.scripted_peer --port N --script s.json --record
r.jsonl``) each event is appended to the record file as one JSON line, which
:func:`read_records` loads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ReplySpec = str | list[str]


@dataclass(slots=True)
class PeerScript:
    """What the peer answers.  ``{host}`` in a reply is replaced by ``hostname``."""

    hostname: str = "peer.test"
    greeting: ReplySpec = "220 {host} ESMTP scripted peer"
    extensions: list[str] = field(
        default_factory=lambda: [
            "PIPELINING",
            "SIZE 52428800",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
    )
    offer_starttls: bool = True  # when a TLS context is configured
    ehlo: ReplySpec | None = None  # None: 250 with the extensions
    helo: ReplySpec = "250 {host}"
    starttls: ReplySpec = "220 2.0.0 Ready to start TLS"
    mail: ReplySpec = "250 2.1.0 Ok"
    rcpt: dict[str, ReplySpec] = field(default_factory=dict)  # lower-cased address → reply
    rcpt_default: ReplySpec = "250 2.1.5 Ok"
    data: ReplySpec = "354 End data with <CR><LF>.<CR><LF>"
    data_end: ReplySpec = "250 2.0.0 Ok: queued"
    rset: ReplySpec = "250 2.0.0 Ok"
    noop: ReplySpec = "250 2.0.0 Ok"
    quit: ReplySpec = "221 2.0.0 Bye"
    disconnect_after: list[str] = field(default_factory=list)  # "connect", "mail", "data_end"...
    delay_secs: dict[str, float] = field(default_factory=dict)  # command → delay before reply

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PeerScript:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown script keys: {sorted(unknown)}")
        script = cls(**data)
        script.rcpt = {k.lower(): v for k, v in script.rcpt.items()}
        return script


@dataclass(slots=True)
class RecordedTransaction:
    session: int
    sender: str
    mail_params: str
    recipients: list[str]  # accepted
    rejected: list[str]
    body: bytes
    reply: str  # the final reply sent
    tls: bool

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["body"] = self.body.decode("utf-8", "surrogateescape")
        return data


@dataclass(slots=True)
class RecordedSession:
    id: int
    peer: str
    helo: str = ""
    tls: bool = False
    commands: list[str] = field(default_factory=list)
    transactions: list[RecordedTransaction] = field(default_factory=list)
    quit: bool = False
    ended: bool = False


class _DropError(Exception):
    """Close the connection without a reply (scripted disconnect)."""


class ScriptedPeer:
    """An in-process scripted SMTP server; ``async with ScriptedPeer(script) as peer``."""

    def __init__(
        self,
        script: PeerScript | dict[str, Any] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        record_path: str | Path | None = None,
    ) -> None:
        if isinstance(script, dict):
            script = PeerScript.from_json(script)
        self.script = script or PeerScript()
        self.host = host
        self._port = port
        self.ssl_context = ssl_context
        self.record_path = Path(record_path) if record_path else None
        self.sessions: list[RecordedSession] = []
        self.active_sessions = 0
        self.max_concurrent_sessions = 0
        self._server: asyncio.Server | None = None
        self._uses: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> ScriptedPeer:
        self._server = await asyncio.start_server(
            self._session, self.host, self._port, limit=1 << 20
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ScriptedPeer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- what tests read --------------------------------------------------------------

    @property
    def transactions(self) -> list[RecordedTransaction]:
        """Every transaction that reached the end of DATA, in order."""
        return [t for s in self.sessions for t in s.transactions]

    @property
    def delivered(self) -> list[RecordedTransaction]:
        """Transactions answered with a 2xx at the end of DATA."""
        return [t for t in self.transactions if t.reply.startswith("2")]

    @property
    def session_count(self) -> int:
        return len(self.sessions)

    # --- the SMTP conversation ------------------------------------------------------------

    def _next(self, key: str, spec: ReplySpec) -> str:
        if isinstance(spec, str):
            return spec
        n = self._uses.get(key, 0)
        self._uses[key] = n + 1
        return spec[min(n, len(spec) - 1)]

    async def _reply(
        self, writer: asyncio.StreamWriter, command: str, text: str, key: str = ""
    ) -> str:
        delay = self.script.delay_secs.get(command)
        if delay:
            await asyncio.sleep(delay)
        if command in self.script.disconnect_after:
            raise _DropError
        text = text.replace("{host}", self.script.hostname)
        lines = text.split("\n")
        code = lines[0][:3]
        out = []
        for i, line in enumerate(lines):
            body = line[4:] if line[:3] == code else line
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{code}{sep}{body}\r\n")
        writer.write("".join(out).encode())
        await writer.drain()
        return text

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peername = writer.get_extra_info("peername")
        sess = RecordedSession(len(self.sessions) + 1, f"{peername[0]}:{peername[1]}")
        self.sessions.append(sess)
        self.active_sessions += 1
        self.max_concurrent_sessions = max(self.max_concurrent_sessions, self.active_sessions)
        self._record({"event": "session", "session": sess.id, "peer": sess.peer})
        try:
            await self._converse(sess, reader, writer)
        except (_DropError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            sess.ended = True
            self.active_sessions -= 1
            self._record({"event": "session_end", "session": sess.id, "quit": sess.quit})
            writer.close()  # flushes what is buffered; not awaited (stop() may cancel us)
            self._tasks.discard(task)

    async def _converse(
        self, sess: RecordedSession, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        script = self.script
        greeting = await self._reply(writer, "connect", self._next("greeting", script.greeting))
        if not greeting.startswith("2"):
            # A refusing server still answers QUIT (RFC 5321 §3.1); wait briefly.
            first = await reader.readline()
            if first:
                sess.commands.append(first.rstrip(b"\r\n").decode("utf-8", "replace"))
            if first[:4].upper() == b"QUIT":
                sess.quit = True
                await self._reply(writer, "quit", self._next("quit", script.quit))
            return
        sender: str | None = None
        params = ""
        accepted: list[str] = []
        rejected: list[str] = []
        while True:
            raw = await reader.readline()
            if not raw:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            sess.commands.append(line)
            verb = line.split(" ", 1)[0].upper()
            arg = line[len(verb) :].strip()
            if verb == "EHLO":
                sess.helo = arg
                sender, accepted, rejected = None, [], []
                if script.ehlo is not None:
                    await self._reply(writer, "ehlo", self._next("ehlo", script.ehlo))
                    continue
                exts = list(script.extensions)
                if self.ssl_context is not None and script.offer_starttls and not sess.tls:
                    exts.append("STARTTLS")
                text = "\n".join(["250 {host}", *(f"250 {e}" for e in exts)])
                await self._reply(writer, "ehlo", text)
            elif verb == "HELO":
                sess.helo = arg
                await self._reply(writer, "helo", self._next("helo", script.helo))
            elif verb == "STARTTLS" and self.ssl_context is not None and not sess.tls:
                reply = await self._reply(
                    writer, "starttls", self._next("starttls", script.starttls)
                )
                if reply.startswith("220"):
                    await writer.start_tls(self.ssl_context)
                    sess.tls = True
                    sender, accepted, rejected = None, [], []
            elif verb == "MAIL":
                reply = await self._reply(writer, "mail", self._next("mail", script.mail))
                if reply.startswith("2"):
                    addr, _, params = arg[5:].strip().partition(" ")
                    sender = addr.strip("<>")
                    accepted, rejected = [], []
            elif verb == "RCPT":
                addr = arg[3:].strip().split(" ")[0].strip("<>")
                if sender is None:
                    await self._reply(writer, "rcpt", "503 5.5.1 Error: need MAIL command")
                    continue
                spec = script.rcpt.get(addr.lower(), script.rcpt_default)
                reply = await self._reply(writer, "rcpt", self._next(f"rcpt:{addr.lower()}", spec))
                (accepted if reply.startswith("2") else rejected).append(addr)
            elif verb == "DATA":
                if sender is None or not accepted:
                    await self._reply(writer, "data", "554 5.5.1 Error: no valid recipients")
                    continue
                reply = await self._reply(writer, "data", self._next("data", script.data))
                if not reply.startswith("354"):
                    continue
                body = await _read_data(reader)
                final = await self._reply(
                    writer, "data_end", self._next("data_end", script.data_end)
                )
                txn = RecordedTransaction(
                    sess.id, sender, params, accepted, rejected, body, final, sess.tls
                )
                sess.transactions.append(txn)
                self._record({"event": "transaction", **txn.to_json()})
                sender, accepted, rejected = None, [], []
            elif verb == "RSET":
                sender, accepted, rejected = None, [], []
                await self._reply(writer, "rset", self._next("rset", script.rset))
            elif verb == "NOOP":
                await self._reply(writer, "noop", self._next("noop", script.noop))
            elif verb == "QUIT":
                sess.quit = True
                await self._reply(writer, "quit", self._next("quit", script.quit))
                return
            else:
                await self._reply(writer, "unknown", "502 5.5.2 Error: command not recognized")

    def _record(self, event: dict[str, Any]) -> None:
        if self.record_path is None:
            return
        with self.record_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")


async def _read_data(reader: asyncio.StreamReader) -> bytes:
    """Message content up to ``.<CRLF>``, dot-unstuffed (RFC 5321 §4.5.2)."""
    lines: list[bytes] = []
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        if line == b".\r\n":
            return b"".join(lines)
        if line.startswith(b"."):
            line = line[1:]
        lines.append(line)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The events a subprocess peer appended to its record file."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line]


def _server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def _serve(args: argparse.Namespace, script: dict[str, Any]) -> None:
    ctx = _server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    peer = ScriptedPeer(
        script, host=args.host, port=args.port, ssl_context=ctx, record_path=args.record
    )
    await peer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"LISTENING {peer.port}", flush=True)
    await stop.wait()
    await peer.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m empath.testing.scripted_peer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--script", help="JSON file with PeerScript fields")
    parser.add_argument("--record", help="append events as JSON lines to this file")
    parser.add_argument("--tls-cert", help="PEM certificate chain (enables STARTTLS)")
    parser.add_argument("--tls-key", help="PEM private key")
    args = parser.parse_args(argv)
    script: dict[str, Any] = {}
    if args.script:
        script = json.loads(Path(args.script).read_text(encoding="utf-8"))
    asyncio.run(_serve(args, script))
    return 0


if __name__ == "__main__":
    sys.exit(main())
