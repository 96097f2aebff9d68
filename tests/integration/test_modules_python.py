"""Python modules (DESIGN §14) in a real daemon: each outcome on the wire, in the spool,
in the metrics and the logs; loading failures stop start-up or a reload, naming the
module.  The modules are tests/module_examples.py, loaded by name like an operator's."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.ctl import ctl
from tests.daemon import Daemon, RawSmtp, parked_overrides, queued_id, read_spool
from tests.helpers import wait_for
from tests.sink import SmtpSink

REPO = str(Path(__file__).resolve().parents[2])
# the compiled pass of `make test` puts the build first on PYTHONPATH: keep it
ENV = {"PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), REPO) if p)}


def module(name: str, arguments: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "Python", "name": f"tests.module_examples:{name}",
            "arguments": arguments or {}, **extra}  # fmt: skip


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in daemon.http_get("/metrics").splitlines():
        m = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted(m.group(2).split(",")))
            if got == want:
                return float(m.group(3))
    return 0.0


def daemon_with(tmp_path: Path, modules: list[dict[str, Any]], **overrides: Any) -> Daemon:
    config = {**parked_overrides("y.test"), "modules": modules, **overrides}
    daemon = Daemon(tmp_path / "d", config)
    daemon.env = ENV
    return daemon


def test_the_smallest_module_refuses_one_recipient_and_the_spool_keeps_the_other(
    tmp_path: Path,
) -> None:
    """DESIGN §14's Block: 550 5.7.1 for the denied RCPT, 250 for the next; the message is
    spooled for the accepted one only; calls are counted per result."""
    daemon = daemon_with(tmp_path, [module("Block", {"deny": "x@y.test"})])
    with daemon:
        with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
            client.ehlo()
            client.mail("a@origin.test")
            assert (550, b"5.7.1 not this one") == client.rcpt("x@y.test")
            assert (250, b"2.1.5 Ok") == client.rcpt("ok@y.test")
            code, text = client.data(b"Subject: t\r\n\r\nbody\r\n")
            assert 250 == code
        label = "tests.module_examples:Block"
        assert 1 == metric(daemon, "empath_module_calls_total", module=label,
                           hook="on_rcpt_to", result="reject")  # fmt: skip
        assert 1 == metric(daemon, "empath_module_calls_total", module=label,
                           hook="on_rcpt_to", result="continue")  # fmt: skip
        assert 2 == metric(daemon, "empath_module_duration_seconds_count", module=label,
                           hook="on_rcpt_to")  # fmt: skip
    msg_id = queued_id(text)
    stored = read_spool(daemon.spool_path)
    assert ("ok@y.test",) == stored.messages[msg_id].envelope.recipients


def test_a_header_added_at_end_of_data_is_in_the_spooled_message(tmp_path: Path) -> None:
    """on_data returning Changes(AddHeader) puts the field in the spooled bytes, after
    the sender's header block and before the body."""
    daemon = daemon_with(tmp_path, [module("Tag", {"value": "checked by Tag"})])
    with daemon:
        with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
            client.ehlo()
            client.mail("a@origin.test")
            client.rcpt("ok@y.test")
            code, text = client.data(b"Subject: t\r\n\r\nbody\r\n")
        assert 250 == code
        assert 1 == metric(daemon, "empath_module_calls_total",
                           module="tests.module_examples:Tag", hook="on_data",
                           result="changes")  # fmt: skip
    body = read_spool(daemon.spool_path).bodies[queued_id(text)]
    assert body.endswith(b"Subject: t\r\nX-Tagged: checked by Tag\r\n\r\nbody\r\n")


def test_a_module_past_its_timeout_tempfails_the_command_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    """on_mail_from sleeping 5 s with command_secs 0.3: MAIL gets 451 4.7.1 (on_error
    tempfail, the default), counted as a timeout; the session still answers."""
    daemon = daemon_with(tmp_path, [module("Slow", {"sleep_s": 5}, timeouts={"command_secs": 0.3})])
    with daemon:
        with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
            client.ehlo()
            code, text = client.mail("a@origin.test")
            assert (451, b"4.7.1 Service temporarily unavailable, try again later") == (
                code, text)  # fmt: skip
            assert 250 == client.noop()[0]
            assert 250 == client.rset()[0]
        assert 1 == metric(daemon, "empath_module_calls_total",
                           module="tests.module_examples:Slow", hook="on_mail_from",
                           result="timeout")  # fmt: skip
        [line] = daemon.logs("Module call failed")
        assert "on_mail_from" == line["fields"]["hook"]
        assert "timed out after 0.3 s" == line["fields"]["error"]
    assert {} == read_spool(daemon.spool_path).messages


def test_on_error_accept_lets_the_command_through_when_the_module_times_out(
    tmp_path: Path,
) -> None:
    daemon = daemon_with(tmp_path, [module("Slow", {"sleep_s": 5}, timeouts={"command_secs": 0.3},
                                     on_error="accept")])  # fmt: skip
    with daemon, smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
        client.ehlo()
        assert 250 == client.mail("a@origin.test")[0]


def test_a_raising_module_tempfails_and_its_traceback_is_logged_once_a_minute(
    tmp_path: Path,
) -> None:
    """on_helo raising: every EHLO gets 451 4.7.1, each call is counted as an error, the
    traceback is logged for the first one only (the next within a minute are counted
    in the following line); the daemon and the session keep going."""
    daemon = daemon_with(tmp_path, [module("Raises")])
    with daemon:
        with RawSmtp(daemon.smtp_host, daemon.smtp_port) as raw:
            assert 220 == raw.reply()[0]
            for _ in range(3):
                raw.send(b"EHLO client.test\r\n")
                assert (451, "4.7.1 Service temporarily unavailable, try again later") == (
                    raw.reply())  # fmt: skip
            raw.send(b"NOOP\r\n")
            assert 250 == raw.reply()[0]
        assert 3 == metric(daemon, "empath_module_calls_total",
                           module="tests.module_examples:Raises", hook="on_helo",
                           result="error")  # fmt: skip
        lines = daemon.logs("Module call failed")
        assert 1 == len(lines)
        error = lines[0]["fields"]["error"]
        assert "Traceback" in error and "RuntimeError: module bug on client.test" in error
        assert 200 == daemon.http_status("/health/live")
        status = ctl(daemon, "system", "status")
        assert 0 == status.returncode, status.stderr
        assert (
            "Modules: 1\n  tests.module_examples:Raises  Python  failing "
            "(RuntimeError: module bug on client.test)  hooks: on_helo  on_error: tempfail\n"
        ) in status.stdout


def test_delivery_events_reach_the_module_after_delivery(tmp_path: Path) -> None:
    """on_delivery_event is called (off the delivery path) with the unit's outcome."""
    events = tmp_path / "events.jsonl"
    with SmtpSink() as sink:
        daemon = Daemon(tmp_path / "d", {
            "delivery": {"domains": {"sink.test": {"mx_override": f"127.0.0.1:{sink.port}"}}},
            "modules": [module("Recorder", {"path": str(events)})],
        })  # fmt: skip
        daemon.env = ENV
        with daemon:
            with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
                client.sendmail("a@origin.test", ["r@sink.test"], b"Subject: t\r\n\r\nb\r\n")
            wait_for(lambda: events.exists() and events.read_text(), 10, what="an event")
    assert '{"kind": "delivered", "domain": "sink.test", "recipients": ["r@sink.test"]}\n' == (
        events.read_text())  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            module("Nope"),
            "modules[0] (tests.module_examples:Nope): 'tests.module_examples' "
            "has no callable 'Nope'",
        ),
        (
            {"type": "Python", "name": "tests.no_such_module:X"},
            "modules[0] (tests.no_such_module:X): no Python module named 'tests.no_such_module'",
        ),
        (
            {"type": "Python", "name": "tests.module_broken:X"},
            "modules[0] (tests.module_broken:X): importing 'tests.module_broken' failed: "
            "ImportError('this module cannot be imported: a missing dependency')",
        ),
        (
            module("Explodes"),
            "modules[0] (tests.module_examples:Explodes): Explodes({}) raised "
            "ValueError('bad arguments')",
        ),
    ],
    ids=["unknown-name", "unknown-module", "import-error", "constructor-raises"],
)
def test_a_module_that_cannot_be_loaded_stops_start_up_naming_it(
    tmp_path: Path, entry: dict[str, Any], expected: str
) -> None:
    daemon = Daemon(tmp_path / "d", {"modules": [entry]})
    daemon.write_config()
    out = subprocess.run(
        [sys.executable, "-m", "empath", "--config", str(daemon.config_path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **ENV}, check=False,
    )  # fmt: skip
    assert 1 == out.returncode
    assert expected in out.stderr, out.stderr
    assert "Startup failed: modules" in out.stderr
    check = subprocess.run(
        [sys.executable, "-m", "empath", "--check-config", str(daemon.config_path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **ENV}, check=False,
    )  # fmt: skip
    assert 1 == check.returncode
    assert f"empath: config error: {daemon.config_path}: {expected}\n" == check.stderr


def test_a_reload_with_a_broken_module_is_refused_and_the_old_modules_stay(
    tmp_path: Path,
) -> None:
    """SIGHUP with a module whose constructor raises: the reload fails naming it, and
    the running Block still refuses its recipient; a good reload then swaps the set."""
    daemon = daemon_with(tmp_path, [module("Block", {"deny": "x@y.test"})])
    with daemon:
        daemon.config["modules"] = [module("Explodes")]
        daemon.write_config()
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: daemon.logs("Config reload failed; keeping the old config"), 10,
                 what="the refused reload")  # fmt: skip
        [line] = daemon.logs("Config reload failed; keeping the old config")
        assert "tests.module_examples:Explodes" in line["fields"]["error"]
        with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
            client.ehlo()
            client.mail("a@origin.test")
            assert 550 == client.rcpt("x@y.test")[0]
        daemon.config["modules"] = [module("Block", {"deny": "z@y.test"})]
        daemon.write_config()
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: daemon.logs("Config reloaded"), 10, what="the good reload")
        with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
            client.ehlo()
            client.mail("a@origin.test")
            assert 250 == client.rcpt("x@y.test")[0]
            assert 550 == client.rcpt("z@y.test")[0]


def test_pipelined_commands_are_each_checked_and_answered_in_order(tmp_path: Path) -> None:
    """RFC 2920 pipelining through a module on every RCPT: the replies come back in
    order, the refused recipient alone refused, and the message is spooled."""
    daemon = daemon_with(tmp_path, [module("Block", {"deny": "x@y.test"})])
    with daemon, RawSmtp(daemon.smtp_host, daemon.smtp_port) as raw:
        assert 220 == raw.reply()[0]
        raw.send(b"EHLO c.test\r\n")
        assert 250 == raw.reply()[0]
        raw.send(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<ok@y.test>\r\n"
                 b"RCPT TO:<x@y.test>\r\nDATA\r\n")  # fmt: skip
        assert [250, 550, 250, 550, 354] == raw.codes(5)
        raw.send(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert [250, 221] == raw.codes(2)


def test_a_long_pipelined_batch_through_a_module_answered_in_place_gets_every_reply(
    tmp_path: Path,
) -> None:
    """Block never awaits, so the session answers its checks in place, one after the
    other in one pass over the batch: 1,500 pipelined RCPTs (more than Python's
    recursion limit allows if each check handled the next), every reply in order."""
    daemon = Daemon(tmp_path / "d", {**parked_overrides("y.test"),
                                     "modules": [module("Block", {"deny": "x@y.test"})]},
                    listener={"max_recipients": 2000})  # fmt: skip
    daemon.env = ENV
    rcpts = [("x@y.test" if i % 500 == 0 else f"r{i}@y.test") for i in range(1500)]
    with daemon, RawSmtp(daemon.smtp_host, daemon.smtp_port) as raw:
        assert 220 == raw.reply()[0]
        raw.send(b"EHLO c.test\r\n")
        assert 250 == raw.reply()[0]
        batch = b"MAIL FROM:<a@origin.test>\r\n"
        batch += b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts) + b"RSET\r\nNOOP\r\n"
        raw.send(batch)
        expected = [250] + [550 if r == "x@y.test" else 250 for r in rcpts] + [250, 250]
        assert expected == raw.codes(len(expected))
