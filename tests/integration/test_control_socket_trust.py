"""Who may be at the other end of the control socket (issue 14, defect 11).

The default socket was ``/tmp/empath.sock``: hidden from the host by the shipped
unit's ``PrivateTmp=true`` (every runbook `empathctl` command exited 3), and any
local user could create that path first and collect `empathctl`'s token.  The
default is now ``/run/empath/empath.sock`` (the unit's ``RuntimeDirectory=empath``);
`empathctl` checks who owns the socket before sending anything, and the daemon
refuses peers (SO_PEERCRED) other than root and its own user.  These tests run as
root (as `make test` does) and play the other user with uid 65534 (nobody).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from empath.config.model import Config
from empath.control.client import (
    ControlClient,
    SocketChoice,
    UntrustedSocket,
    check_socket_owner,
)
from tests.ctl import ctl_env
from tests.daemon import Daemon

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="empath-ctl-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


class Squatter:
    """A Unix socket some other user created: records whatever it is sent."""

    def __init__(self, path: Path, owner: int) -> None:
        self.path = path
        self.received = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chown(path, owner, owner)
        self._sock.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(2)
            try:
                while chunk := conn.recv(4096):
                    self.received += chunk
            except OSError:
                pass

    def close(self) -> None:
        self._sock.close()


def test_the_default_socket_is_in_the_runtime_directory_the_unit_creates() -> None:
    assert "/run/empath/empath.sock" == Config().control_socket
    unit = (REPO / "deploy" / "systemd" / "empath.service").read_text()
    assert "RuntimeDirectory=empath\n" in unit


def test_empathctl_sends_nothing_to_a_socket_another_user_put_in_a_shared_dir(
    shared_dir: Path,
) -> None:
    """The /tmp attack: user nobody creates the socket in a world-writable directory;
    root's empathctl with a token refuses (exit 3) and the squatter receives nothing."""
    tmp_like = shared_dir / "tmp"
    tmp_like.mkdir()
    tmp_like.chmod(0o1777)
    squatter = Squatter(tmp_like / "empath.sock", NOBODY)
    try:
        out = subprocess.run(
            ["empathctl", "--socket", str(squatter.path), "--token", "s3cret-token",
             "system", "status"],
            capture_output=True, text=True, timeout=30, check=False, env=ctl_env(),
        )  # fmt: skip
        assert 3 == out.returncode, out.stdout + out.stderr
        assert "refusing to send anything" in out.stderr
        assert "uid 65534" in out.stderr
        js = subprocess.run(
            ["empathctl", "--json", "--socket", str(squatter.path), "system", "ping"],
            capture_output=True, text=True, timeout=30, check=False, env=ctl_env(),
        )  # fmt: skip
        assert 3 == js.returncode
        assert "unreachable" == json.loads(js.stdout)["error"]["kind"]
    finally:
        squatter.close()
    assert b"" == squatter.received


def test_socket_ownership_rules(shared_dir: Path) -> None:
    """Root's or your own socket: fine; the socket of the user owning a directory only
    it may write to (/run/empath of the unit, owned by the daemon's user): fine; any
    other: refused."""
    own = shared_dir / "own.sock"
    Squatter(own, os.geteuid()).close()
    assert os.geteuid() == check_socket_owner(str(own))
    run_dir = shared_dir / "run-empath"
    run_dir.mkdir(mode=0o755)
    os.chown(run_dir, NOBODY, NOBODY)
    daemon_user = run_dir / "empath.sock"
    Squatter(daemon_user, NOBODY).close()
    assert NOBODY == check_socket_owner(str(daemon_user), euid=1000)
    run_dir.chmod(0o775)  # group-writable: someone else could have put it there
    with pytest.raises(UntrustedSocket):
        check_socket_owner(str(daemon_user), euid=1000)
    assert check_socket_owner(str(shared_dir / "missing.sock")) is None


def test_the_daemon_refuses_peers_other_than_root_and_its_user(
    tmp_path: Path, shared_dir: Path
) -> None:
    """Even with the socket's mode widened by hand, uid nobody gets an auth error and
    the refusal is audit-logged."""
    sock_path = shared_dir / "empath.sock"
    daemon = Daemon(tmp_path / "d", {"control_socket": str(sock_path)})
    with daemon:
        sock_path.chmod(0o666)
        reply = json.loads(_ping_as(NOBODY, sock_path))
        assert reply["ok"] is False, reply
        assert "auth" == reply["error"]["code"]
        assert "uid 65534 may not use this control socket" in reply["error"]["message"]
        denied = [
            line["fields"]
            for line in daemon.logs("Control command")
            if line["fields"].get("outcome") == "denied"
        ]
        assert [NOBODY] == [f["peer_uid"] for f in denied]
        # root (the daemon's user here) still gets through
        with ControlClient(SocketChoice(str(sock_path), "test")) as client:
            assert client.call("system.ping")["pong"] is True


def _ping_as(uid: int, path: Path) -> str:
    """One ping over the control socket from a child process running as ``uid``
    (forked: that user cannot run root's Python); the reply line."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, talk, report, exit without cleanup
        code = 1
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(path))
                with contextlib.suppress(BrokenPipeError):  # refused: closed at once
                    s.sendall(b'{"v":1,"id":1,"cmd":"system.ping","args":{}}\n')
                os.write(write_end, s.makefile("rb").readline())
            code = 0
        except BaseException as exc:
            os.write(write_end, f"child failed: {exc!r}".encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        line = f.read()
    _, status = os.waitpid(pid, 0)
    assert 0 == os.waitstatus_to_exitcode(status), line
    return line.decode()


def test_a_daemon_with_the_default_socket_answers_the_runbook_commands(tmp_path: Path) -> None:
    """No control_socket in the config: the daemon makes /run/empath/empath.sock and
    `empathctl` finds it through the same config, as on a host running the unit."""
    if Path("/run/empath/empath.sock").exists():
        pytest.fail("/run/empath/empath.sock exists: another daemon uses the default socket")
    daemon = Daemon(tmp_path / "d")
    del daemon.config["control_socket"]
    with daemon:
        out = subprocess.run(
            ["empathctl", "--config", str(daemon.config_path), "system", "ping"],
            capture_output=True, text=True, timeout=30, check=False, env=ctl_env(),
        )  # fmt: skip
        assert (0, "") == (out.returncode, out.stderr)
        assert Path("/run/empath/empath.sock").is_socket()
    assert not Path("/run/empath/empath.sock").exists()
