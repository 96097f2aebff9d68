"""Shared pieces of the benchmarks: tools, the Postfix peer, smtp-source/smtp-sink runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# shared/ sits next to the repository (or next to the directory of its worktrees)
POSTFIX_PEER = next(
    (
        p.resolve()
        for p in (
            ROOT.parent / "shared" / "tools" / "postfix-peer",
            ROOT.parent.parent / "shared" / "tools" / "postfix-peer",
        )
        if p.exists()
    ),
    ROOT.parent / "shared" / "tools" / "postfix-peer",
)


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        sys.exit(f"bench: {name} is not installed (run `make test` or `make bench`)")
    return path


# Where the load tools (smtp-source, smtp-sink) run: every CPU unless a bench is told
# otherwise (``set_client_cpus``, e.g. bench/dkim --client-cpus): on a 2-vCPU machine
# the scheduler tends to wake them on the CPU of the event loop that woke them.
_CLIENT_CPUS: str | None = None


def set_client_cpus(cpus: str | None) -> None:
    """Run the load tools pinned to ``cpus`` (a taskset list such as "1"); None: anywhere."""
    global _CLIENT_CPUS
    _CLIENT_CPUS = cpus or None


def client_command(argv: list[str]) -> list[str]:
    return argv if _CLIENT_CPUS is None else ["taskset", "-c", _CLIENT_CPUS, *argv]


def smtp_source(
    port: int,
    messages: int,
    sessions: int,
    size: int,
    domain: str,
    host: str = "127.0.0.1",
    extra: list[str] | None = None,
) -> float:
    """Run smtp-source; returns elapsed seconds."""
    args = [
        tool("smtp-source"),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        f"sender@{domain}",
        "-t",
        f"rcpt@{domain}",
        *(extra or []),
        f"{host}:{port}",
    ]
    start = time.monotonic()
    subprocess.run(client_command(args), check=True, stdout=subprocess.DEVNULL)
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> float:
    """CPU seconds of the process's main (event-loop) thread."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def switches(pid: int) -> int:
    """Context switches (voluntary and not) of every thread of the process so far."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    n += int(line.split()[1])
    return n


def wait_spare_segment(spool: Path, timeout: float = 60.0) -> bool:
    """After a daemon's start: wait until its pre-formatted spare segment is ready
    (spool/preformat.py), so a measurement sees the steady state, not the one-off
    formatting of the first spare.  False at once if the daemon makes none (an older
    build, or ``spool.preformat: false``)."""
    log_dir = spool / "log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [p.name for p in log_dir.iterdir()] if log_dir.is_dir() else []
        if any(n.startswith("next-") and n.endswith(".pre") for n in names):
            return True
        if not any(n.startswith("next-") for n in names):
            return False
        time.sleep(0.05)
    return False


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_interval(
    values: list[float], level: float = 0.90, stat: Callable[[list[float]], float] = median
) -> tuple[float, float]:
    """A percentile-bootstrap interval of ``stat`` (the median; fixed seed: the same
    figures give the same interval): how far the pairs' noise could move the verdict."""
    import random

    rng = random.Random(15)
    got = sorted(stat(rng.choices(values, k=len(values))) for _ in range(2000))
    cut = int(len(got) * (1 - level) / 2)
    return got[cut], got[-cut - 1]


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


class SmtpSinkProc:
    """Postfix smtp-sink with -c counters, read from its stdout (stopped by PID)."""

    def __init__(self, port: int, backlog: int = 1024) -> None:
        import re
        import threading

        self.port = port
        self._re = re.compile(rb"mesg=(\d+)")
        self.messages = 0
        self.proc = subprocess.Popen(
            client_command(
                [tool("smtp-sink"), "-u", "nobody", "-c", f"127.0.0.1:{port}", str(backlog)]
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                return
            buf = (buf + chunk)[-256:]
            found = self._re.findall(buf)
            if found:
                self.messages = int(found[-1])

    def wait_messages(self, n: int, timeout: float) -> float | None:
        """Seconds until the sink counted n messages (None on timeout)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.messages >= n:
                return time.monotonic()
            time.sleep(0.005)
        return None

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


async def paced_load(
    port: int,
    rate: float,
    seconds: float,
    domain: str,
    connections: int = 10,
    size: int = 1000,
    waits: list[float] | None = None,
) -> int:
    """Offer `rate` msg/s for `seconds` over persistent SMTP connections. Returns 250s seen;
    ``waits`` gets, per 250, the seconds from the end of the data to the reply."""
    import asyncio

    body = (b"Subject: latency probe\r\n\r\n" + b"x" * 70 + b"\r\n") * max(1, size // 96)
    total = int(rate * seconds)
    interval = 1.0 / rate
    loop = asyncio.get_running_loop()
    start = loop.time()
    queue: asyncio.Queue[int] = asyncio.Queue()
    ok = 0

    async def reply(reader: asyncio.StreamReader) -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return line

    async def worker() -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reply(reader)
        writer.write(b"EHLO load.test\r\n")
        await reply(reader)
        while True:
            i = await queue.get()
            if i < 0:
                break
            writer.write(
                f"MAIL FROM:<load@{domain}>\r\nRCPT TO:<r{i}@{domain}>\r\nDATA\r\n".encode()
            )
            for _ in range(3):
                await reply(reader)
            writer.write(body + b".\r\n")
            sent = loop.time()
            if (await reply(reader)).startswith(b"250"):
                ok += 1
                if waits is not None:
                    waits.append(loop.time() - sent)
        writer.write(b"QUIT\r\n")
        await writer.drain()
        writer.close()

    tasks = [asyncio.create_task(worker()) for _ in range(connections)]
    for i in range(total):
        delay = start + i * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(i)
    for _ in tasks:
        queue.put_nowait(-1)
    await asyncio.gather(*tasks)
    return ok


def percentiles(values: list[float], ps: tuple[float, ...] = (50, 95, 99)) -> list[float]:
    if not values:
        return [float("nan")] * len(ps)
    s = sorted(values)
    return [s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] for p in ps]


def compiled_build(env: dict[str, str] | None = None) -> str:
    """Whether a daemon started with ``env`` (default: ours) runs the mypyc-compiled hot
    path: `make bench` puts the build of `make native` first on PYTHONPATH."""
    probe = "import empath.smtp.server as m; print(m.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    return f"compiled ({Path(out).parent.parent.parent})" if out.endswith(".so") else "pure Python"


RESULTS = ROOT / "bench" / "results"


def write_results(name: str, data: dict[str, object]) -> Path:
    """Keep a benchmark's figures as bench/results/<name>.json (read by bench/charts.py)."""
    import json

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=1) + "\n")
    return path


# --- the CPU-per-message guard (issue 20 #5) --------------------------------------------
# docs/bench.md keeps the last recorded CPU per message of ingest and relay in a table
# between two markers; bench/ingest and bench/relay print every run's figure next to it,
# so a change that costs CPU on the hot path shows in the next `make bench`.

BENCH_DOC = ROOT / "docs" / "bench.md"
_BEGIN = "<!-- cpu-per-message:begin -->"
_END = "<!-- cpu-per-message:end -->"


def recorded_cpu(doc: Path = BENCH_DOC) -> dict[str, tuple[float, str]]:
    """``{benchmark: (µs per message, "when, build")}`` from docs/bench.md's table rows
    ``| ingest | 573 | 2026-12-07 | compiled | how |`` between the markers."""
    text = doc.read_text()
    try:
        table = text[text.index(_BEGIN) + len(_BEGIN) : text.index(_END)]
    except ValueError:
        raise ValueError(f"{doc}: no CPU-per-message table ({_BEGIN} ... {_END})") from None
    out: dict[str, tuple[float, str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[1].replace(",", "").replace(".", "", 1).isdigit():
            continue  # the header, its rule, prose
        out[cells[0]] = (float(cells[1].replace(",", "")), f"{cells[2]}, {cells[3]}")
    return out


def cpu_vs_recorded(name: str, cpu_us: float, doc: Path = BENCH_DOC) -> str:
    """``CPU 512 µs/msg (recorded 573 µs/msg on 2026-12-07, compiled: -10.6 %)``."""
    try:
        recorded = recorded_cpu(doc).get(name)
    except (OSError, ValueError) as exc:
        return f"CPU {cpu_us:.0f} µs/msg (no recorded figure: {exc})"
    if recorded is None:
        return f"CPU {cpu_us:.0f} µs/msg (no recorded figure for {name!r} in {doc.name})"
    base, when = recorded
    change = (cpu_us / base - 1) * 100
    return f"CPU {cpu_us:.0f} µs/msg (recorded {base:.0f} µs/msg on {when}: {change:+.1f} %)"
