"""Fuzz: random and mutated SMTP command lines and DATA/BDAT bodies, and the published
SMTP-smuggling payloads, against the sans-I/O server (volume) and a live daemon.

Bars: 0 crashes (no exception from the state machine, no error or traceback in the
daemon's log, the daemon still serving), every reply well-formed, every accepted body
with CRLF line endings only and no NUL, and 0 smuggled messages in the spool.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
import traceback
from pathlib import Path

from empath.smtp.replies import Reply, ReplyParser
from empath.smtp.server import (
    BodyAbort,
    BodyChunk,
    BodyStart,
    Event,
    MessageComplete,
    SmtpServer,
    StartTls,
)
from empath.testing.settings import server_config
from tests.daemon import Daemon, parked_overrides, read_spool, split_received
from tests.torture.conftest import figure, pick
from tests.torture.smtp_inputs import FAKE_ENDS, session_script, splits

SEED = 20240107
_SPOOL_FULL = Reply.of(452, "4.3.1", "Insufficient system storage")


def well_formed_body(data: bytes) -> bool:
    """Only CRLF line endings, no NUL, no line over 998 octets (+ CRLF)."""
    lines = data.split(b"\r\n")
    return (
        b"\x00" not in data
        and not any(b"\r" in line or b"\n" in line for line in lines)
        and max(map(len, lines)) <= 998
    )


class Driver:
    """Runs scripts through one SmtpServer each, like the transport would."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.committed = 0
        self.bad_bodies = 0
        self.replies = 0

    def run(self, script: bytes) -> None:
        server = SmtpServer(
            server_config(
                "mx.test", max_message_bytes=20_000, max_recipients=100, tls_available=True
            ),
            lambda d: d != "denied.test",
        )
        parser = ReplyParser()
        parser.feed(server.data_to_send())
        body: list[bytes] = []
        open_body = False

        def handle(events: list[Event]) -> None:
            nonlocal open_body
            for ev in events:
                if isinstance(ev, BodyStart):
                    assert not open_body
                    open_body, body[:] = True, []
                elif isinstance(ev, BodyChunk):
                    assert open_body
                    body.append(ev.data)
                elif isinstance(ev, BodyAbort):
                    open_body = False
                elif isinstance(ev, MessageComplete):
                    assert open_body
                    open_body = False
                    if not well_formed_body(b"".join(body)):
                        self.bad_bodies += 1
                    if self.rng.random() < 0.9:
                        self.committed += 1
                        handle(server.message_committed("ID"))
                    else:
                        handle(server.message_failed(_SPOOL_FULL))
                elif isinstance(ev, StartTls):
                    handle(server.tls_started())

        for piece in splits(self.rng, script):
            handle(server.receive_data(piece))
            while server.has_backlog:
                handle(server.proceed())
            self.replies += len(parser.feed(server.data_to_send()))
        assert not parser.pending, parser.pending


def test_fuzz_sans_io_server() -> None:
    """>= 1M (full) / 50k (ci) random and mutated inputs through the state machine:
    no exception, well-formed replies, accepted bodies CRLF-clean."""
    target = pick(ci=50_000, full=1_000_000)
    rng = random.Random(SEED)
    driver = Driver(rng)
    inputs = sessions = crashes = 0
    first_crash = ""
    t0 = time.monotonic()
    while inputs < target:
        script = session_script(rng)
        inputs += script.inputs
        sessions += 1
        try:
            driver.run(script.data)
        except Exception:
            crashes += 1
            first_crash = first_crash or f"{script.data!r}\n{traceback.format_exc()}"
    figure(
        "fuzz sans-I/O",
        f"{inputs} inputs in {sessions} sessions, {driver.replies} replies, "
        f"{driver.committed} messages committed, {crashes} crashes, "
        f"{driver.bad_bodies} malformed bodies accepted, {time.monotonic() - t0:.1f} s",
    )
    assert (0, 0) == (crashes, driver.bad_bodies), first_crash


# --- live daemon -----------------------------------------------------------------------


async def talk(port: int, chunks: list[bytes], timeout_s: float = 5.0) -> bytes:
    """Send `chunks` as separate writes, read until the server closes (or timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # the greeting first: a server closing on us (too many errors) resets the
    # connection, and a reset discards what the client had not read yet
    got = bytearray(await reader.readline())

    async def read_all() -> None:
        while data := await reader.read(65536):
            got.extend(data)

    read_task = asyncio.create_task(read_all())
    try:
        async with asyncio.timeout(timeout_s):
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
            await read_task
    except (TimeoutError, ConnectionError):
        pass
    finally:
        read_task.cancel()
        writer.close()
    return bytes(got)


async def run_live(port: int, scripts: list[list[bytes]], concurrency: int) -> list[bytes]:
    sem = asyncio.Semaphore(concurrency)

    async def one(chunks: list[bytes]) -> bytes:
        async with sem:
            return await talk(port, chunks)

    return await asyncio.gather(*(one(c) for c in scripts))


def smuggling_scripts() -> dict[str, bytes]:
    """Each published fake end-of-data sequence, followed by a smuggled transaction,
    inside one real message (DATA), plus the same inside a BDAT chunk (opaque there)."""
    smuggled = (
        b"MAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<victim@victim.test>\r\nDATA\r\n"
        b"Subject: SMUGGLED\r\n\r\nsmuggled\r\n"
    )
    head = b"EHLO c\r\nMAIL FROM:<legit@x.example>\r\nRCPT TO:<r@victim.test>\r\n"
    out = {}
    for name, fake in FAKE_ENDS.items():
        content = b"Subject: carrier\r\n\r\nTesting" + fake + smuggled
        out[f"DATA {name}"] = head + b"DATA\r\n" + content + b"\r\n.\r\nNOOP\r\nQUIT\r\n"
        out[f"BDAT {name}"] = (
            head + b"BDAT %d LAST\r\n" % len(content) + content + b"NOOP\r\nQUIT\r\n"
        )
    # aio-libs/aiosmtpd tests/test_smtpsmuggling.py: "\n.\r\n" then text and a bare LF
    out["aiosmtpd"] = (
        head + b"DATA\r\nSubject: A test\r\n\r\nTesting\n.\r\nNO SMUGGLING\n\r\n.\r\nQUIT\r\n"
    )
    return out


def test_fuzz_live_daemon_and_smuggling_payloads(tmp_path: Path) -> None:
    """A share of the fuzz scripts and every smuggling payload against a live daemon:
    it keeps serving, logs no error, stores only CRLF-clean bodies, and stores no
    smuggled message (no envelope from smuggled@evil.example, no body that starts
    with the smuggled header)."""
    rng = random.Random(SEED + 1)
    target = pick(ci=10_000, full=100_000)
    scripts: list[list[bytes]] = []
    inputs = 0
    while inputs < target:
        script = session_script(rng)
        inputs += script.inputs
        scripts.append(splits(rng, script.data))
    payloads = smuggling_scripts()
    daemon = Daemon(
        tmp_path,
        listener={
            "max_connections_per_ip": 200,
            "timeouts": {"command_secs": 5, "data_init_secs": 5, "data_block_secs": 5},
        },
        overrides=parked_overrides("victim.test", "x.example"),
    )
    daemon.start()
    try:
        t0 = time.monotonic()
        fuzz_answers = asyncio.run(run_live(daemon.smtp_port, scripts, concurrency=20))
        fuzz_s = time.monotonic() - t0
        answers = asyncio.run(run_live(daemon.smtp_port, [[p] for p in payloads.values()], 8))
        assert 200 == daemon.http_status("/health/live")
        with socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=10) as s:
            assert s.recv(1024).startswith(b"220 ")
    finally:
        code = daemon.stop()
    errors = [line for line in daemon.log_lines() if line.get("level") == "error"]
    tracebacks = daemon.log_path.read_text(errors="replace").count("Traceback")
    contents = read_spool(daemon.spool_path)
    smuggled = [
        m.id
        for m in contents.messages.values()
        if m.envelope.sender == "smuggled@evil.example"
        or split_received(contents.bodies[m.id])[1].startswith(b"Subject: SMUGGLED")
    ]
    unclean = [i for i, b in contents.bodies.items() if not well_formed_body(split_received(b)[1])]
    greeted = sum(a.startswith(b"220 ") for a in fuzz_answers)
    reply_lines = sum(a.count(b"\r\n") for a in fuzz_answers)
    by_name = dict(zip(payloads, answers, strict=True))
    data_refused = [n for n, a in by_name.items() if n.startswith("DATA") and b"550 5.6.0" in a]
    figure(
        "fuzz live",
        f"{inputs} inputs in {len(scripts)} sessions in {fuzz_s:.1f} s "
        f"({greeted} greeted, {reply_lines} reply lines), "
        f"{len(payloads)} smuggling payloads ({len(data_refused)} DATA ones refused 550 5.6.0); "
        f"stored {len(contents.messages)}, smuggled {len(smuggled)}, unclean {len(unclean)}, "
        f"error log lines {len(errors)}, tracebacks {tracebacks}, exit code {code}",
    )
    assert ([], [], [], 0, 0) == (smuggled, unclean, errors, tracebacks, code)
    assert len(scripts) == greeted, [a[:80] for a in fuzz_answers if not a.startswith(b"220 ")]
    # every DATA payload carries a bare CR/LF or NUL, except the legal "\r\n. \r\n" one
    assert len(FAKE_ENDS) - 1 == len(data_refused), by_name
    # the session stays in step after the refusal: the NOOP after the real end is answered
    for name in data_refused:
        assert b"550 5.6.0" in by_name[name] and b"221 2.0.0" in by_name[name], name
