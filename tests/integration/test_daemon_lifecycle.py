"""Lifecycle of the real daemon: graceful stop, `--check-config`, memory while receiving big mail.

* SIGTERM/SIGINT: the listener closes at once, an idle session gets
  ``421 4.3.2`` right away, a session in the middle of DATA may finish its
  message and gets its 250 (then 421), and the process exits 0.  The message is
  in the spool when the daemon starts again.  A second stop signal exits at
  once (status 1) without losing anything already acknowledged.
* ``empath --check-config FILE``: the repo's dev config is valid (exit 0) and
  the effective config it prints is itself a valid config; a broken file exits 1
  with an error naming ``file:line:column``; without ``--config`` the file is
  found via ``$EMPATH_CONFIG``, then ``./empath.config.ron``.
* A 25 MiB message is streamed to disk as it arrives: the daemon's peak RSS
  while receiving it stays within a few MiB of its idle RSS.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import (
    Daemon,
    RawSmtp,
    assert_stored,
    parked_overrides,
    queued_id,
    read_spool,
)

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def empath_command() -> list[str]:
    """The `empath` console script installed next to this interpreter."""
    script = Path(sys.executable).parent / "empath"
    assert script.exists(), f"{script} is missing: the package is not installed"
    return [str(script)]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "empath", overrides=parked_overrides("parked.test"))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def greeted(port: int) -> RawSmtp:
    r = RawSmtp("127.0.0.1", port)
    r.send(b"EHLO lifecycle.example\r\n")
    assert [220, 250] == r.codes(2)
    return r


def read_to_eof(r: RawSmtp) -> bytes:
    """Whatever the server still sends before it closes the connection."""
    data = b""
    while chunk := r.sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_421s_idle_sessions_and_lets_data_finish(
    daemon: Daemon, sig: signal.Signals
) -> None:
    """On a stop signal: no new connections, the idle sessions (one greeted, one between
    RCPT and DATA) get 421 4.3.2 and are closed; the session half-way through DATA and the
    one between BDAT chunks complete with 250 (then 421); the process exits 0; after a
    restart both messages are in the spool byte-exact."""
    first, second = b"Subject: in flight\r\n\r\nfirst half\r\n", b"..second half\r\nend\r\n"
    chunk1, chunk2 = b"Subject: bdat in flight\r\n\r\nfirst", b" chunk, last chunk\r\n"
    envelope = b"MAIL FROM:<s@parked.test>\r\nRCPT TO:<r@parked.test>\r\n"
    with (
        greeted(daemon.smtp_port) as idle,
        greeted(daemon.smtp_port) as rcpt_done,
        greeted(daemon.smtp_port) as in_data,
        greeted(daemon.smtp_port) as in_bdat,
    ):
        rcpt_done.send(envelope)
        assert [250, 250] == rcpt_done.codes(2)
        in_data.send(envelope + b"DATA\r\n")
        assert [250, 250, 354] == in_data.codes(3)
        in_data.send(first)
        in_bdat.send(envelope + b"BDAT %d\r\n%s" % (len(chunk1), chunk1))
        assert [250, 250, 250] == in_bdat.codes(3)

        daemon.signal(sig)
        for session in (idle, rcpt_done):
            code, text = session.reply()
            assert (421, "4.3.2") == (code, text[:5])
            assert b"" == read_to_eof(session)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=5).close()
        assert daemon.proc is not None and daemon.proc.poll() is None  # still finishing

        in_data.send(second + b".\r\n")
        in_bdat.send(b"BDAT %d LAST\r\n%s" % (len(chunk2), chunk2))
        ids = []
        for session in (in_data, in_bdat):
            code, text = session.reply()
            assert 250 == code, text
            ids.append(queued_id(text))
            code, text = session.reply()
            assert (421, "4.3.2") == (code, text[:5])
            assert b"" == read_to_eof(session)
    assert 0 == daemon.wait_exit(30), daemon.log_tail()
    assert "Stopped" == daemon.log_lines()[-1]["fields"]["message"]

    daemon.start()
    recovered = [
        line["fields"]
        for line in daemon.log_lines()
        if line.get("fields", {}).get("message") == "Spool recovered"
    ]
    assert 2 == recovered[-1]["messages"]
    assert 0 == daemon.stop()
    contents = read_spool(daemon.spool_path)
    for msg_id, body in zip(ids, (first + second[1:], chunk1 + chunk2), strict=True):
        msg = assert_stored(contents, msg_id, body)
        assert ("s@parked.test", ("r@parked.test",)) == (
            msg.envelope.sender,
            msg.envelope.recipients,
        )


def test_second_stop_signal_exits_at_once_and_loses_nothing_acknowledged(daemon: Daemon) -> None:
    """While a graceful stop waits for a session in DATA, a second SIGTERM exits at once
    (status 1); the message acknowledged before it is still in the spool."""
    body = b"Subject: acked\r\n\r\nacknowledged before the stop\r\n"
    with greeted(daemon.smtp_port) as done, greeted(daemon.smtp_port) as busy:
        done.send(b"MAIL FROM:<s@parked.test>\r\nRCPT TO:<r@parked.test>\r\nDATA\r\n")
        assert [250, 250, 354] == done.codes(3)
        done.send(body + b".\r\n")
        code, text = done.reply()
        assert 250 == code, text
        msg_id = queued_id(text)
        busy.send(b"MAIL FROM:<s@parked.test>\r\nRCPT TO:<r@parked.test>\r\nDATA\r\n")
        assert [250, 250, 354] == busy.codes(3)
        busy.send(b"Subject: never finished\r\n\r\nhalf")

        daemon.signal(signal.SIGTERM)
        code, text = done.reply()
        assert (421, "4.3.2") == (code, text[:5])  # graceful stop is under way
        daemon.signal(signal.SIGTERM)
        assert 1 == daemon.wait_exit(10), daemon.log_tail()
        assert b"" == read_to_eof(busy)  # the unfinished message got no reply
    contents = read_spool(daemon.spool_path)
    assert [msg_id] == list(contents.messages)
    assert_stored(contents, msg_id, body)


def test_config_discovery_order_of_the_empath_command(tmp_path: Path) -> None:
    """With no --config the command uses $EMPATH_CONFIG, else ./empath.config.ron; an
    explicit file beats both."""
    files = {}
    for name in ("cwd", "env", "cli"):
        path = tmp_path / name / "empath.config.ron"
        path.parent.mkdir()
        path.write_text(f'Empath ( hostname: "{name}.example" )\n')
        files[name] = path
    cwd = files["cwd"].parent

    def hostname_used(args: list[str], env_file: Path | None) -> str:
        env = {k: v for k, v in os.environ.items() if k != "EMPATH_CONFIG"}
        if env_file is not None:
            env["EMPATH_CONFIG"] = str(env_file)
        out = subprocess.run(
            [*empath_command(), "--check-config", *args],
            capture_output=True, text=True, timeout=30, check=False, cwd=cwd, env=env,
        )  # fmt: skip
        assert 0 == out.returncode, out.stderr
        match = re.search(r'hostname: "([a-z]+)\.example"', out.stdout)
        assert match is not None, out.stdout
        return match.group(1)

    assert "cwd" == hostname_used([], None)
    assert "env" == hostname_used([], files["env"])
    assert "cli" == hostname_used([str(files["cli"])], files["env"])


def test_check_config_accepts_the_dev_config_and_prints_a_valid_effective_config(
    tmp_path: Path,
) -> None:
    """`empath --check-config empath.config.ron` exits 0 and prints the effective config
    (defaults filled in); that output is itself a config --check-config accepts."""
    out = subprocess.run(
        [*empath_command(), "--check-config", str(REPO / "empath.config.ron")],
        capture_output=True, text=True, timeout=30, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert 0 == out.returncode, out.stderr
    assert "Empath (" in out.stdout
    for setting in ('hostname: "localhost.localdomain"', 'socket: "127.0.0.1:1025"',
                    "max_attempts: 25", "size: 26214400"):  # fmt: skip
        assert setting in out.stdout
    printed = tmp_path / "effective.ron"
    printed.write_text(out.stdout)
    again = subprocess.run(
        [*empath_command(), "--check-config", str(printed)],
        capture_output=True, text=True, timeout=30, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert 0 == again.returncode, again.stderr
    assert out.stdout.split("\n", 2)[2] == again.stdout.split("\n", 2)[2]  # past the header


BROKEN = {
    "wrong_type": (
        'Empath (\n    hostname: "x",\n    delivery: (\n        max_attempts: "many",\n    ),\n)\n',
        "4:23",
        "delivery.max_attempts",
    ),
    "unknown_key": (
        'Empath (\n  hostname: "x",\n  spool: ( type: "File", pathh: "./s" ),\n)\n',
        "3:26",
        "spool.pathh",
    ),
    "unterminated_string": ('// comment\nEmpath (\n    hostname: "unterminated,\n)\n', "3:15", ""),
    "missing_comma": ('Empath (\n    log: ( level: "info" format: "json" ),\n)\n', "2:26", ""),
    "out_of_range": (
        '(\n  smtp_controller: (\n    listeners: [ ( socket: "127.0.0.1:1025", '
        "max_recipients: -3 ) ],\n  ),\n)\n",
        "3:62",
        "smtp_controller.listeners[0].max_recipients",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_config_on_a_broken_file_exits_1_naming_file_line_column(
    tmp_path: Path, case: str
) -> None:
    """A broken config makes --check-config (and the daemon itself) exit 1 with one error
    line naming file:line:column and, for schema errors, the key path."""
    text, where, key_path = BROKEN[case]
    path = tmp_path / "broken.ron"
    path.write_text(text)
    for args in (["--check-config", str(path)], ["--config", str(path)]):
        out = subprocess.run(
            [*empath_command(), *args],
            capture_output=True, text=True, timeout=30, check=False, cwd=tmp_path,
        )  # fmt: skip
        assert 1 == out.returncode, out.stdout + out.stderr
        assert "" == out.stdout
        assert f"{path}:{where}: {key_path}" in out.stderr, out.stderr


def smtp_body(size: int) -> bytes:
    """`size` bytes of 100-byte CRLF lines, some starting with '.', ending in CRLF."""
    line = b"." + b"big message line 0123456789 abcdefghijklmnopqrstuvwxyz " * 2
    line = line[:98] + b"\r\n"
    head = b"Subject: 25 MiB\r\n\r\n"
    return head + line * ((size - len(head)) // len(line))


def test_25_mib_message_is_streamed_with_little_rss_growth(tmp_path: Path) -> None:
    """A 25 MiB message (every line dot-stuffed on the wire) is accepted and stored
    byte-exact, and the daemon's peak RSS while receiving it exceeds its idle RSS by at
    most 8 MiB: DATA is streamed to a spill file, never held whole."""
    d = Daemon(
        tmp_path / "empath",
        overrides=parked_overrides("parked.test"),
        listener={"extensions": [{"size": 32 * MiB}]},
    )
    big = smtp_body(25 * MiB)
    wire = big.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    d.start()
    try:
        with greeted(d.smtp_port) as r:
            # Warm up every path a big message takes (parser, spill file, commit, delivery).
            for warm in (smtp_body(10_000), smtp_body(2 * MiB)):
                r.send(b"MAIL FROM:<s@parked.test>\r\nRCPT TO:<w@parked.test>\r\nDATA\r\n")
                r.send(warm.replace(b"\r\n.", b"\r\n..") + b".\r\n")
                assert [250, 250, 354, 250] == r.codes(4)
            idle_kib = d.rss_kib()
            Path(f"/proc/{d.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM)
            assert d.rss_kib("VmHWM") <= idle_kib + 1024
            r.send(
                b"MAIL FROM:<s@parked.test> SIZE=%d\r\nRCPT TO:<r@parked.test>\r\nDATA\r\n"
                % len(big)
            )
            assert [250, 250, 354] == r.codes(3)
            r.send(wire)
            code, text = r.reply()
            assert 250 == code, text
            msg_id = queued_id(text)
            peak_kib = d.rss_kib("VmHWM")
    finally:
        exit_code = d.stop()
    assert 0 == exit_code, d.log_tail()
    growth_mib = (peak_kib - idle_kib) / 1024
    assert growth_mib <= 8.0, f"RSS grew by {growth_mib:.1f} MiB receiving 25 MiB"
    contents = read_spool(d.spool_path)
    msg = assert_stored(contents, msg_id, big)
    assert ("s@parked.test", ("r@parked.test",)) == (
        msg.envelope.sender,
        msg.envelope.recipients,
    )
    assert (d.spool_path / "bodies" / msg_id).exists()
