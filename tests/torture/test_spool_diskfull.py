"""Torture, disk full: the daemon's spool on a small tmpfs fills up during ingest, compaction
and DSN creation; it is restarted while full; then space is freed.

Mail goes to ``a.test`` (accepts), ``defer.test`` (451: those messages stay queued and keep
old segments alive, so compaction has messages to copy forward) and ``bounce.test``
(451 at first, then 550 once the disk is full, so the DSNs are created on a full disk:
refused, or written into what compaction freed).
The bars: clients get only 250 or ``452 4.3.1``; compaction runs on the full disk (from the
space reserve, or failing with a log line) and DSN creation fails or fits in what it
freed, without corrupting anything; a restart on the full disk succeeds; once the filler
is deleted every acknowledged message reaches ``a.test``, every bounced one gets its DSN,
the 4xx ones are still queued, and the spool reopens with nothing to quarantine.
"""

from __future__ import annotations

import collections
import contextlib
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, queued_id, read_spool
from tests.helpers import fill, tmpfs_mount
from tests.torture.conftest import figure, pick
from tests.torture.relay_sink import BOUNCE, DEFER, DSN, Sink

OK = "a.test"
TMPFS = "16m"


def tmpfs(point: Path) -> contextlib.AbstractContextManager[Path]:
    return tmpfs_mount(point, TMPFS)


class Client:
    def __init__(self, port: int) -> None:
        self.port = port
        self.next_id = 0
        self.acked: dict[int, str] = {}  # torture id -> domain
        self.codes: collections.Counter[int] = collections.Counter()

    def send(self, domain: str, size: int = 2000) -> int:
        tid = self.next_id
        self.next_id += 1
        body = f"Subject: full {tid}\r\nX-Torture-Id: {tid}\r\n\r\n".encode()
        body += b"disk full torture line .....\r\n" * (size // 30)
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as conn:
            conn.ehlo()
            conn.mail(f"s{tid}@{DSN}")
            conn.rcpt(f"u{tid}@{domain}")
            code, text = conn.data(body)
        self.codes[code] += 1
        if code == 250:
            queued_id(text)
            self.acked[tid] = domain
        else:
            assert text.startswith(b"4.3.1 "), (code, text)
        return code


def count(d: Daemon, message: str) -> int:
    return len(d.logs(message))


def compaction_runs(d: Daemon) -> int:
    """Compactions that ran, whether they freed space or failed on the full disk (a
    segment whose live messages do not fit: the filler may take the released reserve)."""
    return sum(
        count(d, text)
        for text in (
            "Compacted a spool segment",
            "Compaction could not copy",
            "compaction failed",
            "Spool segment not compacted",
        )
    )


def wait_until(what: str, predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.timeout(pick(300, 3600))
def test_full_disk_during_ingest_compaction_and_dsn_creation(tmp_path: Path) -> None:
    burst = pick(300, 3000)
    with Sink() as sink, tmpfs(tmp_path / "mta" / "spool") as spool_dir:
        sink.bouncing = False
        route = {"mx_override": f"127.0.0.1:{sink.port}"}
        overrides: dict[str, Any] = {
            "spool": {"segment_bytes": 64 * 1024, "compact_interval_secs": 2.0},
            "delivery": {
                "domains": dict.fromkeys((OK, DEFER, BOUNCE, DSN), route),
                "base_retry_delay_secs": 1.0,
                "max_retry_delay_secs": 2.0,
                "retry_jitter_factor": 0.0,
                "circuit_breaker": {"failure_threshold": 1_000_000},  # keep retrying
            },
        }
        d = Daemon(tmp_path / "mta", overrides=overrides)
        assert spool_dir == d.spool_path
        filler = spool_dir / "filler"
        c = Client(d.smtp_port)
        d.start()
        try:
            for n in range(burst):  # segments full of finished mail, some still live
                assert 250 == c.send((DEFER, BOUNCE, OK, OK, OK)[n % 5])
            delivered = sink.state.delivered
            wait_until("the burst's a.test deliveries", lambda: len(delivered) >= burst * 3 // 5)
            # ingest on a full disk: 452s
            fill(filler, leave_bytes=48 * 1024)
            while c.codes[452] < 5:
                c.send(OK, size=8000)
                assert c.next_id < burst + 200, "the full spool never refused a message"
            fill(filler)
            compactions = compaction_runs(d)
            sink.bouncing = True  # the next retries fail for good: DSNs on a full disk
            # Compaction on the full disk either fails (the logs say so) or, since the space
            # reserve (issue 14 #15) is given up for deletions and compaction, succeeds.  The
            # DSNs are new mail: written only if compaction has freed room by the time the
            # bounce comes, else the outcome is not saved and the bounce is redone later.
            # Which one happens is a race with the compactor (since delivered mail's space
            # is reclaimable at once, f717bfd, the small CI burst usually frees enough), so
            # either is accepted here; the end of the test checks every DSN was sent.
            dsns_before = count(d, "DSN queued")
            wait_until(
                "a compaction on the full disk and a bounce whose DSN was saved or refused",
                lambda: (
                    compaction_runs(d) > compactions
                    and count(d, "Delivery failed permanently") > 0
                    and (
                        count(d, "Delivery outcome not saved") > 0
                        or count(d, "DSN queued") > dsns_before
                    )
                ),
            )
            # What compaction freed may take new mail again (250) - no restart needed - or
            # the disk is still full (452); either way nothing else.  Then take the space
            # back so the restart below happens on a full disk.
            assert c.send(OK) in (250, 452)
            fill(filler)
            d.stop()
            d.start(wait_path="/health/live")  # no start-up failure on a full disk
            restarted = d.logs("Spool recovered")[-1]["fields"]
            filler.unlink()
            wait_until(
                "every acknowledged message delivered (bounces: their DSN)",
                lambda: not _undelivered(c, sink.state.snapshot()[0]),
                timeout=120,
            )
        finally:
            code = d.stop()
        assert 0 == code, d.log_tail()
        compaction_failures = count(d, "Compaction could not copy") + count(d, "compaction failed")
        write_failures = count(d, "Spool write failed")
        dsn_fail = count(d, "Delivery failed permanently")
        crashed = count(d, "Delivery attempt crashed")
        unsaved = count(d, "Delivery outcome not saved")  # the runner's outcome could not be saved
        contents = read_spool(d.spool_path)
        again = read_spool(d.spool_path)
        corrupt = len(list((d.spool_path / "corrupt").iterdir()))
    queued = sum(1 for m in contents.messages.values() for u in m.units if u.domain == DEFER)
    figure(
        "disk-full",
        f"{len(c.acked):,} acknowledged, {c.codes[452]} answered 452 4.3.1 (nothing else); "
        f"on the full disk: {write_failures} spool write batches refused, {compaction_failures} "
        f"compactions failed, {dsn_fail} permanent failures logged ({unsaved} attempts whose "
        f"outcome or DSN could not be saved, redone later); restart on the full disk "
        f"recovered {restarted['messages']} messages; after freeing space: all delivered or "
        f"bounced, {queued} 4xx units queued, {corrupt} regions quarantined, 0 left",
    )
    assert set(c.codes) <= {250, 452}
    assert 0 == crashed, "a full spool is an expected condition, not a crash"
    assert (0, 0) == (again.report.quarantined, again.report.missing)
    assert queued == sum(1 for dom in c.acked.values() if dom == DEFER)
    assert 0 == corrupt


def _undelivered(c: Client, delivered: set[tuple[int, str]]) -> list[tuple[int, str]]:
    out = []
    for tid, domain in list(c.acked.items()):
        key = (tid, "dsn") if domain == BOUNCE else (tid, domain)
        if domain != DEFER and key not in delivered:
            out.append(key)
    return out
