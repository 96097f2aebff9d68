"""Issue 14, defects 8 and 14: the escaping helpers and the outputs that use them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from empath.control.output import list_line_items, view_text
from empath.logs import encode_line
from empath.textsafe import json_line, json_text, list_field, terminal

HOSTILE = [
    "\x1b]52;c;aGVsbG8=\x07",  # OSC 52: write the clipboard
    "\x1b[2J\x1b[H",  # clear the screen
    "a\x9b31mb",  # C1 CSI
    "line\x85next",  # C1 NEL: a line break to str.splitlines
    "one\u2028two\u2029three",  # Unicode line and paragraph separators
    "tab\there\r\nnew",
    "bidi \u202egnp.exe",
]


@pytest.mark.parametrize("text", ["plain", "ünïcödé ok", "a b, c", "", "\\back"])
def test_printable_text_is_unchanged_for_the_terminal(text: str) -> None:
    assert text == terminal(text)


@pytest.mark.parametrize("text", HOSTILE)
def test_terminal_text_holds_no_control_but_the_tab(text: str) -> None:
    out = terminal(text)
    assert all(ch.isprintable() or ch == "\t" for ch in out), repr(out)
    assert len(out.splitlines()) <= 1


def test_terminal_escapes_are_readable() -> None:
    assert "\\x1b]52;c;aGVsbG8=\\x07" == terminal("\x1b]52;c;aGVsbG8=\x07")
    assert "one\\u2028two" == terminal("one\u2028two")
    assert "a\\x9bb" == terminal("a\x9bb")


@pytest.mark.parametrize(
    ("expected", "text"),
    [
        ("user@example.com", "user@example.com"),
        ('"x\\x20id:\\x20V\\x20dom:\\x20v.test\\x2c"@e.test', '"x id: V dom: v.test,"@e.test'),
        ("a\\x5c\\x20b", "a\\ b"),
        ("x\\u2028y\\x85z", "x\u2028y\x85z"),
    ],
)
def test_list_fields_escape_separators_backslashes_and_controls(expected: str, text: str) -> None:
    assert expected == list_field(text)


@pytest.mark.parametrize("text", [*HOSTILE, "a b", "a,b", "a\\x20b", "\u00a0nbsp"])
def test_list_fields_hold_no_separator_and_are_never_ambiguous(text: str) -> None:
    out = list_field(text)
    assert " " not in out and "," not in out and out.isprintable()
    # Distinct inputs stay distinct (a literal backslash cannot forge an escape).
    assert out != list_field(text + "x")
    assert list_field("a\\x20b") != list_field("a b")


def test_json_lines_escape_c1_and_line_separators_and_stay_json() -> None:
    for text in HOSTILE:
        raw = json.dumps({"v": text}, ensure_ascii=False)
        line = json_line(raw.encode())
        assert 1 == len(line.decode().splitlines())
        assert {"v": text} == json.loads(line)
        assert {"v": text} == json.loads(json_text(raw))
        assert 1 == len(json_text(raw).splitlines())


def test_log_lines_are_one_record_per_line_for_any_splitter() -> None:
    line = encode_line({"fields": {"sender": "a\u2028b\x85c\u2029d", "m": "\x1b[2J"}})
    text = line.decode()
    assert [text] == text.splitlines()
    assert "\x1b" not in text
    assert "a\u2028b\x85c\u2029d" == json.loads(line)["fields"]["sender"]


def test_a_queue_list_line_keeps_hostile_senders_inside_their_field() -> None:
    row: list[Any] = [
        "01AAAAAAAAAAAAAAAAAAAAAAAA",
        "reject.test",
        "failed",
        1,
        5.0,
        None,
        '"x id: 01BBBBBBBBBBBBBBBBBBBBBBBB domain: victim.test,"@evil.test',
        1,
    ]
    (line,) = list_line_items([row])
    assert 1 == line.count("id: ") and 1 == line.count("domain: ")
    assert 1 == len(line.splitlines())


def test_queue_view_escapes_headers_preview_and_remote_replies() -> None:
    data: dict[str, Any] = {
        "id": "01AAAAAAAAAAAAAAAAAAAAAAAA",
        "sender": "s\x1b[2J@evil.test",
        "recipients": ["r@p.test"],
        "received_at": 0,
        "age_s": 1.0,
        "peer": "127.0.0.1",
        "helo": "evil\x07",
        "size": 10,
        "is_dsn": False,
        "units": [
            {
                "domain": "p.test",
                "status": "failed",
                "attempts": 1,
                "next_attempt_at": None,
                "recipients": [
                    {"address": "r@p.test", "status": "failed", "code": 550,
                     "text": "5.1.1 \x1b]52;c;aGk=\x07 no\u2028such user"},
                ],
                "history": [{"at": 0, "mx": "mx\x1b.p.test", "code": 550, "text": "\x9b2J"}],
            }
        ],
        "headers": "Subject: \x1b]0;title\x07\r\nX: \u2028",
        "body_preview": "hi \x1b[31m\r\n\x85",
    }  # fmt: skip
    out = view_text(data)
    for raw in ("\x1b", "\x07", "\x9b", "\x85", "\u2028"):
        assert raw not in out
    assert "5.1.1 \\x1b]52;c;aGk=\\x07 no\\u2028such user" in out
    assert "Subject: \\x1b]0;title\\x07" in out
