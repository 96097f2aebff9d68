"""An in-process SMTP sink for the torture tests: one asyncio server for every test domain.

Behaviour by recipient domain: ``defer.test`` answers ``451``, ``bounce.test`` ``550``
(``451`` while ``bouncing`` is off), anything else ``250``.  Each accepted transaction is
counted per (``X-Torture-Id`` of the body, domain) - ``"dsn"`` for a bounce (null sender)
- and the transactions open between MAIL and the end of DATA are counted too.
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
from dataclasses import dataclass, field

from tests.helpers import free_port

DEFER, BOUNCE, DSN = "defer.test", "bounce.test", "dsn.test"
TID = re.compile(rb"X-Torture-Id: (\d+)")


@dataclass
class SinkState:
    delivered: collections.Counter[tuple[int, str]] = field(default_factory=collections.Counter)
    in_txn: int = 0  # transactions between MAIL and the end of DATA (or RSET/EOF)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> tuple[set[tuple[int, str]], int]:
        with self.lock:
            return set(self.delivered), self.in_txn


class Sink:
    """One SMTP server for every test domain, on its own event loop thread."""

    def __init__(self) -> None:
        self.state = SinkState()
        self.bouncing = True  # False: bounce.test defers (451) instead
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torture-sink", daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> Sink:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", self.port)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(
                asyncio.gather(self._server.wait_closed(), *tasks, return_exceptions=True)
            )
            self._loop.close()  # else its self-pipe leaks (a ResourceWarning: -W error)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        st = self.state
        in_txn = False
        rcpts: list[str] = []
        dsn = False

        def end_txn() -> None:
            nonlocal in_txn
            if in_txn:
                with st.lock:
                    st.in_txn -= 1
                in_txn = False

        try:
            writer.write(b"220 sink.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-sink.test\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    end_txn()
                    rcpts, dsn, in_txn = [], b"<>" in line, True
                    with st.lock:
                        st.in_txn += 1
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == b"RCPT":
                    domain = line.decode().rsplit("@", 1)[-1].strip().rstrip(">").lower()
                    if domain == DEFER:
                        writer.write(b"451 4.3.0 try again later\r\n")
                    elif domain == BOUNCE and self.bouncing:
                        writer.write(b"550 5.1.1 no such user\r\n")
                    elif domain == BOUNCE:
                        writer.write(b"451 4.3.0 not yet\r\n")
                    else:
                        rcpts.append(domain)
                        writer.write(b"250 2.1.5 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    lines: list[bytes] = []
                    while (data := await reader.readline()) not in (b".\r\n", b""):
                        lines.append(data)
                    if not data:
                        return
                    found = TID.search(b"".join(lines))
                    with st.lock:
                        if found is not None:
                            tid = int(found.group(1))
                            for domain in ["dsn"] if dsn else rcpts:
                                st.delivered[(tid, domain)] += 1
                    end_txn()
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"RSET":
                    end_txn()
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            end_txn()
            writer.close()
