"""Inbound backpressure and fairness over real loopback sockets (issue 7, defects 3, 6, 8).

A client that pipelines and never reads must not grow server memory or keep its slot;
one that pipelines megabytes must not starve the others; the per-IP cap counts IPv6
clients by /64.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from empath.spool.memory import MemorySpool
from empath.testing.clock import FakeClock
from empath.transport.admission import per_ip_key
from empath.transport.listener import ListenerRuntime
from empath.transport.session import SmtpSession
from tests.daemon import Daemon
from tests.helpers import wait_for
from tests.integration.test_inbound_smtp import RELAY, Raw, ServerThread, serving, spec


def held_bytes(srv: ServerThread) -> int:
    async def total() -> int:
        return sum(s.held_bytes for s in srv.group.sessions())

    return srv.call(total())


def pipeline_without_reading(port: int, total: int, rcvbuf: int = 4096) -> socket.socket:
    """Connect, then send up to `total` bytes of HELP without reading a reply; stop
    when the server stops taking them for a second."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    chunk = b"HELP\r\n" * 10_000
    sent = 0
    stalled_since = None
    while sent < total:
        try:
            sent += sock.send(chunk)
            stalled_since = None
        except BlockingIOError:
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > 1.0:
                break
            time.sleep(0.01)
    return sock


def test_non_reading_pipeliner_is_bounded_then_aborted_and_its_slot_freed() -> None:
    """Defect 3: 3 MiB of pipelined HELP from a client that never reads: the session
    holds well under 1 MiB (reading pauses at the write high-water mark), and when its
    command timeout fires it is aborted, so the next connection from that IP gets 220,
    not 421."""
    with serving([spec(max_connections_per_ip=1, command_timeout_s=1.5)]) as s:
        peak = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, held_bytes(s))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        sock = pipeline_without_reading(s.port, 3 * 1024 * 1024)
        try:
            time.sleep(0.3)
            stop.set()
            watcher.join(5)
            print(f"peak bytes held by the non-reading session: {peak}")
            assert 0 < peak < 1024 * 1024

            def slot_free() -> bool:
                with Raw(s.port) as r:
                    return [220] == r.codes(1)

            wait_for(slot_free, 15, interval=0.3)
        finally:
            sock.close()
        s.assert_serving()


def test_half_closed_pipeliner_gets_every_reply() -> None:
    """A client that pipelines 1,000 commands and half-closes (shutdown SHUT_WR) still
    gets every reply (the commands held back by the per-turn bound included), then
    the server closes; a message pipelined before the half-close is committed first."""
    with serving([spec()]) as s:
        with Raw(s.port) as r:
            assert [220] == r.codes(1)
            r.send(b"EHLO c\r\n" + b"NOOP\r\n" * 1000)
            r.sock.shutdown(socket.SHUT_WR)
            assert [250] * 1001 == r.codes(1001)
            assert r.closed_by_server()
        with Raw(s.port) as r:
            assert [220] == r.codes(1)
            r.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                   b"DATA\r\nSubject: s\r\n\r\nx\r\n.\r\nNOOP\r\n")  # fmt: skip
            r.sock.shutdown(socket.SHUT_WR)
            assert [250, 250, 250, 354, 250, 250] == r.codes(6)
            assert r.closed_by_server()
        assert 1 == len(s.stored())


def rtt_while_another_pipelines(daemon: Daemon, flood_bytes: int) -> list[float]:
    """NOOP round trips of one session while another pipelines `flood_bytes` of NOOPs
    (and reads its replies, so only CPU is shared)."""
    port = daemon.smtp_port
    flood = socket.create_connection(("127.0.0.1", port), timeout=30)
    probe = Raw(port)
    try:
        assert [220] == probe.codes(1)
        got = 0
        expected = flood_bytes // 6

        def drain() -> None:
            nonlocal got
            while got < expected:
                data = flood.recv(1 << 20)
                if not data:
                    return
                got += data.count(b"\n")  # one line per NOOP reply

        assert flood.recv(1024).startswith(b"220")
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        sender = threading.Thread(target=flood.sendall, args=(b"NOOP\r\n" * expected,), daemon=True)
        sender.start()
        rtts: list[float] = []
        while reader.is_alive() and len(rtts) < 10_000:
            t0 = time.perf_counter()
            probe.send(b"NOOP\r\n")
            assert [250] == probe.codes(1)
            rtts.append(time.perf_counter() - t0)
        reader.join(60)
        assert expected == got
        return rtts
    finally:
        probe.close()
        flood.close()


def test_pipelining_megabytes_does_not_starve_another_session(tmp_path: Path) -> None:
    """Defect 6: in a live daemon, one client pipelining 3 MiB of NOOPs leaves another
    session's NOOP round trip near its normal latency (printed; asserted generously)."""
    daemon = Daemon(tmp_path)
    daemon.start()
    try:
        rtts = rtt_while_another_pipelines(daemon, 3 * 1024 * 1024)
        rtts.sort()
        p50 = statistics.median(rtts)
        worst = rtts[-1]
        print(f"probe NOOP RTT during a 3 MiB pipeline: n={len(rtts)} p50={p50 * 1000:.1f} ms "
              f"max={worst * 1000:.1f} ms (machine shared)")  # fmt: skip
        assert worst < 1.0
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_per_ip_key_groups_ipv6_by_64(ip: str, key: str) -> None:
    """Defect 8: the per-IP cap counts IPv4 by address and IPv6 by /64."""
    assert key == per_ip_key(ip)


class FakeTransport:
    """Just enough of a transport for connection_made: a peer address and a log."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.written = b""
        self.closed = False
        self.aborted = False
        self.unsent = 0  # what get_write_buffer_size says

    def get_extra_info(self, name: str) -> object:
        return (self.ip, 40000, 0, 0) if name == "peername" else None

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.aborted = self.closed = True

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def runtime(loop: asyncio.AbstractEventLoop, **kw: Any) -> ListenerRuntime:
    return ListenerRuntime(
        spec(**kw),
        relay=RELAY,
        spool=MemorySpool(),
        on_accepted=None,
        clock=FakeClock(),  # the sweeper timer is virtual: no running loop needed
        loop=loop,
        ssl_context=None,
        audit=False,
        redact_sender=False,
    )


@pytest.mark.parametrize("quit_first", [False, True])
def test_timeout_with_unsent_output_aborts(quit_first: bool) -> None:
    """Defect 3: when the timeout fires with replies still unsent, the session aborts
    (close() would wait for the client forever); a session that said 221/421 but whose
    reply never drains is aborted after the command timeout too."""
    loop = asyncio.new_event_loop()
    try:
        rt = runtime(loop, command_timeout_s=5)
        transport = FakeTransport("192.0.2.1")
        session = SmtpSession(rt)
        session.connection_made(cast(asyncio.Transport, transport))
        transport.unsent = 70_000
        if quit_first:
            session.data_received(b"QUIT\r\n")
            assert (True, False) == (transport.closed, transport.aborted)
        now = rt.clock.monotonic()
        session.check_timeout(now + 1)
        assert not transport.aborted
        session.check_timeout(now + 6)
        assert transport.aborted
        if not quit_first:
            assert b"421" not in transport.written  # nothing more is queued behind it
        rt.stop_sweeper()
    finally:
        loop.close()


def test_per_ip_cap_groups_ipv6_clients_by_64() -> None:
    """Defect 8: with a per-IP cap of 2, a third client of one IPv6 /64 gets 421 4.7.0
    even from a new address, while a client of the next /64 is served."""
    loop = asyncio.new_event_loop()
    try:
        rt = runtime(loop, max_connections_per_ip=2)
        greetings = []
        for ip in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9", "2001:db8:1:3::1"):
            transport = FakeTransport(ip)
            SmtpSession(rt).connection_made(cast(asyncio.Transport, transport))
            greetings.append(transport.written[:9])
        assert [b"220 mx.te", b"220 mx.te", b"421 4.7.0", b"220 mx.te"] == greetings
        assert {"2001:db8:1:2::/64": 2, "2001:db8:1:3::/64": 1} == rt.admission.per_key
        rt.stop_sweeper()
    finally:
        loop.close()


def test_a_reload_that_revokes_a_trusted_network_is_seen_by_the_next_trust_check() -> None:
    """trusts() remembers its answer per address (asked for modules and the acceptance
    steps of every message); set_relay must forget it."""
    from empath.smtp.relay import RelayPolicy

    loop = asyncio.new_event_loop()
    try:
        rt = runtime(loop)
        rt.set_relay(RelayPolicy(trusted_networks=("192.0.2.0/24",), accepted_domains=()))
        assert (True, True, False) == (
            rt.trusts("192.0.2.1"), rt.trusts("192.0.2.1"), rt.trusts("198.51.100.1")
        )  # fmt: skip
        rt.set_relay(RelayPolicy(trusted_networks=(), accepted_domains=()))
        assert not rt.trusts("192.0.2.1")
        rt.stop_sweeper()
    finally:
        loop.close()
