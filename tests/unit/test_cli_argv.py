"""`empathctl`'s command line without argparse (empath.cli.argv): every line the plain
reader accepts reads exactly as argparse reads it, every other line goes to argparse;
and the view commands' whole path - parse, connect, ask, print - runs without importing
argparse, re, enum, json, socket or collections (start-up CPU per view)."""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from empath.cli import argv as cmdline
from empath.cli import empathctl

SAMPLES = ["5", "0", "-3", "x", "2h", "3q", "2.5", "", "a b", "x.test", "01ABC", "retry", "held"]


def argparse_reads(argv: list[str]) -> dict[str, Any] | None:
    """What main()'s argparse parser makes of ``argv``; None for a usage error/help."""
    empathctl._JSON_REQUESTED[0] = False
    try:
        return vars(empathctl.build_parser(empathctl.named_command(argv)).parse_args(argv))
    except SystemExit:
        return None


def plain_reads(argv: list[str]) -> dict[str, Any] | None:
    ns = cmdline.read(argv, empathctl.named_command(argv), empathctl._global_options)
    return None if ns is None else vars(ns)


def declared(c: empathctl.CliCommand) -> cmdline.Recorder:
    rec = cmdline.Recorder()
    c.configure(rec)
    return rec


def lines_of(c: empathctl.CliCommand) -> list[list[str]]:
    """Command lines for ``c``: positionals, each option with sample values, the two
    spellings, global options before and after, and a few lines argparse must judge."""
    rec = declared(c)
    head = [c.group, c.name]
    pos = [["01ABC"] if not a.optional else [] for a in rec.positionals]
    base = head + list(itertools.chain.from_iterable(pos))
    out = [head, base, [*base, "extra"], ["--json", *base], [*base, "--json", "--socket", "/s"]]
    out += [["--socket", "/s", "--token", "t", *base], ["--socket", *base], [*base, "--"]]
    out += [[*base, "-h"], [*base, "--nope"], [*head, "--json", *base[2:]]]
    for flag, arg in rec.options.items():
        values = list(arg.choices or ()) + SAMPLES if arg.kind == "store" else [None]
        for v in values:
            if v is None:
                out += [[*base, flag], [*base, flag, flag], [*base, f"{flag}=x"]]
            else:
                out += [[*base, flag, v], [*base, f"{flag}={v}"], [*head, flag, v, *base[2:]]]
        out += [[*base, flag[:-1]]]  # an abbreviation: argparse's to judge
        if arg.kind == "store":
            out += [[*base, flag]]  # no value
    return out


ALL_LINES = [line for c in empathctl.COMMANDS for line in lines_of(c)]


def test_the_suppress_marker_is_argparses() -> None:
    assert argparse.SUPPRESS == cmdline.SUPPRESS


def test_a_line_the_plain_reader_accepts_reads_as_argparse_reads_it() -> None:
    accepted = 0
    for argv in ALL_LINES:
        plain = plain_reads(argv)
        if plain is not None:
            assert argparse_reads(argv) == plain, argv
            accepted += 1
    assert accepted > len(ALL_LINES) // 3  # most lines are plain ones


def test_the_plain_reader_takes_the_ordinary_lines_of_every_command() -> None:
    """Not a reader that defers everything: the runbook's and the views' lines, and a
    line per command with its positionals, are read without argparse."""
    lines = [
        ["queue", "summary"],
        ["queue", "summary", "--limit", "20"],
        ["queue", "summary", "--json"],
        ["breaker", "list"],
        ["breaker", "list", "--domain", "x.test"],
        ["queue", "list", "--status", "retry"],
        ["queue", "delete", "01ABC"],
        ["queue", "suspend", "x.test", "--for", "2h", "--reason", "down"],
        ["queue", "bounce", "--older-than", "3d", "--yes"],
        ["--socket", "/run/e.sock", "queue", "stats"],
    ]
    for argv in lines:
        assert plain_reads(argv) is not None, argv
        assert argparse_reads(argv) == plain_reads(argv)
    plainly_declared = [c for c in empathctl.COMMANDS if declared(c).plain]
    assert len(plainly_declared) >= len(empathctl.COMMANDS) - 1  # `user set` shares a dest
    for c in plainly_declared:
        argv = [c.group, c.name] + ["01ABC" for a in declared(c).positionals if not a.optional]
        if not any(a.required for a in declared(c).options.values()):
            assert plain_reads(argv) is not None, argv


def test_lines_the_plain_reader_leaves_to_argparse() -> None:
    for argv in (
        ["queue", "summary", "--lim", "5"],  # abbreviation
        ["queue", "summary", "--limit", "x"],  # type error
        ["queue", "list", "--status", "nope"],  # not a choice
        ["queue", "view", "--body", "01ABC"],  # positional after an option
        ["queue", "summary", "-h"],
        ["user", "set", "bob", "--no-null-sender"],  # two options, one dest
        ["queue", "--json", "summary"],
    ):
        assert plain_reads(argv) is None, argv


TOKENS = st.sampled_from(
    sorted(
        {f for c in empathctl.COMMANDS for f in declared(c).options}
        | {"queue", "summary", "list", "view", "--json", "--socket", "--", "-", "x"}
        | set(SAMPLES)
    )
)


@settings(max_examples=300, deadline=None)
@given(
    c=st.sampled_from(empathctl.COMMANDS),
    before=st.lists(TOKENS, max_size=3),
    after=st.lists(TOKENS, max_size=6),
)
def test_random_lines_read_alike_or_go_to_argparse(
    c: empathctl.CliCommand, before: list[str], after: list[str]
) -> None:
    argv = [*before, c.group, c.name, *after]
    plain = plain_reads(argv)
    if plain is not None:
        assert argparse_reads(argv) == plain


# --- the view's whole path, against a socket that answers as the daemon does ----------

SUMMARY = {
    "domains": [
        {
            "domain": "a.test",
            "total": 3,
            "by_status": {"pending": 2, "retry": 1, "in_progress": 0, "held": 0},
            "ages": [3, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "rate_per_s": 10.0,
            "burst": 10,
            "max_connections": 20,
            "connections": 0,
            "delivered_last_min": 0,
            "throttled": True,
            "suspended": False,
            "breaker": "Open",
            "waiting_for": ["circuit breaker open until 2026-12-07T10:14:26Z"],
        }
    ],
    "domain_count": 2,
    "units": 4,
    "total": {
        "by_status": {"pending": 3, "retry": 1, "in_progress": 0, "held": 0},
        "ages": [4] + [0] * 9,
    },
    "age_buckets": ["5m", "10m", "20m", "40m", "80m", "160m", "320m", "640m", "1280m", "older"],
}  # fmt: skip
BREAKERS = {
    "breakers": [
        {
            "domain": "a.test",
            "state": "Open",
            "since": 1.8e9,
            "reopens_at": 1.8e9 + 3600,
            "failures": 0,
            "trips_total": 1,
            "last_error": "421 4.3.2 busy",
        }
    ],
    "count": 2,
    "clustered": False,
}
LIGHT_PATH_AVOIDS = {"argparse", "re", "enum", "json", "socket", "collections", "typing"}


def answer(server: socket.socket, data: dict[str, Any]) -> None:
    import json

    conn, _ = server.accept()
    with conn, conn.makefile("rb") as f:
        request = json.loads(f.readline())
        reply = {"v": 1, "id": request["id"], "ok": True, "data": data}
        text = json.dumps(reply) + "\n"
        half = len(text) // 2  # two segments: the client joins them into one line
        conn.sendall(text[:half].encode())
        conn.sendall(text[half:].encode())


@pytest.mark.parametrize(
    ("argv", "data", "expect"),
    [
        (["queue", "summary"], SUMMARY, "THROTTLED"),
        (["breaker", "list"], BREAKERS, "error: 421"),
    ],
)
def test_a_view_runs_without_argparse_re_enum_json_or_socket(
    tmp_path: Path, argv: list[str], data: dict[str, Any], expect: str
) -> None:
    path = str(tmp_path / "c.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        t = threading.Thread(target=answer, args=(server, data))
        t.start()
        code = (
            "import sys\n"
            "from empath.cli.empathctl import main\n"
            f"rc = main(['--socket', {path!r}, *{argv!r}])\n"
            "print('RC', rc, 'MODULES', *sorted(sys.modules))\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMPATH_")}
        out = subprocess.run(
            [sys.executable, "-c", code],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        t.join(10)
    assert "" == out.stderr
    text, _, tail = out.stdout.rpartition("RC ")
    assert expect in text
    assert "... and 1 more" in text
    rc, modules = tail.split(" MODULES ")
    assert "0" == rc
    assert set() == LIGHT_PATH_AVOIDS & set(modules.split())
