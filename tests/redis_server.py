"""A real `redis-server` on loopback for cluster tests, started and stopped by its PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers import free_port, require_tool, stop_pid


class RedisServer:
    """One redis-server process without persistence (a restart starts empty)."""

    def __init__(self, workdir: Path, port: int | None = None, password: str = "") -> None:
        self.workdir = workdir
        self.password = password  # requirepass; the URL then carries it
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = workdir / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        exe = require_tool("redis-server")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(self._log),
             "--protected-mode", "no",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self._log.read_text(errors='replace')}")
            with contextlib.suppress(OSError):
                if self.command("PING") == "+PONG":
                    return self
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING")

    def command(self, *args: str) -> str:
        """Send one command in RESP and return the first reply line (enough for tests)."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            data = b""
            if self.password:
                auth = f"*2\r\n$4\r\nAUTH\r\n${len(self.password)}\r\n{self.password}\r\n"
                s.sendall(auth.encode())
                while b"\r\n" not in data:
                    data += s.recv(65536)
                data = data[data.index(b"\r\n") + 2 :]  # +OK
            s.sendall(payload.encode())
            while not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            if data.startswith(b"$"):  # bulk string: read the body too
                size = int(data[1 : data.index(b"\r\n")])
                while len(data) < data.index(b"\r\n") + 2 + size + 2 and size >= 0:
                    data += s.recv(65536)
                return data[data.index(b"\r\n") + 2 :].decode(errors="replace").rstrip("\r\n")
            return data.decode(errors="replace").rstrip("\r\n")

    def info(self, section: str) -> str:
        return self.command("INFO", section)

    def kill(self) -> None:
        """SIGKILL (the crash case)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
