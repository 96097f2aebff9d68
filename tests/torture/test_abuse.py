"""Abuse: many idle connections, slowloris clients and non-reading pipeliners at once.

Against a live daemon: its connection limits hold (per IP and in total, 421 4.7.0
past them), its RSS stays bounded, and a well-behaved client still gets its 250s at
normal latency (p95 compared with the same client on the unloaded daemon).

The load runs on an asyncio loop in a background thread; the well-behaved client is a
blocking socket on the test thread.  Clients bind source addresses 127.0.0.40-49
(this suite's loopback range) so the per-IP cap can be exercised apart from the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
import socket
import statistics
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from tests.daemon import Daemon, RawSmtp, parked_overrides
from tests.torture.conftest import figure, pick

T = TypeVar("T")
IDLE_IPS = [f"127.0.0.{i}" for i in range(40, 48)]
NOISY_IP = "127.0.0.48"  # slowloris and pipeliners
CAP_IP = "127.0.0.49"  # used only to fill the per-IP cap


class LoadLoop:
    """An event loop in a daemon thread holding the abusive connections."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.writers: list[asyncio.StreamWriter] = []
        self.socks: list[socket.socket] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.drip_bytes = 0
        self.pipelined_bytes = 0

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def connect(self, port: int, source: str) -> tuple[bytes, asyncio.StreamReader]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        self.writers.append(writer)
        return await reader.readline(), reader

    async def open_idle(self, port: int, n: int) -> list[bytes]:
        greetings: list[bytes] = []
        for start in range(0, n, 50):
            batch = [
                self.connect(port, IDLE_IPS[i % len(IDLE_IPS)])
                for i in range(start, min(n, start + 50))
            ]
            greetings += [g for g, _ in await asyncio.gather(*batch)]
        return greetings

    async def start_slowloris(self, port: int, n: int) -> list[bytes]:
        """Clients that send one byte a second, forever (a valid dialogue, slowly)."""
        script = b"EHLO slowloris.example\r\nMAIL FROM:<slow@x.example>\r\nNOOP\r\n" * 100
        greetings = []
        for _ in range(n):
            greeting, _reader = await self.connect(port, NOISY_IP)
            greetings.append(greeting)
            writer = self.writers[-1]

            async def drip(w: asyncio.StreamWriter = writer) -> None:
                for i in range(len(script)):
                    w.write(script[i : i + 1])
                    self.drip_bytes += 1
                    await asyncio.sleep(1.0)

            self.tasks.append(asyncio.get_running_loop().create_task(drip()))
        return greetings

    async def start_pipeliners(self, port: int, n: int) -> None:
        """Clients that pipeline HELP and never read a reply."""
        loop = asyncio.get_running_loop()
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.bind((NOISY_IP, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            self.socks.append(sock)

            async def flood(s: socket.socket = sock) -> None:
                chunk = b"HELP\r\n" * 10_000
                with contextlib.suppress(OSError):
                    while True:
                        await loop.sock_sendall(s, chunk)
                        self.pipelined_bytes += len(chunk)

            self.tasks.append(loop.create_task(flood()))

    async def close_all(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()
        for s in self.socks:
            s.close()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.close_all(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def probe_latencies(port: int, rounds: int) -> list[float]:
    """Round trips of a well-behaved client: whole transactions, one command at a time."""
    rtts: list[float] = []
    with RawSmtp("127.0.0.1", port) as c:
        assert 220 == c.reply()[0]

        def step(data: bytes, code: int) -> None:
            t0 = time.perf_counter()
            c.send(data)
            got = c.reply()[0]
            rtts.append(time.perf_counter() - t0)
            assert code == got, (data, got)

        step(b"EHLO probe.example\r\n", 250)
        for i in range(rounds):
            step(b"MAIL FROM:<probe@x.example>\r\n", 250)
            step(b"RCPT TO:<r%d@victim.test>\r\n" % i, 250)
            step(b"DATA\r\n", 354)
            step(b"Subject: probe\r\n\r\nhello\r\n.\r\n", 250)
            step(b"NOOP\r\n", 250)
    return rtts


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def greeting_of(port: int, source: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock, sock.recv(1024)


def test_abuse_limits_hold_memory_bounded_and_a_good_client_is_served(tmp_path: Path) -> None:
    """Idle connections + slowloris + non-reading pipeliners: limits hold, RSS stays
    bounded, a well-behaved client's p95 stays < 10x unloaded + 50 ms."""
    idle = pick(ci=300, full=1000)
    slow = pick(ci=20, full=50)
    pipes = pick(ci=3, full=10)
    per_ip = math.ceil(idle / len(IDLE_IPS)) + slow + pipes + 5
    total = idle + slow + pipes + per_ip + 10
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * total + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the daemon inherits it
    daemon = Daemon(
        tmp_path,
        listener={
            "max_connections": total,
            "max_connections_per_ip": per_ip,
            "timeouts": {"command_secs": 120, "data_init_secs": 120, "data_block_secs": 120},
        },
        overrides=parked_overrides("victim.test"),
    )
    daemon.start()
    load = LoadLoop()
    try:
        port = daemon.smtp_port
        quiet = probe_latencies(port, pick(ci=40, full=100))
        rss_base = daemon.rss_kib()

        greetings = load.call(load.open_idle(port, idle))
        greetings += load.call(load.start_slowloris(port, slow))
        load.call(load.start_pipeliners(port, pipes))
        assert all(g.startswith(b"220 ") for g in greetings), {g[:12] for g in greetings}
        time.sleep(3.0)  # let the pipeliners fill every buffer and slowloris drip
        loaded = probe_latencies(port, pick(ci=40, full=100))
        rss_loaded = daemon.rss_kib()

        # per-IP cap: a fresh address gets per_ip sessions, then 421 4.7.0
        held: list[socket.socket] = []
        try:
            for _ in range(per_ip):
                sock, greeting = greeting_of(port, CAP_IP)
                held.append(sock)
                assert greeting.startswith(b"220 ")
            sock, over_ip = greeting_of(port, CAP_IP)
            sock.close()
            # global cap: fill what is left, then one more is refused
            accepted = 0
            over_total = b""
            for _ in range(total):
                sock, greeting = greeting_of(port, "127.0.0.1")
                held.append(sock)
                if not greeting.startswith(b"220 "):
                    over_total = greeting
                    break
                accepted += 1
        finally:
            for sock in held:
                sock.close()
        rss_end = daemon.rss_kib()
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        load.stop()
        code = daemon.stop()

    quiet_p95, loaded_p95 = p95(quiet), p95(loaded)
    figure(
        "abuse",
        f"{idle} idle + {slow} slowloris ({load.drip_bytes} bytes dripped) + {pipes} "
        f"non-reading pipeliners ({load.pipelined_bytes / 2**20:.1f} MiB taken by the "
        f"kernel and daemon); probe p95 {quiet_p95 * 1000:.1f} ms unloaded, "
        f"{loaded_p95 * 1000:.1f} ms loaded (max {max(loaded) * 1000:.1f} ms); "
        f"RSS {rss_base // 1024} MiB base, {rss_loaded // 1024} MiB loaded, "
        f"{rss_end // 1024} MiB at the caps; per-IP cap {per_ip} -> {over_ip[:9]!r}, "
        f"total cap {total} -> {over_total[:9]!r} after {accepted} more (machine shared)",
    )
    assert over_ip.startswith(b"421 4.7.0")
    assert over_total.startswith(b"421 4.7.0")
    assert loaded_p95 < 10 * quiet_p95 + 0.05
    # bounded: the pipeliners cannot make the daemon buffer without limit
    assert rss_loaded - rss_base < 150 * 1024 + idle * 64
    assert load.pipelined_bytes < pipes * 16 * 2**20
    assert 0 == code
