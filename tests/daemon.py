"""Run the real `empath` daemon in a subprocess for integration tests and benchmarks.

The config is written from a Python dict (rendered as RON), the process is stopped by
its PID, and its JSON log lines can be read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from empath.config.ron_write import MapValue, dumps
from empath.spool.fs import FileSpool
from empath.spool.model import MessageState
from empath.spool.store import RecoveryReport
from tests.helpers import free_port, stop_pid


def to_ron(value: Any) -> str:
    """Plain Python values as RON (the project's one writer, ``empath.config.ron_write``),
    every dict as a map with string keys, which the config reader takes for a struct too."""
    return dumps(_as_maps(value)).rstrip("\n")


def _as_maps(value: Any) -> Any:
    if isinstance(value, dict):
        return MapValue({str(k): _as_maps(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return [_as_maps(v) for v in value]
    return value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class Daemon:
    """One Empath process with its own spool, sockets and log file under `workdir`."""

    def __init__(
        self,
        workdir: Path,
        overrides: dict[str, Any] | None = None,
        smtp_host: str = "127.0.0.1",
        listener: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.smtp_host = smtp_host
        self.smtp_port = free_port(smtp_host)
        self.http_port = free_port()
        self.spool_path = workdir / "spool"
        self.socket_path = workdir / "empath.sock"
        self.log_path = workdir / "empath.log"
        self.config_path = workdir / "empath.config.ron"
        base: dict[str, Any] = {
            "hostname": "empath.test",
            "smtp_controller": {
                "listeners": [
                    {
                        "socket": f"{smtp_host}:{self.smtp_port}",
                        "context": {"service": "smtp"},
                        **(listener or {}),
                    }
                ],
                "relay": {"trusted_networks": ["127.0.0.0/8", "::1/128"], "accepted_domains": []},
            },
            "spool": {"type": "File", "path": str(self.spool_path)},
            "delivery": {
                "rate_limit": {"messages_per_second": 100000.0, "burst_size": 100000},
            },
            "control_socket": str(self.socket_path),
            "health": {"listen_address": f"127.0.0.1:{self.http_port}"},
            "log": {"level": "info", "format": "json"},
        }
        self.config = deep_merge(base, overrides or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.env: dict[str, str] = {}  # added to the environment of every start()

    def write_config(self) -> None:
        self.config_path.write_text(to_ron(self.config) + "\n")

    def start(
        self,
        timeout: float = 20.0,
        env: dict[str, str] | None = None,
        wait_path: str = "/health/ready",
    ) -> None:
        """Start and wait until ``wait_path`` answers 200 (readiness, or ``/health/live``
        when the test expects not to be ready); ``env`` adds variables (e.g. SSL_CERT_FILE).
        """
        self.write_config()
        self._log_file = self.log_path.open("ab")
        extra_env = {**self.env, **(env or {})}
        env = dict(os.environ)
        env.pop("EMPATH_CONFIG", None)
        env.update(extra_env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "empath", "--config", str(self.config_path)],
            stdout=self._log_file,
            stderr=self._log_file,
            cwd=self.workdir,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()  # else its file is left open for the garbage collector
                raise RuntimeError(f"empath exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.http_status(wait_path) == 200:
                return
            time.sleep(0.05)
        stop_pid(self.proc)  # a test that fails here may never call stop()
        self._close_log()
        raise RuntimeError(f"empath did not become ready in {timeout}s:\n{self.log_tail()}")

    def http_status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return None

    def http_get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
            return str(r.read().decode())

    def http_json(self, path: str) -> tuple[int, Any]:
        """(status, decoded JSON body) of a GET, whatever the status (503 included)."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return int(r.status), json.loads(r.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return int(exc.code), json.loads(exc.read())

    def stop(self, timeout: float = 40.0) -> int | None:
        if self.proc is None:
            return None
        stop_pid(self.proc, timeout)
        code = self.proc.returncode
        self._close_log()
        return code

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._close_log()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_exit(self, timeout: float = 40.0) -> int:
        """Wait for the process to exit on its own (after a signal); its exit code."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._close_log()
        return code

    def rss_kib(self, field: str = "VmRSS") -> int:
        """A memory figure of the process from /proc/PID/status, in KiB."""
        return proc_status_kib(self.pid, field)

    def _close_log(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(Exception):
                self._log_file.close()
            self._log_file = None

    def log_lines(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def logs(self, text: str, **fields: Any) -> list[dict[str, Any]]:
        """Log lines whose message contains ``text`` and whose fields equal ``fields``."""
        out: list[dict[str, Any]] = []
        for line in self.log_lines():
            f = line.get("fields", {})
            if text in str(f.get("message", "")) and all(f.get(k) == v for k, v in fields.items()):
                out.append(line)
        return out

    def wait_log(
        self, text: str, count: int = 1, timeout: float = 15.0, **fields: Any
    ) -> list[dict[str, Any]]:
        """Poll until ``count`` lines match :meth:`logs`; fail with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.logs(text, **fields)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(found)} of {count} log lines {text!r} {fields} in {timeout}s:\n"
                    + self.log_tail(60)
                )
            time.sleep(0.02)

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- helpers for daemon-level tests (spool inspection, parked domains, raw SMTP) ----------

QUEUED_RE = re.compile(r"queued as ([0-9A-HJKMNP-TV-Z]{26})")


def queued_id(text: str | bytes) -> str:
    """The message id in a ``250 2.0.0 Ok: queued as <ID>`` reply (fails if absent)."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    match = QUEUED_RE.search(text)
    assert match is not None, f"no queue id in {text!r}"
    return match.group(1)


def parked_overrides(*domains: str) -> dict[str, Any]:
    """Delivery settings that keep mail for `domains` in the spool.

    Each domain's MX is a closed local port (the first attempt fails to connect and is
    retried in about a minute) and its rate limit is one token, so nothing is delivered
    or removed while a test runs.
    """
    closed = free_port()
    return {
        "delivery": {
            "domains": {d: {"mx_override": f"127.0.0.1:{closed}"} for d in domains},
            "rate_limit": {
                "domain_limits": {
                    d: {"messages_per_second": 0.0001, "burst_size": 1} for d in domains
                }
            },
        }
    }


def proc_status_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@dataclass(frozen=True, slots=True)
class SpoolContents:
    """What a (stopped) daemon left in its spool, read back with FileSpool."""

    report: RecoveryReport
    messages: dict[str, MessageState]
    bodies: dict[str, bytes]


def read_spool(path: Path) -> SpoolContents:
    """Open the spool at `path` (recovering it like a starting daemon) and read everything."""

    async def go() -> SpoolContents:
        spool = FileSpool(path)
        report = await spool.open()
        try:
            messages = {m.id: m for m in spool.messages()}
            bodies = {i: await spool.read_body(i) for i in messages}
        finally:
            await spool.close()
        return SpoolContents(report, messages, bodies)

    return asyncio.run(go())


def split_received(stored: bytes) -> tuple[bytes, bytes]:
    """Split a stored body into our prepended (folded) Received: header and the rest."""
    assert stored.startswith(b"Received: from "), stored[:80]
    end = 0
    while True:
        end = stored.index(b"\r\n", end) + 2
        if stored[end : end + 1] not in (b"\t", b" "):
            return stored[:end], stored[end:]


def assert_stored(contents: SpoolContents, msg_id: str, sent: bytes) -> MessageState:
    """`msg_id` is in the spool; its body is our Received: header (naming the id) + `sent`."""
    assert msg_id in contents.messages, f"acknowledged message {msg_id} is not in the spool"
    header, rest = split_received(contents.bodies[msg_id])
    assert sent == rest
    assert f" id {msg_id}".encode() in header
    msg = contents.messages[msg_id]
    assert len(contents.bodies[msg_id]) == msg.envelope.size
    return msg


class RawSmtp:
    """A plain-socket SMTP client for pipelining, BDAT and exact byte sequences."""

    def __init__(self, host: str, port: int, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """The next (possibly multi-line) reply: (code, text of all lines joined by \\n)."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self._buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; partial reply {lines!r}")
                self._buf += chunk
            line, self._buf = self._buf.split(b"\r\n", 1)
            lines.append(line[4:].decode(errors="replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def replies(self, n: int) -> list[tuple[int, str]]:
        return [self.reply() for _ in range(n)]

    def codes(self, n: int) -> list[int]:
        return [code for code, _ in self.replies(n)]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSmtp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- helpers for delivery tests: submitting mail, peers in a thread, log timestamps --------


def log_time(line: dict[str, Any]) -> float:
    """A JSON log line's timestamp as seconds since the epoch."""
    from datetime import datetime

    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


class Submitter:
    """An SMTP client session to the daemon: ``send()`` returns the queue id of each message."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
        import smtplib

        self.smtp = smtplib.SMTP(host, port, timeout=timeout)
        self.smtp.ehlo("client.test")

    def send(self, sender: str, recipients: list[str] | tuple[str, ...], body: bytes | str) -> str:
        if isinstance(body, str):
            body = body.replace("\n", "\r\n").encode()
        code, text = self.smtp.mail(sender)
        assert 250 == code, text
        for rcpt in recipients:
            code, text = self.smtp.rcpt(rcpt)
            assert 250 == code, text
        code, text = self.smtp.data(body)
        assert 250 == code, text
        return queued_id(text)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.smtp.quit()
        self.smtp.close()

    def __enter__(self) -> Submitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def submit(
    port: int, sender: str, recipients: list[str] | tuple[str, ...], body: bytes | str
) -> str:
    """Send one message to the daemon in its own session; its queue id."""
    with Submitter(port) as s:
        return s.send(sender, recipients, body)


class ThreadedPeer:
    """A :class:`ScriptedPeer` served by an event loop in a background thread.

    For synchronous tests that drive the daemon: ``events()`` are the peer's
    session/transaction records with the wall-clock time they happened, and
    ``transactions()``/``sessions()`` are snapshots taken on the peer's loop.
    Binding 127.0.0.x:25 (a stand-in MX) needs root.
    """

    def __init__(
        self,
        script: Any = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: Any = None,
    ) -> None:
        import threading

        from empath.testing.scripted_peer import ScriptedPeer

        events: list[tuple[float, dict[str, Any]]] = []

        class _TimedPeer(ScriptedPeer):
            def _record(self, event: dict[str, Any]) -> None:
                events.append((time.time(), event))

        self._events = events
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.peer = _TimedPeer(script, host=host, port=port, ssl_context=ssl_context)
        self.host = host

    def start(self) -> ThreadedPeer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.peer.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.peer.stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> ThreadedPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.peer.port

    @property
    def address(self) -> str:
        """``host:port`` for an ``mx_override``."""
        return f"{self.host}:{self.port}"

    def _call(self, fn: Any) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def events(self, kind: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        evs = self._call(lambda: list(self._events))
        return [e for e in evs if kind is None or e[1]["event"] == kind]

    def transactions(self) -> list[Any]:
        return list(self._call(lambda: list(self.peer.transactions)))

    def delivered(self) -> list[Any]:
        """Transactions answered 2xx at the end of DATA."""
        return list(self._call(lambda: list(self.peer.delivered)))

    def sessions(self) -> list[Any]:
        return list(self._call(lambda: list(self.peer.sessions)))

    def max_concurrent_sessions(self) -> int:
        return int(self._call(lambda: self.peer.max_concurrent_sessions))

    def wait_delivered(self, n: int, timeout: float = 15.0) -> list[Any]:
        """Poll until at least ``n`` transactions were accepted; fail otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.delivered()
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"peer {self.address} accepted {len(got)} of {n} messages in {timeout}s"
                )
            time.sleep(0.02)
