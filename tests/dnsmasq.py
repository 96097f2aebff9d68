"""Real DNS for tests: dnsmasq serving scripted MX/A/AAAA data, and two broken servers.

Usage (any test module)::

    from tests.dnsmasq import STANDARD, DnsRecords, dnsmasq, dnsmasq_factory  # noqa: F401

    def test_x(dnsmasq_factory):               # pytest fixture, stops every server
        dns = dnsmasq_factory(STANDARD)         # or DnsRecords(mx=..., hosts=...)
        config_nameservers = [dns.nameserver]   # "127.0.0.1:<port>"

    with dnsmasq(STANDARD) as dns: ...          # context manager, outside pytest fixtures
    with blackhole_nameserver() as ns: ...      # "127.0.0.1:<port>" that never answers
    with servfail_nameserver() as ns: ...       # answers SERVFAIL to everything

dnsmasq runs in the foreground on 127.0.0.1:<free port> with no upstream
(``--no-resolv``), no /etc/hosts and no config file; every zone in
``DnsRecords.zones`` is answered locally, so a name in it that has no record
is NXDOMAIN. A null MX is ``--mx-host=<domain>,.,0`` (dnsmasq 2.90 serves it as
``MX 0 .``). All records carry ``DnsRecords.ttl_s`` (``--local-ttl``). The
process is stopped by its PID.

STANDARD serves (ports of SMTP peers are the test's choice: set the router's mx_port):

=================  =====================================================
two.test           MX 10 mx1.two.test (127.0.0.2), MX 20 mx2.two.test (127.0.0.3)
equal.test         MX 10 a.equal.test (127.0.0.4), MX 10 b.equal.test (127.0.0.5)
aonly.test         no MX; A 127.0.0.6 (implicit MX)
dual.test          no MX; A 127.0.0.7, AAAA ::1
nullmx.test        MX 0 . (RFC 7505)
halfbroken.test    MX 10 ghost.test (NXDOMAIN), MX 20 mx2.two.test
nomx-noaddr.test   exists (TXT-less empty name) with no MX and no address
missing.test       NXDOMAIN (NXDOMAIN_NAME)
=================  =====================================================
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.helpers import free_udp_port, require_tool, stop_pid, wait_for

__all__ = [
    "NXDOMAIN_NAME",
    "STANDARD",
    "DnsRecords",
    "DnsmasqServer",
    "blackhole_nameserver",
    "dnsmasq",
    "dnsmasq_factory",
    "servfail_nameserver",
]

NXDOMAIN_NAME = "missing.test"
_READY_NAME = "ready.dnsmasq.test"


@dataclass(frozen=True)
class DnsRecords:
    """What dnsmasq serves.

    ``mx``: domain → [(preference, exchange)], exchange ``"."`` for a null MX.
    ``hosts``: name → addresses (IPv4 and/or IPv6 literals).
    ``empty``: names that exist with no records at all (answered NOERROR, empty).
    ``zones``: served authoritatively-ish: unknown names in them are NXDOMAIN.
    ``txt``: name → TXT records (each cut into <= 255-byte strings, as a zone file would).
    """

    mx: Mapping[str, Sequence[tuple[int, str]]] = field(default_factory=dict)
    hosts: Mapping[str, Sequence[str]] = field(default_factory=dict)
    empty: Sequence[str] = ()
    zones: Sequence[str] = ("test",)
    ttl_s: int = 120
    txt: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def args(self) -> list[str]:
        out = [f"--local-ttl={self.ttl_s}"]
        out += [f"--local=/{zone}/" for zone in self.zones]
        for domain, records in self.mx.items():
            out += [f"--mx-host={domain},{exchange},{pref}" for pref, exchange in records]
        for name, addresses in {**self.hosts, _READY_NAME: ["127.0.0.1"]}.items():
            out.append(f"--host-record={name},{','.join(addresses)}")
        # An empty TXT record makes the name exist without MX/A/AAAA.
        out += [f"--txt-record={name}" for name in self.empty]
        for name, texts in self.txt.items():
            for text in texts:
                parts = [text[i : i + 255] for i in range(0, len(text), 255)]
                out.append(f"--txt-record={name}," + ",".join(parts))  # DKIM TXT: no commas
        return out


STANDARD = DnsRecords(
    mx={
        "two.test": [(10, "mx1.two.test"), (20, "mx2.two.test")],
        "equal.test": [(10, "a.equal.test"), (10, "b.equal.test")],
        "nullmx.test": [(0, ".")],
        "halfbroken.test": [(10, "ghost.test"), (20, "mx2.two.test")],
    },
    hosts={
        "mx1.two.test": ["127.0.0.2"],
        "mx2.two.test": ["127.0.0.3"],
        "a.equal.test": ["127.0.0.4"],
        "b.equal.test": ["127.0.0.5"],
        "aonly.test": ["127.0.0.6"],
        "dual.test": ["127.0.0.7", "::1"],
    },
    empty=["nomx-noaddr.test"],
)


@dataclass(frozen=True)
class DnsmasqServer:
    host: str
    port: int
    pid: int
    log_path: Path

    @property
    def nameserver(self) -> str:
        """The ``dns.nameservers`` entry for this server."""
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        """dnsmasq's log (queries are logged), for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _answers(host: str, port: int) -> bool:
    query = dns.message.make_query(_READY_NAME, "A")
    try:
        dns.query.udp(query, host, port=port, timeout=0.2)
    except (dns.exception.DNSException, OSError):
        return False
    return True


def _exited_or_answers(proc: subprocess.Popen[bytes], port: int) -> bool:
    return proc.poll() is not None or _answers("127.0.0.1", port)


@contextlib.contextmanager
def dnsmasq(
    records: DnsRecords = STANDARD, tmp_dir: Path | None = None, port: int | None = None
) -> Iterator[DnsmasqServer]:
    """Run dnsmasq serving ``records`` for the with-block; stopped by PID afterwards.
    ``port``: this one (e.g. to serve new records where a stopped server was)."""
    binary = require_tool("dnsmasq")
    with contextlib.ExitStack() as stack:
        if tmp_dir is None:
            tmp_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dnsmasq-")))
        tmp_dir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        pinned = port
        proc: subprocess.Popen[bytes] | None = None
        for _ in range(5):  # the free port may be taken between probe and bind
            port = used = free_udp_port() if pinned is None else pinned
            log_path = tmp_dir / f"dnsmasq-{port}.log"
            args = [
                binary,
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                f"--port={port}",
                f"--pid-file={tmp_dir / f'dnsmasq-{port}.pid'}",
                f"--log-facility={log_path}",
                "--log-queries",
                *records.args(),
            ]
            if os.geteuid() == 0:
                args.append("--user=root")  # keep access to the log file in tmp_dir
            stderr_path = tmp_dir / f"dnsmasq-{port}.stderr"
            with open(stderr_path, "wb") as stderr:
                proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                wait_for(
                    functools.partial(_exited_or_answers, proc, port),
                    timeout=10,
                    what=f"dnsmasq on 127.0.0.1:{port}",
                )
            except BaseException:
                stop_pid(proc)
                raise
            if proc.poll() is None:
                break
            last_error = stderr_path.read_text(errors="replace")
            proc = None
        if proc is None:
            pytest.fail(f"dnsmasq did not start: {last_error}")
        try:
            yield DnsmasqServer("127.0.0.1", used, proc.pid, log_path)
        finally:
            stop_pid(proc)


@pytest.fixture
def dnsmasq_factory(tmp_path: Path) -> Iterator[Callable[[DnsRecords], DnsmasqServer]]:
    """Start dnsmasq servers on demand; all are stopped at teardown."""
    with contextlib.ExitStack() as stack:
        counter = iter(range(1_000_000))

        def start(records: DnsRecords = STANDARD) -> DnsmasqServer:
            sub = tmp_path / f"dnsmasq{next(counter)}"
            return stack.enter_context(dnsmasq(records, sub))

        yield start


@contextlib.contextmanager
def blackhole_nameserver() -> Iterator[str]:
    """``"127.0.0.1:<port>"`` of a bound UDP socket that never reads or answers.

    Bound (rather than closed) so the kernel sends no ICMP port-unreachable:
    the resolver must time out, not fail fast.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def servfail_nameserver() -> Iterator[str]:
    """``"127.0.0.1:<port>"`` of a UDP server answering SERVFAIL to every query."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.05)
            if not ready:
                continue
            wire, peer = sock.recvfrom(65535)
            try:
                query = dns.message.from_wire(wire)
            except dns.exception.DNSException:
                continue
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            sock.sendto(response.to_wire(), peer)

    thread = threading.Thread(target=serve, name="servfail-dns", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        sock.close()
