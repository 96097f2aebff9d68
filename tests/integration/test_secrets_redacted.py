"""The Redis password is never printed (issue 14, defect 10).

``empathctl cluster status`` and ``system status`` showed ``redis_url`` verbatim, and
``empath --check-config`` - the shipped unit's ExecStartPre, so journald at every
start - printed the effective config with it.  Against a real redis-server that
requires the password, nothing an operator or journald sees carries it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.ctl import ctl, ctl_env
from tests.daemon import Daemon, deep_merge, to_ron
from tests.helpers import wait_for
from tests.redis_server import RedisServer

PASSWORD = "s3cret-Pa55word"
NEW_PASSWORD = "other-Pa55word"


def test_the_redis_password_is_printed_nowhere(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", password=PASSWORD) as redis:
        daemon = Daemon(tmp_path / "node", {"cluster": {"redis_url": redis.url, "node_id": "n1"}})
        with daemon:
            wait_for(
                lambda: '"redis_up": true' in ctl(daemon, "--json", "cluster", "status").stdout,
                what="the node to reach Redis with its password",
            )
            outputs = [
                ctl(daemon, "cluster", "status"),
                ctl(daemon, "--json", "cluster", "status"),
                ctl(daemon, "system", "status"),
                ctl(daemon, "--json", "system", "status"),
            ]
            plain = outputs[0].stdout
            assert "redis://:REDACTED@127.0.0.1:" in plain
            assert "Redis up" in plain
            check = subprocess.run(
                [sys.executable, "-m", "empath", "--check-config", str(daemon.config_path)],
                capture_output=True, text=True, check=False, env=ctl_env(),
            )  # fmt: skip
            assert 0 == check.returncode, check.stderr
            assert "redis://:REDACTED@127.0.0.1:" in check.stdout
            # a changed password: `config check` says so without showing either
            daemon.config = deep_merge(
                daemon.config, {"cluster": {"redis_url": redis.url.replace(PASSWORD, NEW_PASSWORD)}}
            )
            daemon.config_path.write_text(to_ron(daemon.config) + "\n")
            checked = ctl(daemon, "--json", "config", "check")
            changes = json.loads(checked.stdout)["changes"]
            assert any("cluster.redis_url" in c and "(password changed)" in c for c in changes)
            outputs += [checked, ctl(daemon, "config", "check"), check]
        log = daemon.log_path.read_text()
    for out in outputs:
        assert PASSWORD not in out.stdout + out.stderr
        assert NEW_PASSWORD not in out.stdout + out.stderr
    assert PASSWORD not in log
