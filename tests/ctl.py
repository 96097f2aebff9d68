"""Running `empathctl` (the installed script) against a test daemon, by name, as operators do."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.daemon import Daemon

BIN_DIR = str(Path(sys.executable).parent)
LIST_LINE = re.compile(
    r"^id: (?P<id>[0-9A-HJKMNP-TV-Z]{26}) domain: (?P<domain>[^,\s]+), "
    r"status: (?P<status>[a-z_]+), attempts: (?P<attempts>\d+), "
    r"age: (?P<age>\d+[smhd][0-9]*[smh]?), "
    r"next: (?P<next>-|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ), "
    r"from: (?P<sender>\S+), rcpts: (?P<rcpts>\d+)(?:, error: (?P<error>\S+))?$"
)


def ctl_env(daemon: Daemon | None = None, **extra: str) -> dict[str, str]:
    """The environment of an operator's shell: empathctl on PATH, no inherited control vars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMPATH_")}
    env["PATH"] = BIN_DIR + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    env.update(extra)
    return env


def ctl(
    daemon: Daemon, *args: str, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`empathctl ARGS` run in the daemon's directory (so ./empath.config.ron finds the socket)."""
    return subprocess.run(
        ["empathctl", *args],
        check=False,
        cwd=daemon.workdir,
        env=env or ctl_env(daemon),
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def sh(
    daemon: Daemon, script: str, env: dict[str, str] | None = None, pipefail: bool = False
) -> subprocess.CompletedProcess[str]:
    """A runbook line, verbatim, through `bash -c` in the daemon's directory."""
    return subprocess.run(
        ["bash", "-c", ("set -o pipefail\n" if pipefail else "") + script],
        check=False,
        cwd=daemon.workdir,
        env=env or ctl_env(daemon),
        capture_output=True,
        text=True,
        timeout=120,
    )
