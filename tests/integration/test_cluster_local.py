"""`make cluster` (scripts/cluster.py): a local redis-server and two nodes sharing one SMTP
port; the systemd template unit for N nodes per host."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.ctl import ctl_env
from tests.daemon import submit
from tests.helpers import free_port, free_ports, require_tool, wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_the_local_cluster_script_starts_two_nodes_on_one_port_and_stops_them(
    tmp_path: Path,
) -> None:
    """Both nodes register, mail sent to the shared port is taken by both, Ctrl-C stops all."""
    require_tool("redis-server")
    # node N listens on http + N - 1: both ports must be free, not just the first
    smtp, http, redis = free_port(), free_ports(2), free_port()
    out = (tmp_path / "out.txt").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "cluster.py"), "--dir", str(tmp_path / "c"),
         "--smtp-port", str(smtp), "--http-port", str(http), "--redis-port", str(redis)],
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def started() -> bool:
            text = (tmp_path / "out.txt").read_bytes()
            assert proc.poll() is None or b"cluster: ready" in text, _story(tmp_path)
            return b"cluster: ready" in text

        wait_for(started, timeout=200, what="the cluster")
        sock = tmp_path / "c" / "node1" / "empath.sock"

        def nodes() -> int:
            r = subprocess.run(
                ["empathctl", "--socket", str(sock), "--json", "cluster", "status"],
                env=ctl_env(), capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            return len(json.loads(r.stdout)["nodes"])

        wait_for(lambda: nodes() == 2, what="two nodes in cluster status")
        for _ in range(30):
            submit(smtp, "a@x.org", ["b@parked.test"], "Subject: t\n\nhi\n")
        logs = [tmp_path / "c" / f"node{n}" / "empath.log" for n in (1, 2)]

        def received() -> list[int]:
            return [p.read_text(errors="replace").count('"Message received"') for p in logs]

        wait_for(lambda: sum(received()) == 30, what="30 messages received")
        assert all(n > 0 for n in received()), received()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        code = proc.wait(90)
        out.close()
    assert 0 == code
    assert b"cluster: stopped" in (tmp_path / "out.txt").read_bytes()


def _story(tmp_path: Path) -> str:
    """What the script and each node printed, for a failure message."""
    files = [tmp_path / "out.txt", *sorted(tmp_path.glob("c/node*/empath.log"))]
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in files)


def test_a_node_that_cannot_start_stops_the_script_at_once_with_its_log(tmp_path: Path) -> None:
    """Node 2's HTTP port is taken: the script says node 2 exited, shows why, and stops node 1
    and Redis, instead of waiting out its timeout (how CI lost a run without a clue)."""
    require_tool("redis-server")
    smtp, http, redis = free_port(), free_ports(2), free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", http + 1))
        squatter.listen()
        r = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "cluster.py"), "--dir", str(tmp_path / "c"),
             "--smtp-port", str(smtp), "--http-port", str(http), "--redis-port", str(redis)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert r.returncode != 0
    assert "exited with code" in r.stderr and "node2 to be ready" in r.stderr, r.stderr
    assert str(http + 1) in r.stderr, r.stderr  # the node's own complaint, from its log
    # the old script waited out its timeout for a node that was already gone
    with socket.socket() as probe:  # and Redis was stopped on the way out
        assert probe.connect_ex(("127.0.0.1", redis)) != 0


def test_the_systemd_template_runs_one_node_per_instance() -> None:
    """empath@.service: per-instance config, spool and runtime dir; SIGHUP reload."""
    unit = (ROOT / "deploy" / "systemd" / "empath@.service").read_text()
    assert "--config /etc/empath/empath-%i.config.ron" in unit
    assert "StateDirectory=empath/%i" in unit and "RuntimeDirectory=empath-%i" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "LimitNOFILE=65536" in unit
    analyze = require_tool("systemd-analyze")
    r = subprocess.run(
        [analyze, "verify", "--man=no", str(ROOT / "deploy" / "systemd" / "empath@.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    bad = [ln for ln in r.stderr.splitlines() if "empath@" in ln and "Unknown" in ln]
    assert [] == bad, r.stderr
