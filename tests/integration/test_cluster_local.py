"""`make cluster` (scripts/cluster.py): a local redis-server and two nodes sharing one SMTP
port; the systemd template unit for N nodes per host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.ctl import ctl_env
from tests.daemon import submit
from tests.helpers import free_port, require_tool, wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_the_local_cluster_script_starts_two_nodes_on_one_port_and_stops_them(
    tmp_path: Path,
) -> None:
    """Both nodes register, mail sent to the shared port is taken by both, Ctrl-C stops all."""
    require_tool("redis-server")
    smtp, http, redis = free_port(), free_port(), free_port()
    out = (tmp_path / "out.txt").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "cluster.py"), "--dir", str(tmp_path / "c"),
         "--smtp-port", str(smtp), "--http-port", str(http), "--redis-port", str(redis)],
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: b"cluster: ready" in (tmp_path / "out.txt").read_bytes(), timeout=60,
                 what="the cluster")  # fmt: skip
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
