"""Torture, scale: the daemon restarted on a queue of many units (1,000,000 full, 50,000 ci).

The queue is written straight into log segments with the spool's own codec (the
records the writer would produce: one MSG per message, one unit each, waiting for a
retry a day away, so nothing is attempted while we measure), which builds a million
units in seconds.  The daemon is then started on it; the figure is the time from
spawn to ``Empath ready`` (spool recovery + the runner's schedule), and the RSS per
queued unit above an empty daemon's.

Goals (issue 20): restart <= 20 s and <= 1 KiB of RSS per queued unit, both asserted.
Wall time to ready is mostly the machine's load on the shared VM, so the figure line also
gives the daemon's CPU seconds to ready, which the load moves far less.  Before issue 20:
1.8-2.0 KiB per unit and 47 s (compiled) to 245 s (pure, loaded) for 1M.  Since then the
spool holds a waiting message as a brief (spool/index.py: what the queue's views read plus
where its newest records are) and decodes it when a unit comes due or a command asks;
recovery builds briefs straight from the records' JSON (figures: docs/bench.md, "Memory
per queued unit").
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from empath.ids import new_ulid
from empath.spool import codec
from empath.spool.codec import RecordType
from empath.spool.model import Envelope, UnitStatus, initial_units
from empath.spool.writer import create_segment
from tests.daemon import Daemon, parked_overrides
from tests.torture.conftest import figure, full_scale, pick

SEGMENT_BYTES = 64 * 1024 * 1024
BODY = b"Subject: scale\r\nMessage-ID: <scale@empath.test>\r\n\r\n" + b"queued for later.\r\n" * 8
GOAL_SECONDS = 20.0
GOAL_BYTES_PER_UNIT = 1024


def build_queue(spool: Path, units: int, now: float) -> None:
    """``units`` messages of one unit each, due in a day, as the writer would log them."""
    log_dir = spool / "log"
    for sub in ("log", "bodies", "corrupt"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    env = Envelope("sender@scale.test", ("rcpt@parked.test",), now - 60.0, peer="127.0.0.1:1")
    (unit,) = initial_units(env.recipients, now - 60.0)
    unit = replace(unit, status=UnitStatus.RETRY, attempts=1, next_attempt_at=now + 86400.0)
    template, _ = codec.msg_payload(
        "0" * 26, env, (unit,), body_bytes=len(BODY), spilled=False, inline_body=BODY
    )
    rest = template[26:]
    seg = create_segment(log_dir, 1, None, now)
    os.close(seg.read_fd)
    out = seg.path.open("ab", buffering=1024 * 1024)
    size = seg.size
    try:
        for _ in range(units):
            payload = new_ulid().encode() + rest
            if size + codec.HEADER_BYTES + len(payload) > SEGMENT_BYTES:
                out.close()
                seg = create_segment(log_dir, seg.seq + 1, size, now)
                os.close(seg.read_fd)
                out = seg.path.open("ab", buffering=1024 * 1024)
                size = seg.size
            record = codec.frame(RecordType.MSG, payload, seg.seed)  # the segment's seed
            out.write(record)
            size += len(record)
        out.flush()
        os.fsync(out.fileno())
    finally:
        out.close()


def start_measured(d: Daemon, timeout: float) -> tuple[float, float, int]:
    """(seconds from spawn to "Empath ready", the daemon's CPU seconds by then, VmRSS KiB
    once ready)."""
    started = time.monotonic()
    d.start(timeout=timeout, wait_path="/health/live")
    d.wait_log("Empath ready", timeout=timeout)
    seconds = time.monotonic() - started
    return seconds, cpu_seconds(d.pid), d.rss_kib()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(pick(300, 3600))
def test_restart_on_a_large_queue(tmp_path: Path) -> None:
    units = pick(50_000, 1_000_000)
    overrides = parked_overrides("parked.test")
    overrides["health"] = {"max_queue_size": 10 * units}
    timeout = 600.0 if full_scale() else 120.0

    empty = Daemon(tmp_path / "empty", overrides=overrides)
    try:
        _, _, base_kib = start_measured(empty, timeout)
    finally:
        empty.stop()

    d = Daemon(tmp_path / "big", overrides=overrides)
    built = time.monotonic()
    build_queue(d.spool_path, units, time.time())
    build_s = time.monotonic() - built
    try:
        seconds, cpu_s, rss_kib = start_measured(d, timeout)
        (recovered,) = d.logs("Spool recovered")
        (runner,) = d.logs("Delivery runner started")
    finally:
        assert 0 == d.stop(), d.log_tail()
    fields = recovered["fields"]
    assert (units, 0, 0) == (fields["messages"], fields["quarantined"], fields["missing"])
    assert units == runner["fields"]["units"]
    per_unit = (rss_kib - base_kib) * 1024 / units
    met = "met" if per_unit <= GOAL_BYTES_PER_UNIT else "NOT met"
    figure(
        "scale",
        f"{units:,} queued units: restart {seconds:.1f} s to ready, {cpu_s:.1f} s of CPU "
        f"(recovery {fields['seconds']:.1f} s; goal < {GOAL_SECONDS:.0f} s), "
        f"RSS {rss_kib / 1024:.0f} MiB"
        f" = {per_unit:.0f} B per unit above an empty daemon's {base_kib / 1024:.0f} MiB "
        f"(goal <= {GOAL_BYTES_PER_UNIT} B: {met}); queue built in {build_s:.1f} s",
    )
    assert seconds < GOAL_SECONDS
    assert per_unit <= GOAL_BYTES_PER_UNIT, "see the figure line"
