"""Run the real `empath` daemon in a subprocess for integration tests and benchmarks.

The config is written from a Python dict (rendered as RON), the process is stopped by
its PID, and its JSON log lines can be read back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import free_port, stop_pid


def to_ron(value: Any, indent: int = 0) -> str:
    """Render plain Python values as RON: dicts as maps with string keys."""
    pad = "  " * (indent + 1)
    end = "  " * indent
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        return "[\n" + "".join(f"{pad}{to_ron(v, indent + 1)},\n" for v in value) + f"{end}]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = "".join(
            f"{pad}{json.dumps(str(k))}: {to_ron(v, indent + 1)},\n" for k, v in value.items()
        )
        return "{\n" + items + f"{end}}}"
    raise TypeError(f"cannot render {type(value).__name__} as RON")


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

    def __init__(self, workdir: Path, overrides: dict[str, Any] | None = None,
                 smtp_host: str = "127.0.0.1", listener: dict[str, Any] | None = None) -> None:
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
                    {"socket": f"{smtp_host}:{self.smtp_port}", "context": {"service": "smtp"},
                     **(listener or {})}
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

    def write_config(self) -> None:
        self.config_path.write_text("Empath " + to_ron(self.config) + "\n")

    def start(self, timeout: float = 20.0) -> None:
        self.write_config()
        self._log_file = self.log_path.open("ab")
        env = dict(os.environ)
        env.pop("EMPATH_CONFIG", None)
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
                raise RuntimeError(f"empath exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.http_status("/health/ready") == 200:
                return
            time.sleep(0.05)
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

    def _close_log(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(Exception):
                self._log_file.close()
            self._log_file = None

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
