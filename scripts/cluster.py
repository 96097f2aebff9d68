"""Start a local Empath cluster to try cluster mode (`make cluster`): a redis-server and
N nodes sharing one SMTP port (reuse_port), each with its own spool, control socket and
HTTP port, configured from deploy/cluster/empath-node.config.ron.in.

    .venv/bin/python scripts/cluster.py [--nodes 2] [--dir ./cluster] [--smtp-port 1025]
                                        [--http-port 8080] [--redis-port 6390]

Node N's files are under DIR/nodeN (config, spool, empath.sock, empath.log); its HTTP
port is --http-port + N - 1.  Ctrl-C (or SIGTERM) stops every node, then Redis, each
by its PID.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "cluster" / "empath-node.config.ron.in"


def wait(
    predicate: Callable[[], bool],
    what: str,
    proc: subprocess.Popen[bytes],
    log: Path | None = None,
    timeout: float = 60.0,
) -> None:
    """Poll predicate; fail at once, with the end of its log, if proc exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log is not None else ""
            raise SystemExit(
                f"cluster: exited with code {proc.returncode} while waiting for {what}\n{tail}"
            )
        if time.monotonic() > deadline:
            raise SystemExit(f"cluster: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health/ready", timeout=1) as r:
            return int(r.status) == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen[bytes], timeout: float = 40.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--dir", type=Path, default=Path("cluster"))
    p.add_argument("--smtp-port", type=int, default=1025)
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--redis-port", type=int, default=6390)
    ns = p.parse_args(argv)
    redis_exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(redis_exe):
        print("cluster: redis-server is not installed (apt-get install redis-server)")
        return 1
    base = ns.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    redis = subprocess.Popen(
        [redis_exe, "--port", str(ns.redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(base), "--logfile", str(base / "redis.log")],
    )  # fmt: skip
    try:
        wait(lambda: redis_answers(ns.redis_port), "redis-server", redis, base / "redis.log")
        url = f"redis://127.0.0.1:{ns.redis_port}/0"
        for n in range(1, ns.nodes + 1):
            node_dir = base / f"node{n}"
            node_dir.mkdir(exist_ok=True)
            http = ns.http_port + n - 1
            config = node_dir / "empath.config.ron"
            text = TEMPLATE.read_text()
            for key, value in (("@N@", str(n)), ("@SMTP@", str(ns.smtp_port)),
                               ("@HTTP@", str(http)), ("@DIR@", str(node_dir)),
                               ("@REDIS@", url)):  # fmt: skip
                text = text.replace(key, value)
            config.write_text(text)
            log_path = node_dir / "empath.log"
            with log_path.open("ab") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "empath", "--config", str(config)],
                        stdout=log,
                        stderr=log,
                        cwd=node_dir,
                    )
                )
            wait(functools.partial(ready, http), f"node{n} to be ready", procs[-1], log_path)
        print(f"cluster: {ns.nodes} nodes on 127.0.0.1:{ns.smtp_port} (reuse_port), Redis {url}")
        for n in range(1, ns.nodes + 1):
            node_dir = base / f"node{n}"
            print(f"  node{n}: pid {procs[n - 1].pid}, http 127.0.0.1:{ns.http_port + n - 1}, "
                  f"empathctl --socket {node_dir}/empath.sock cluster status, "
                  f"log {node_dir}/empath.log")  # fmt: skip
        print("cluster: ready; Ctrl-C stops it", flush=True)
        while not stopping:
            if any(proc.poll() is not None for proc in procs):
                print("cluster: a node exited; stopping the others")
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            stop(proc)
        stop(redis)
    print("cluster: stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
