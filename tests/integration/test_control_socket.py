"""The control socket of a live daemon: creation mode, ownership of the path, and the
basic commands through the installed `empathctl`."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from empath.control.client import CommandFailed, ControlClient, SocketChoice
from tests.ctl import LIST_LINE, ctl, ctl_env, sh
from tests.daemon import Daemon, Submitter, parked_overrides, submit
from tests.helpers import wait_for

SENDER = "ops@origin.test"
BODY = "From: ops@origin.test\nSubject: control\n\nhello\n"


def test_ping_status_and_list_answer_from_a_live_daemon(tmp_path: Path) -> None:
    with Daemon(tmp_path / "d", parked_overrides("parked.test")) as d:
        ids = [submit(d.smtp_port, SENDER, [f"u{i}@parked.test"], BODY) for i in range(3)]

        ping = ctl(d, "system", "ping")
        assert 0 == ping.returncode, ping.stderr
        assert f"pid {d.pid}" in ping.stdout

        status = ctl(d, "system", "status", "--json")
        assert 0 == status.returncode, status.stderr
        data = json.loads(status.stdout)
        assert d.pid == data["pid"]
        queued = ("pending", "in_progress", "retry")
        assert 3 == sum(data["queue"][s] for s in queued)
        assert str(d.config_path) == data["config"]["file"]

        listing = ctl(d, "queue", "list")
        assert 0 == listing.returncode, listing.stderr
        lines = listing.stdout.splitlines()
        matches = [LIST_LINE.match(line) for line in lines]
        assert all(matches), lines
        assert ids == [m["id"] for m in matches if m]
        assert {"parked.test"} == {m["domain"] for m in matches if m}
        assert {m["status"] for m in matches if m} <= set(queued)

        oldest = ctl(d, "queue", "list", "--limit", "1", "--json")
        assert [ids[0]] == [json.loads(line)["id"] for line in oldest.stdout.splitlines()]

        # The plain lines are rendered by the daemon (format "lines"); rows stay the default.
        with ControlClient(SocketChoice(str(d.socket_path), "test")) as client:
            rows = [r for chunk in client.stream("queue.list", {}) for r in chunk]
            assert ids == [r[0] for r in rows]
            rendered = [x for c in client.stream("queue.list", {"format": "lines"}) for x in c]
            assert ids == [LIST_LINE.match(x)["id"] for x in rendered]  # type: ignore[index]
            assert all(x.endswith("\n") and x.count("\n") == 1 for x in rendered)
            with pytest.raises(CommandFailed) as failed:
                list(client.stream("queue.list", {"format": "csv"}))
            assert "bad_request" == failed.value.code

        audit = d.wait_log("Control command", command="system.ping", outcome="ok")
        assert audit[0]["fields"]["audit"] is True
        assert os.getuid() == audit[0]["fields"]["peer_uid"]
        assert isinstance(audit[0]["fields"]["peer_pid"], int)


def test_socket_is_mode_0600_from_the_moment_it_exists(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d")
    d.write_config()
    log = d.log_path.open("ab")
    env = {k: v for k, v in os.environ.items() if k != "EMPATH_CONFIG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "empath", "--config", str(d.config_path)],
        stdout=log,
        stderr=log,
        cwd=d.workdir,
        env=env,
    )
    d.proc = proc
    try:
        modes: list[int] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                st = os.lstat(d.socket_path)
            except FileNotFoundError:
                continue
            modes.append(stat.S_IMODE(st.st_mode))
            if len(modes) > 200:
                break
        assert modes, "the control socket never appeared"
        assert {0o600} == set(modes)
        assert stat.S_ISSOCK(os.lstat(d.socket_path).st_mode)
        wait_for(lambda: d.http_status("/health/ready") == 200, 20, what="readiness")
    finally:
        d.stop()
        log.close()
    assert not d.socket_path.exists(), "the socket is removed at shutdown"


def test_a_second_daemon_on_the_same_socket_refuses_to_start(tmp_path: Path) -> None:
    with Daemon(tmp_path / "first") as first:
        second = Daemon(tmp_path / "second", {"control_socket": str(first.socket_path)})
        try:
            second.start()
        except RuntimeError as exc:
            assert "another Empath daemon is running" in str(exc)
        else:
            raise AssertionError("the second daemon started")
        finally:
            second.stop()
        assert 1 == second.proc.returncode if second.proc else False
        assert 0 == ctl(first, "system", "ping").returncode


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "d")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(d.socket_path))
    stale.close()  # the file stays; nobody listens behind it
    assert d.socket_path.exists()
    with d:
        assert 0 == ctl(d, "system", "ping").returncode
        assert d.logs("Replacing stale control socket")


def test_unreachable_daemon_exits_3_naming_the_socket_and_how_to_set_it(tmp_path: Path) -> None:
    sock = tmp_path / "nobody.sock"
    r = subprocess.run(
        ["empathctl", "--socket", str(sock), "system", "ping"],
        check=False,
        env=ctl_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert 3 == r.returncode
    assert str(sock) in r.stderr
    assert "--socket" in r.stderr and "EMPATH_CONTROL_SOCKET" in r.stderr


def test_a_closed_pipe_ends_queue_list_quietly_with_exit_0(tmp_path: Path) -> None:
    domains = [f"d{i:02d}.parked.test" for i in range(20)]
    with Daemon(tmp_path / "d", parked_overrides(*domains)) as d:
        with Submitter(d.smtp_port) as s:
            for n in range(100):
                s.send(SENDER, [f"u{n}@{dom}" for dom in domains], BODY)
        full = ctl(d, "queue", "list")
        assert 2000 == len(full.stdout.splitlines())  # ~300 KB: more than a pipe holds
        r = sh(d, "empathctl queue list | head -n 1", pipefail=True)
        assert 0 == r.returncode, r.stderr
        assert "" == r.stderr
        first = LIST_LINE.match(full.stdout.splitlines()[0])
        got = LIST_LINE.match(r.stdout.strip())
        assert first is not None and got is not None
        assert (first["id"], first["domain"]) == (got["id"], got["domain"])


def test_auth_refuses_a_missing_or_wrong_token_and_audits_it(tmp_path: Path) -> None:
    token = "s3cret-token"
    auth = {"enabled": True, "token_hashes": [hashlib.sha256(token.encode()).hexdigest()]}
    with Daemon(tmp_path / "d", {"control_auth": auth}) as d:
        none = ctl(d, "system", "ping")
        assert 4 == none.returncode
        assert "authentication failed" in none.stderr
        wrong = ctl(d, "--token", "nope", "queue", "stats")
        assert 4 == wrong.returncode
        assert 0 == ctl(d, "--token", token, "system", "ping").returncode
        env = ctl_env(d, EMPATH_CONTROL_TOKEN=token)
        assert 0 == ctl(d, "queue", "list", env=env).returncode
        denied = d.wait_log("Control command", count=2, outcome="denied")
        assert [("system.ping", "no token given"), ("queue.stats", "wrong token")] == [
            (x["fields"]["command"], x["fields"]["error"]) for x in denied
        ]
        assert all(x["fields"]["audit"] is True for x in denied)
        assert all(x["fields"]["peer_uid"] == os.getuid() for x in denied)
        assert all(token not in json.dumps(x) for x in d.log_lines())
        d.wait_log("Control command", command="queue.list", outcome="ok")
