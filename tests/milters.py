"""Milters for tests: real rspamd (proxy worker in milter mode) and OpenDKIM started on
loopback in a temporary directory, and a scripted milter (our own, over a real
socket) that misbehaves on cue.  Every process is stopped by its PID.

rspamd uses the Debian package's stock configuration with every directory
(``LOCAL_CONFDIR``, ``DBDIR``, ``RUNDIR``, ``LOGDIR``) moved to the temporary one;
``local.d`` there binds its workers to free loopback ports, points its DNS at a
closed port (no network lookups), and turns on the milter headers.  Loading its
rules takes tens of seconds on a busy machine, hence the module-scoped fixture.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import free_port, require_tool, stop_pid, wait_for

__all__ = ["OpenDkim", "Rspamd", "ScriptedMilter", "opendkim", "packet", "rspamd"]


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@dataclass
class Rspamd:
    port: int  # the proxy worker's milter port
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def rspamd(
    workdir: Path, timeout: float = 240.0, nameserver: str | None = None
) -> Iterator[Rspamd]:
    """``nameserver`` ("127.0.0.1:PORT"): rspamd's resolver; without one, a closed
    port (its DNS-based checks fail after a 0.2 s timeout)."""
    binary = require_tool("rspamd")
    local = workdir / "etc" / "local.d"
    local.mkdir(parents=True)
    for sub in ("db", "run", "log"):
        (workdir / sub).mkdir()
        (workdir / sub).chmod(0o777)  # the workers run as _rspamd
    proxy, normal, controller, dead = free_port(), free_port(), free_port(), free_port()
    (local / "worker-proxy.inc").write_text(
        f'bind_socket = "127.0.0.1:{proxy}";\nmilter = yes;\ntimeout = 60s;\n'
        'upstream "local" { default = yes; self_scan = yes; }\ncount = 1;\n'
    )
    (local / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{normal}";\ncount = 1;\n')
    (local / "worker-controller.inc").write_text(
        f'bind_socket = "127.0.0.1:{controller}";\ncount = 1;\n'
    )
    resolver = nameserver or f"127.0.0.1:{dead}"
    (local / "options.inc").write_text(
        f'dns {{ nameserver = ["{resolver}"]; timeout = 0.2s; retransmits = 1; }}\n'
    )
    log_path = workdir / "log" / "rspamd.log"
    (local / "logging.inc").write_text(
        f'type = "file";\nfilename = "{log_path}";\nlevel = "info";\n'
    )
    (local / "milter_headers.conf").write_text(
        'use = ["x-spamd-result", "x-rspamd-server", "x-rspamd-queue-id", "x-spam-status"];\n'
        "skip_local = false;\nskip_authenticated = false;\n"  # our client is 127.0.0.1
    )
    workdir.chmod(0o755)
    args = [binary, "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", "/etc/rspamd/rspamd.conf"]
    dirs = (("LOCAL_CONFDIR", "etc"), ("DBDIR", "db"), ("RUNDIR", "run"), ("LOGDIR", "log"))
    args += [f"--var={k}={workdir / v}" for k, v in dirs]
    out = (workdir / "stdout.txt").open("wb")
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    server = Rspamd(proxy, proc, log_path)
    try:
        deadline = time.monotonic() + timeout
        while not _listening(proxy):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rspamd did not start:\n{server.log()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        stop_pid(proc, timeout=20)
        out.close()


@dataclass
class OpenDkim:
    port: int
    proc: subprocess.Popen[bytes]
    txt: str  # the DNS TXT record of the selector (what opendkim-genkey wrote)

    @property
    def address(self) -> str:
        return f"inet:127.0.0.1:{self.port}"


@contextlib.contextmanager
def opendkim(workdir: Path, domain: str, selector: str) -> Iterator[OpenDkim]:
    """OpenDKIM signing ``domain`` mail with a fresh RSA key (relaxed/relaxed), for
    clients in 127.0.0.0/8 (its InternalHosts default)."""
    binary = require_tool("opendkim")
    genkey = require_tool("opendkim-genkey")
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run([genkey, "-D", str(workdir), "-d", domain, "-s", selector, "-b", "2048"],
                   check=True)  # fmt: skip
    key = workdir / f"{selector}.private"
    key.chmod(0o600)
    txt_file = (workdir / f"{selector}.txt").read_text()
    txt = "".join(part for part in txt_file.split('"')[1::2])
    port = free_port()
    conf = workdir / "opendkim.conf"
    conf.write_text(
        f"Mode s\nDomain {domain}\nSelector {selector}\nKeyFile {key}\n"
        f"Socket inet:{port}@127.0.0.1\nCanonicalization relaxed/relaxed\n"
        f"PidFile {workdir / 'opendkim.pid'}\nSyslog no\nLogWhy yes\n"
        "RequireSafeKeys false\nSignatureAlgorithm rsa-sha256\n"
    )
    out = (workdir / "stdout.txt").open("wb")
    proc = subprocess.Popen([binary, "-f", "-x", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _listening(port) or proc.poll() is not None, 20, what="opendkim")
        if proc.poll() is not None:
            raise RuntimeError((workdir / "stdout.txt").read_text())
        yield OpenDkim(port, proc, txt)
    finally:
        stop_pid(proc)
        out.close()


# --- a scripted milter ------------------------------------------------------------------


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


@dataclass
class ScriptedMilter:
    """Negotiates, then answers CONTINUE to everything except as told:

    * ``eom_delay_s``: sleep that long before answering end of message;
    * ``close_on_body``: close the connection when the first body chunk arrives;
    * ``eom_replies``: packets sent at end of message (default: one ACCEPT... CONTINUE).

    ``commands`` records every command letter received, in order."""

    eom_delay_s: float = 0.0
    close_on_body: bool = False
    eom_replies: list[bytes] = field(default_factory=lambda: [packet(b"c")])
    commands: list[bytes] = field(default_factory=list)
    port: int = 0
    unix_path: str = ""  # listen on this Unix socket instead of a loopback port

    def __enter__(self) -> ScriptedMilter:
        if self.unix_path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.bind(self.unix_path)
            self._sock.listen()
        else:
            self._sock = socket.create_server(("127.0.0.1", 0))
            self.port = self._sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._sock.close()
        self._thread.join(5)

    @property
    def address(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"inet:127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while len(buf) >= 4:
                    (size,) = struct.unpack(">I", buf[:4])
                    if len(buf) < 4 + size:
                        break
                    cmd, body = buf[4:5], buf[5 : 4 + size]
                    buf = buf[4 + size :]
                    self.commands.append(cmd)
                    if not self._answer(conn, cmd, body):
                        return

    def _answer(self, conn: socket.socket, cmd: bytes, body: bytes) -> bool:
        if cmd == b"O":
            conn.sendall(packet(b"O", struct.pack(">III", 6, 0x1FF, 0)))
        elif cmd == b"B" and self.close_on_body:
            return False
        elif cmd == b"E":
            if self.eom_delay_s:
                time.sleep(self.eom_delay_s)
            conn.sendall(b"".join(self.eom_replies))
        elif cmd in (b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"B"):
            conn.sendall(packet(b"c"))
        elif cmd == b"Q":
            return False
        return True  # D (macros), A (abort): no reply
