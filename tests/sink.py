"""Postfix ``smtp-sink`` as a test destination: start, count, read dumps, stop by PID.

Usage::

    with SmtpSink(dump=True) as sink:          # listens on 127.0.0.1:sink.port
        ... deliver to sink.port ...
        sink.wait_messages(3)
        msgs = sink.messages()                 # envelope + byte-exact body (CRLF restored)
        assert 1 == sink.counters().sessions   # sessions *ended* so far

Notes on smtp-sink (Postfix 3.x):

* as root it needs ``-u nobody``; the dump directory is therefore created under
  /tmp world-writable (pytest's tmp_path is not traversable by nobody);
* ``-c`` prints ``sess=N quit=N mesg=N`` counters on stdout, updated when a
  session ends, on QUIT and on each "."; ``sess`` counts *ended* sessions;
* ``-M N`` exits before answering the Nth DATA, so counting uses ``-c``;
* the dump (``-d dir/%M.``) has LF line ends, X-* envelope headers, a 3-line
  Received: header, the dot-unstuffed content and one extra empty line.

Readiness is detected from /proc/net/tcp (a probe connection would count as a
session).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import pytest

from tests.helpers import free_port, require_tool, stop_pid

_COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


@dataclass(frozen=True, slots=True)
class SinkCounters:
    sessions: int  # ended sessions
    quits: int
    messages: int


@dataclass(frozen=True, slots=True)
class SinkMessage:
    """One dumped transaction."""

    client_addr: str
    helo: str
    mail_args: str  # "<sender> SIZE=123 ..."
    rcpt_args: tuple[str, ...]  # "<rcpt>" each, in order sent
    body: bytes  # content as received, CRLF line ends restored, dot-unstuffed
    path: Path

    @property
    def sender(self) -> str:
        return self.mail_args.split(" ", 1)[0].strip("<>")

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(r.split(" ", 1)[0].strip("<>") for r in self.rcpt_args)


def parse_dump(path: Path) -> SinkMessage:
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    fields: dict[bytes, list[str]] = {}
    i = 0
    while i < len(lines) and not lines[i].startswith(b"Received:"):
        name, _, value = lines[i].partition(b": ")
        fields.setdefault(name, []).append(value.decode("utf-8", "surrogateescape"))
        i += 1
    i += 3  # the Received: header is three lines
    content = b"\n".join(lines[i:])
    # The dump ends with the content's last LF plus one empty line.
    if content.endswith(b"\n\n"):
        content = content[:-1]
    elif content == b"\n":
        content = b""
    return SinkMessage(
        client_addr=fields.get(b"X-Client-Addr", [""])[0],
        helo=fields.get(b"X-Helo-Args", [""])[0],
        mail_args=fields.get(b"X-Mail-Args", [""])[0],
        rcpt_args=tuple(fields.get(b"X-Rcpt-Args", [])),
        body=content.replace(b"\n", b"\r\n"),
        path=path,
    )


def _listening(port: int) -> bool:
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f)
                for row in f:
                    parts = row.split()
                    if parts[1].endswith(want) and parts[3] == "0A":
                        return True
        except OSError:
            continue
    return False


class SmtpSink:
    """One smtp-sink process on 127.0.0.1 (see module docstring)."""

    def __init__(
        self,
        *,
        port: int | None = None,
        dump: bool = False,
        soft_reject: Sequence[str] = (),  # -r: e.g. ("RCPT",) → 450
        hard_reject: Sequence[str] = (),  # -f: e.g. ("MAIL",) → 500
        disconnect: Sequence[str] = (),  # -q: drop after these commands
        reply_421: Sequence[str] = (),  # -Q: 421 and close after these commands
        delays: Sequence[str] = (),  # -W "command:delay[:odds]"
        hostname: str = "sink.test",
        pipelining: bool = True,
        extra_args: Sequence[str] = (),
        backlog: int = 256,
    ) -> None:
        self.port = port or free_port()
        self.dump = dump
        self._dir = Path(tempfile.mkdtemp(prefix="empath-sink-"))
        self._dir.chmod(0o777)  # smtp-sink writes dumps as nobody
        self.dump_dir = self._dir / "dump"
        self._stdout_path = self._dir / "counters.out"
        args = [require_tool("smtp-sink"), "-u", "nobody", "-c", "-h", hostname]
        if dump:
            args += ["-d", f"{self.dump_dir}/%M."]
        if soft_reject:
            args += ["-r", ",".join(soft_reject)]
        if hard_reject:
            args += ["-f", ",".join(hard_reject)]
        if disconnect:
            args += ["-q", ",".join(disconnect)]
        if reply_421:
            args += ["-Q", ",".join(reply_421)]
        for d in delays:
            args += ["-W", d]
        if not pipelining:
            args.append("-p")
        args += [*extra_args, f"127.0.0.1:{self.port}", str(backlog)]
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self._stdout: IO[bytes] | None = None

    # --- lifecycle -----------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> SmtpSink:
        out = self._stdout_path.open("wb")
        self._stdout = out
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            if self.proc.poll() is not None:
                pytest.fail(f"smtp-sink exited: {self._stdout_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                pytest.fail(f"smtp-sink did not listen on {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None
        if self._stdout is not None:
            self._stdout.close()
            self._stdout = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- observations ------------------------------------------------------------------

    def counters(self) -> SinkCounters:
        """The latest ``sess= quit= mesg=`` counters smtp-sink printed."""
        try:
            data = self._stdout_path.read_bytes()
        except FileNotFoundError:
            return SinkCounters(0, 0, 0)
        found = _COUNTERS.findall(data)
        if not found:
            return SinkCounters(0, 0, 0)
        s, q, m = found[-1]
        return SinkCounters(int(s), int(q), int(m))

    def message_count(self) -> int:
        """Messages completed ("." received), whatever the reply."""
        return self.counters().messages

    def session_count(self) -> int:
        """Sessions that have ended so far."""
        return self.counters().sessions

    def wait_messages(self, n: int, timeout: float = 10.0) -> SinkCounters:
        """Wait until at least n messages arrived (and, with dump=True, were written)."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.counters()
            if c.messages >= n and (not self.dump or len(self.dump_files()) >= n):
                return c
            if time.monotonic() > deadline:
                pytest.fail(f"smtp-sink got {c.messages} of {n} messages in {timeout}s")
            time.sleep(0.02)

    def wait_sessions(self, n: int, timeout: float = 10.0) -> SinkCounters:
        deadline = time.monotonic() + timeout
        while True:
            c = self.counters()
            if c.sessions >= n:
                return c
            if time.monotonic() > deadline:
                pytest.fail(f"smtp-sink saw {c.sessions} of {n} sessions end in {timeout}s")
            time.sleep(0.02)

    def dump_files(self) -> list[Path]:
        if not self.dump_dir.is_dir():
            return []
        files = [p for p in self.dump_dir.iterdir() if p.is_file()]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def messages(self) -> list[SinkMessage]:
        """Every dumped message (dump=True), oldest first."""
        return [parse_dump(p) for p in self.dump_files()]
