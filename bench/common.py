"""Shared pieces of the benchmarks: tools, the Postfix peer, smtp-source/smtp-sink runs."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POSTFIX_PEER = (ROOT.parent / "shared" / "tools" / "postfix-peer").resolve()


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        sys.exit(f"bench: {name} is not installed (run `make test` or `make bench`)")
    return path


def smtp_source(port: int, messages: int, sessions: int, size: int, domain: str,
                host: str = "127.0.0.1", extra: list[str] | None = None) -> float:
    """Run smtp-source; returns elapsed seconds."""
    args = [tool("smtp-source"), "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", f"sender@{domain}", "-t", f"rcpt@{domain}", *(extra or []), f"{host}:{port}"]
    start = time.monotonic()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def postfix_peer(*args: str) -> str:
    out = subprocess.run([str(POSTFIX_PEER), *args], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def peak_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), {os.uname().sysname} {os.uname().release}"
