"""The control protocol's request parsing, token check and `queue list` line format."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest

from empath.cli import empathctl
from empath.config.load import discover_config_path
from empath.config.ron import parse, to_python
from empath.control import output
from empath.control.client import Unreachable, config_path, discover_socket, scan_control_socket
from empath.control.protocol import (
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    RequestError,
    encode_request,
    parse_request,
)
from empath.control.server import token_ok
from empath.errors import ConfigError

BAD = [
    (b"", ErrorCode.BAD_REQUEST),
    (b"not json", ErrorCode.BAD_REQUEST),
    (b"[1, 2]", ErrorCode.BAD_REQUEST),
    (b'{"v": 1}', ErrorCode.BAD_REQUEST),
    (b'{"v": 1, "cmd": ""}', ErrorCode.BAD_REQUEST),
    (b'{"v": 1, "cmd": "x", "args": []}', ErrorCode.BAD_REQUEST),
    (b'{"v": 1, "cmd": "x", "token": 5}', ErrorCode.BAD_REQUEST),
    (b'{"cmd": "system.ping"}', ErrorCode.VERSION),
    (b'{"v": 2, "cmd": "system.ping"}', ErrorCode.VERSION),
    (b'{"v": "1", "cmd": "system.ping"}', ErrorCode.VERSION),
    (b"\xff\xfe", ErrorCode.BAD_REQUEST),
]


@pytest.mark.parametrize(("line", "code"), BAD)
def test_malformed_requests_are_refused_with_a_code(line: bytes, code: ErrorCode) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(line)
    assert code == info.value.code


def test_a_request_round_trips_with_its_version_and_id() -> None:
    line = encode_request(7, "queue.list", {"status": "retry"}, token="t")
    assert line.endswith(b"\n") and len(line) < MAX_REQUEST_BYTES
    req = parse_request(line.rstrip(b"\n"))
    assert (7, "queue.list", {"status": "retry"}, "t") == (req.id, req.cmd, req.args, req.token)
    assert f'"v":{PROTOCOL_VERSION}'.encode() in line


def test_version_errors_keep_the_request_id() -> None:
    with pytest.raises(RequestError) as info:
        parse_request(b'{"v": 9, "id": 4, "cmd": "system.ping"}')
    assert 4 == info.value.request_id


def test_token_check_accepts_only_a_listed_hash() -> None:
    hashes = [hashlib.sha256(b"other").hexdigest(), hashlib.sha256(b"s3cret").hexdigest()]
    assert token_ok("s3cret", hashes)
    assert not token_ok("wrong", hashes)
    assert not token_ok(None, hashes)
    assert not token_ok("", [hashlib.sha256(b"").hexdigest()])
    assert not token_ok("s3cret", [])


def test_list_line_has_the_runbook_shape() -> None:
    row = ["01M8MSPFV9WZBW343VCQDXQR4K", "example.com", "retry", 3, 3725.2, 1796000000.0, "", 2]
    line = output.list_lines([row])
    assert (
        "id: 01M8MSPFV9WZBW343VCQDXQR4K domain: example.com, status: retry, attempts: 3, "
        "age: 1h02m, next: 2026-11-30T00:53:20Z, from: <>, rcpts: 2\n"
    ) == line
    # the runbook's extractions
    assert ["domain: example.com"] == re.findall(r"domain: [^,]*", line)
    assert ["id: 01M8MSPFV9WZBW343VCQDXQR4K"] == re.findall(r"id: [^ ]*", line)


def test_memoised_list_lines_equal_formatting_each_row() -> None:
    """Ages and timestamps come from per-second memos: the same text as formatting each
    row on its own, across chunks, fractions, zero/negative ages and no next attempt."""
    rows: list[list[Any]] = [
        ["01A", "a.test", "retry", i % 4, age, nxt, "s@x.test" if i % 2 else "", 1]
        for i, (age, nxt) in enumerate(
            [(0.0, 0.0), (-3.0, None), (59.99, 1796000000.75), (59.2, 1796000000.1)]
            + [(3725.2 + k * 0.37, 1796000000.0 + k * 0.6) for k in range(400)]
        )
    ]
    expected = "".join(
        f"id: {r[0]} domain: {r[1]}, status: {r[2]}, attempts: {r[3]}, "
        f"age: {output.duration(r[4])}, next: {output.timestamp(r[5])}, "
        f"from: {r[6] or '<>'}, rcpts: {r[7]}\n"
        for r in rows
    )
    assert expected == output.list_lines(rows[:200]) + output.list_lines(rows[200:])
    assert expected == output.list_lines(rows)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"), (90061, "1d01h")],
)
def test_durations_are_compact(seconds: float, text: str) -> None:
    assert text == output.duration(seconds)


def test_empathctl_finds_the_config_the_daemon_would_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """client.config_path mirrors config.load.discover_config_path (apart for start-up time)."""
    monkeypatch.chdir(tmp_path)
    named = tmp_path / "named.ron"
    named.write_text('Empath ( control_socket: "/run/named.sock" )')
    envfile = tmp_path / "env.ron"
    envfile.write_text('Empath ( control_socket: "/run/env.sock" )')
    cases: list[tuple[str | None, dict[str, str]]] = [
        (str(named), {"EMPATH_CONFIG": str(envfile)}),
        (None, {"EMPATH_CONFIG": str(envfile)}),
        (None, {}),
    ]
    for cli, env in cases:
        try:
            expected: Path | None = discover_config_path(cli, env)
        except ConfigError:
            expected = None  # (/etc/empath/empath.config.ron does not exist here)
        assert (None if expected is None else str(expected)) == config_path(cli, env)
    local = tmp_path / "empath.config.ron"
    local.write_text('Empath ( // no socket here\n  hostname: "a.test" )')
    assert str(discover_config_path(None, {})) == config_path(None, {})
    assert "/run/empath/empath.sock" == discover_socket(None, None, {}).path
    assert "/run/named.sock" == discover_socket(None, str(named), {}).path
    assert "/run/env.sock" == discover_socket(None, None, {"EMPATH_CONFIG": str(envfile)}).path
    # a file that is broken elsewhere still names its socket (as a daemon mid-reload sees)
    local.write_text('Empath ( control_socket: "/run/x.sock", delivery: ( max_attempts: "x" ) )')
    assert "/run/x.sock" == discover_socket(None, None, {}).path
    assert "/run/cli.sock" == discover_socket("/run/cli.sock", None, {}).path
    assert (
        "/run/e.sock" == discover_socket(None, None, {"EMPATH_CONTROL_SOCKET": "/run/e.sock"}).path
    )
    with pytest.raises(Unreachable):
        discover_socket(None, str(tmp_path / "missing.ron"), {})


SCAN_CASES = [
    ('Empath ( control_socket: "/run/a.sock" )', "/run/a.sock"),
    ('( control_socket: "/run/b.sock", hostname: "x.test" )', "/run/b.sock"),
    ('{ "control_socket": "/run/c.sock" }', "/run/c.sock"),
    ('Empath ( // control_socket: "/no.sock"\n  control_socket: "/run/d.sock" )', "/run/d.sock"),
    ('Empath ( /* control_socket: "/x" /* nested */ */ control_socket : "/run/e" )', "/run/e"),
    ('Empath ( delivery: ( control_socket: "/deep" ), hostname: "a.test" )', None),
    ('Empath ( hostname: "control_socket: \\"/x\\"" )', None),
    ('Empath ( my_control_socket_x: 1, control_socket: "/run/f" )', "/run/f"),
    ('Empath ( hostname: "a.test" )', None),
]


@pytest.mark.parametrize(("text", "expected"), SCAN_CASES)
def test_the_socket_scanner_agrees_with_the_ron_reader(text: str, expected: str | None) -> None:
    found = scan_control_socket(text)
    assert expected == found
    tree = to_python(parse(text))
    assert tree.get("control_socket") == found or "deep" in text or "my_control" in text


@pytest.mark.parametrize(
    "text",
    [
        'Empath ( control_socket: Some("/run/s") )',
        'Empath ( control_socket: r"/run/raw" )',
        'Empath ( control_socket: "/run/\\u{41}" )',
        'Empath ( control_socket: "unterminated',
    ],
)
def test_the_socket_scanner_defers_to_the_reader_when_unsure(text: str) -> None:
    assert scan_control_socket(text) is not None
    assert not isinstance(scan_control_socket(text), str)


@pytest.mark.parametrize(
    "argv",
    [
        ["queue", "stats"],
        ["--json", "queue", "stats"],
        ["--socket", "queue", "queue", "list", "--limit", "5", "--status", "retry"],
        ["queue", "list", "--domain", "x.test", "--json", "--token", "list"],
        ["--config", "/etc/e.ron", "queue", "view", "01ABC"],
        ["dns", "refresh", "example.org"],
        ["system", "ping"],
        ["config", "check"],
    ],
)
def test_the_parser_of_the_named_command_alone_parses_as_the_whole_one(argv: list[str]) -> None:
    """empathctl builds only the parser of the command named (start-up time): it must
    read every command line exactly as the parser of all commands does."""
    picked = empathctl.named_command(argv)
    assert 1 == len(picked)
    assert vars(empathctl.build_parser().parse_args(argv)) == vars(
        empathctl.build_parser(picked).parse_args(argv)
    )


@pytest.mark.parametrize("argv", [["queue"], ["queue", "--help"], ["queue", "nope"], []])
def test_help_and_unknown_commands_get_the_whole_parser(argv: list[str]) -> None:
    assert empathctl.COMMANDS == empathctl.named_command(argv)
