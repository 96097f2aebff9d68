"""Garbage on the control socket: random, non-JSON, truncated, oversized and slow frames each
get an error reply or a closed connection, while SMTP ingest and delivery go on and
`system ping` keeps answering.  Also `queue stats --watch` in a real pseudo-terminal."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pexpect
import pytest

from tests.ctl import BIN_DIR, ctl, ctl_env
from tests.daemon import Daemon, Submitter, parked_overrides
from tests.sink import SmtpSink

SENDER = "ops@origin.test"
ERROR_CODES = {"bad_request", "version", "unknown_command", "too_large"}


class Conn:
    """A raw control-socket connection reading newline-delimited replies."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(path))
        self.buf = b""

    def reply(self) -> dict[str, object] | None:
        """The next reply frame, or None when the daemon closed the connection."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        frame: dict[str, object] = json.loads(line)
        assert 1 == frame["v"]
        return frame

    def close(self) -> None:
        self.sock.close()


def error_code(frame: dict[str, object] | None) -> str | None:
    if frame is None:
        return None
    assert frame["ok"] is False, frame
    err = frame["error"]
    assert isinstance(err, dict)
    return str(err["code"])


def junk(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # random bytes
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    elif kind == 1:  # text that is not JSON
        data = rng.choice([b"PING", b"queue list", b"{", b"}{", b"null", b"[]", b'"x"', b"1e999"])
    elif kind == 2:  # JSON objects that are not requests
        obj = rng.choice(
            [
                {"cmd": "system.ping"},
                {"v": 2, "cmd": "system.ping"},
                {"v": 1, "cmd": 7},
                {"v": 1, "cmd": "nope.nothing"},
                {"v": 1, "cmd": "queue.list", "args": "all"},
                {"v": 1, "cmd": "queue.view", "args": {"id": 5}},
                {"v": 1, "cmd": "queue.list", "args": {"status": "bogus"}},
                {"v": 1, "cmd": "queue.list", "args": {"limit": -1}},
            ]
        )
        data = json.dumps(obj).encode()
    else:  # a valid request cut short, then a newline
        full = b'{"v": 1, "id": 1, "cmd": "system.ping", "args": {}}'
        data = full[: rng.randrange(1, len(full) - 1)]
    data = data.replace(b"\n", b"x").replace(b"\r", b"x")
    return b"#" + data if not data.strip() else data


def test_garbage_frames_get_errors_while_mail_flows(tmp_path: Path) -> None:
    rng = random.Random(9)
    with SmtpSink() as sink:
        overrides = {
            "delivery": {"domains": {"ok.test": {"mx_override": f"127.0.0.1:{sink.port}"}}}
        }
        with Daemon(tmp_path / "d", overrides) as d:
            sent: list[str] = []

            def ingest() -> None:
                with Submitter(d.smtp_port) as s:
                    for n in range(150):
                        sent.append(s.send(SENDER, [f"u{n}@ok.test"], f"Subject: {n}\n\nx\n"))

            feeder = threading.Thread(target=ingest)
            # Silent clients: half a request each, then nothing (until the end).
            silent = [Conn(d.socket_path) for _ in range(20)]
            for c in silent:
                c.sock.sendall(b'{"v": 1, "id": 1, "cmd": "sys')
            feeder.start()

            answered = 0
            for _ in range(30):  # 30 connections x 100 junk frames
                c = Conn(d.socket_path)
                for _ in range(100):
                    c.sock.sendall(junk(rng) + b"\n")
                    assert error_code(c.reply()) in ERROR_CODES
                    answered += 1
                c.close()
            for _ in range(200):  # truncated: EOF in the middle of a request
                c = Conn(d.socket_path)
                c.sock.sendall(b'{"v": 1, "cmd": "queue.li')
                c.sock.shutdown(socket.SHUT_WR)
                assert error_code(c.reply()) in {"bad_request", None}
                c.close()
            for _ in range(50):  # oversized: an error, then the connection is closed
                c = Conn(d.socket_path)
                try:
                    c.sock.sendall(b'{"v": 1, "cmd": "' + b"a" * 70_000)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                assert error_code(c.reply()) in {"too_large", None}
                assert c.reply() is None
                c.close()
            assert 0 == ctl(d, "system", "ping").returncode

            # Slow clients finish their request one byte at a time and get real answers.
            rest = b'tem.ping", "args": {}}\n'
            for i in range(len(rest)):
                for c in silent:
                    c.sock.sendall(rest[i : i + 1])
                time.sleep(0.002)
            for c in silent:
                frame = c.reply()
                assert frame is not None and frame["ok"] is True, frame
                c.close()

            feeder.join(60)
            assert 3000 == answered
            assert 150 == len(sent)
            sink.wait_messages(150, timeout=60)  # nothing lost, delivery went on
            ping = ctl(d, "system", "ping")
            assert 0 == ping.returncode, ping.stderr
            assert not d.logs("Control connection failed")
            assert not d.logs("Control command crashed")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ignored_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    "started_with",
    [_default_sigint, _ignored_sigint],
    ids=["sigint-default", "sigint-ignored-like-a-background-job"],
)
def test_stats_watch_redraws_in_a_terminal_and_ctrl_c_exits_0(
    tmp_path: Path, started_with: Callable[[], None]
) -> None:
    """Ctrl-C stops the watch whatever SIGINT disposition empathctl inherited: a shell
    without job control starts background jobs with SIGINT ignored, and then Python
    installs no KeyboardInterrupt handler (this failed under `make test &`)."""
    with Daemon(tmp_path / "d", parked_overrides("parked.test")) as d:
        with Submitter(d.smtp_port) as s:
            s.send(SENDER, ["a@parked.test"], "Subject: w\n\nx\n")
        child = pexpect.spawn(
            f"{BIN_DIR}/empathctl",
            ["queue", "stats", "--watch", "--interval", "0.3"],
            cwd=str(d.workdir),
            env=ctl_env(d),
            timeout=20,
            dimensions=(40, 100),
            preexec_fn=started_with,
        )
        try:
            for _ in range(3):
                child.expect("\x1b\\[H\x1b\\[2JUnits by status:")
                child.expect("Ctrl-C to stop")
            child.sendintr()
            child.expect(pexpect.EOF)
            tail = child.before.decode(errors="replace")
        finally:
            child.close()
        assert 0 == child.exitstatus, tail
        assert "Traceback" not in tail and "KeyboardInterrupt" not in tail
        assert 3 <= len(d.logs("Control command", command="queue.stats"))


def test_delete_asks_in_a_terminal_unless_yes(tmp_path: Path) -> None:
    with Daemon(tmp_path / "d", parked_overrides("parked.test")) as d:
        with Submitter(d.smtp_port) as s:
            keep = s.send(SENDER, ["a@parked.test"], "Subject: k\n\nx\n")
            gone = s.send(SENDER, ["b@parked.test"], "Subject: g\n\nx\n")

        def run(*args: str) -> pexpect.spawn:
            return pexpect.spawn(
                f"{BIN_DIR}/empathctl", list(args), cwd=str(d.workdir), env=ctl_env(d), timeout=20
            )

        child = run("queue", "delete", keep)
        child.expect(rf"delete message {keep}\? \[y/N\] ")
        child.sendline("n")
        child.expect(pexpect.EOF)
        child.close()
        assert 1 == child.exitstatus
        assert 0 == ctl(d, "queue", "view", keep).returncode

        child = run("queue", "delete", gone, "--yes")
        child.expect(pexpect.EOF)
        child.close()
        assert 0 == child.exitstatus
        assert f"deleted {gone}" in child.before.decode()
        assert 1 == ctl(d, "queue", "view", gone).returncode


def test_config_check_of_a_file_needs_no_daemon(tmp_path: Path) -> None:
    good = tmp_path / "good.ron"
    good.write_text('Empath ( control_socket: "/tmp/x.sock" )\n')
    bad = tmp_path / "bad.ron"
    bad.write_text('Empath ( delivery: ( max_attempts: "many" ) )\n')
    env = ctl_env()
    ok = subprocess.run(
        ["empathctl", "--socket", "/nonexistent", "config", "check", str(good)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert 0 == ok.returncode and f"{good}: OK" in ok.stdout
    err = subprocess.run(
        ["empathctl", "config", "check", str(bad)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert 1 == err.returncode
    assert "delivery.max_attempts" in err.stderr and str(bad) in err.stderr
    usage = subprocess.run(
        ["empathctl", "queue", "retry"], env=env, capture_output=True, text=True, check=False
    )
    assert 2 == usage.returncode
    helptext = subprocess.run(
        ["empathctl", "--help"], env=env, capture_output=True, text=True, check=False
    )
    assert 0 == helptext.returncode and len(helptext.stdout.splitlines()) < 30
