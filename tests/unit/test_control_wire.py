"""The client's JSON (empath.control.wire, on ``_json`` without the ``json`` package)
against the stdlib's, and the client's own line splitting."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.control import protocol, wire
from empath.control.client import ControlClient, SocketChoice, Unreachable
from empath.errors import ControlError

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
DOCS = st.recursive(
    SCALARS, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(), c, max_size=5)
)


@given(DOCS)
def test_dumps_writes_what_json_writes(doc: Any) -> None:
    assert json.dumps(doc, separators=(",", ":")) == wire.dumps(doc)


@given(DOCS, st.sampled_from([None, 2]), st.booleans())
def test_loads_reads_what_json_reads(doc: Any, indent: int | None, ascii_only: bool) -> None:
    text = json.dumps(doc, indent=indent, ensure_ascii=ascii_only)
    assert json.loads(text) == wire.loads(text)
    assert json.loads(text) == wire.loads(f" {text}\n".encode())


def test_constants_read_as_json_reads_them() -> None:
    got = wire.loads('[NaN, Infinity, -Infinity, 1e400, 12345678901234567890, "\\ud83d\\ude00"]')
    assert math.isnan(got[0])
    assert [math.inf, -math.inf, math.inf, 12345678901234567890, "\U0001f600"] == got[1:]


@pytest.mark.parametrize(
    "text", ["", " ", "{", "[1,]", "1 2", '{"a":1}x', '"\x01"', "{'a': 1}", "nul", b"\xff"]
)
def test_what_json_refuses_is_a_value_error(text: str | bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        wire.loads(text)


def test_dumps_refuses_what_json_refuses_and_stays_usable() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular"):
        wire.dumps(loop)
    with pytest.raises(TypeError):
        wire.dumps({"a": object()})
    shared = [1]
    assert "[[1],[1]]" == wire.dumps([shared, shared])  # no mark left by the failures


def test_the_protocol_module_re_exports_the_wire_constants() -> None:
    assert protocol.ErrorCode.AUTH == wire.AUTH_ERROR
    assert protocol.encode_request is wire.encode_request
    assert (1, 65536) == (protocol.PROTOCOL_VERSION, protocol.MAX_REQUEST_BYTES)
    assert b'{"v":1,"id":3,"cmd":"queue.summary","args":{"limit":5},"token":"t"}\n' == (
        wire.encode_request(3, "queue.summary", {"limit": 5}, "t")
    )


class Chunks:
    """A connection that delivers exactly these byte chunks, then EOF."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    sent = b""

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def recv(self, _n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def close(self) -> None:
        self.chunks = []


def frames(*objs: dict[str, Any]) -> bytes:
    return b"".join(json.dumps({"v": 1, "id": 1, "ok": True, **o}).encode() + b"\n" for o in objs)


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_replies_split_anywhere_are_read_as_whole_lines(cuts: list[int]) -> None:
    data = frames({"more": True, "items": ["a", "é"]}, {"more": True, "items": [1]}, {"data": {}})
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    client = ControlClient(SocketChoice("/nowhere", "test"))
    client._sock = Chunks([data[a:b] for a, b in itertools_pairs(points)])  # type: ignore[assignment]
    client._next_id = 1
    assert [["a", "é"], [1]] == list(client.stream("queue.list"))


def itertools_pairs(points: list[int]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in itertools.pairwise(points) if b > a]


def test_a_reply_that_is_not_json_is_a_control_error_and_eof_is_unreachable() -> None:
    client = ControlClient(SocketChoice("/nowhere", "test"))
    client._sock = Chunks([b"<html>\n"])  # type: ignore[assignment]
    with pytest.raises(ControlError, match="unexpected reply"):
        client._frame()
    client._sock = Chunks([])  # type: ignore[assignment]
    with pytest.raises(Unreachable, match="closed the connection"):
        client._frame()
