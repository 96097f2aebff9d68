"""LineSink: the JSON line it writes and its clock."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime

import pytest

from empath import logs


@pytest.mark.parametrize(
    ("us", "text"),
    [
        (1_764_464_097_000_042, "2025-11-30T00:54:57.000042Z"),
        (1_764_464_097_999_999, "2025-11-30T00:54:57.999999Z"),
        (1_764_464_098_000_000, "2025-11-30T00:54:58.000000Z"),
        (1_764_464_097_123_456, "2025-11-30T00:54:57.123456Z"),  # back to a cached second
    ],
)
def test_timestamp_has_six_padded_fraction_digits(us: int, text: str) -> None:
    assert logs.rfc3339_us(us) == text


def test_a_line_outside_an_event_loop_is_written_at_once_with_the_current_time() -> None:
    r, w = os.pipe()
    try:
        sink = logs.LineSink(w, logging.INFO, json_format=True)
        before = time.time()
        sink.emit(logging.ERROR, "empath.t", {"message": "boom", "component": "spool"})
        after = time.time()
        (raw,) = os.read(r, 65536).splitlines()
    finally:
        os.close(r)
        os.close(w)
    line = json.loads(raw)
    assert line["level"] == "ERROR"
    assert line["target"] == "empath.t"
    assert line["fields"] == {"message": "boom", "component": "spool"}
    stamp = datetime.strptime(line["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - 1e-6 <= stamp.timestamp() <= after + 1e-6
