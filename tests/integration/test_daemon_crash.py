"""Crash safety of the real daemon: SIGKILL while clients send, restart, nothing acknowledged lost.

Several client threads send continuously with smtplib (reconnecting whenever the
daemon is down) and record every message that got ``250 ... queued as <ID>``,
with the exact body they sent.  The test SIGKILLs the daemon at random moments
and restarts it on the same spool.  After every kill a copy of the spool is
recovered and checked: every id acknowledged so far is present with its body
and envelope.  At the end the daemon is stopped and the spool itself is checked
the same way, and every file in ``corrupt/`` must correspond to a quarantine
the daemon reported when it recovered (once, a torn record is appended to the
log by hand, as a power cut could leave it); a final reopen finds nothing left
to quarantine.  All mail goes to a parked domain, so nothing leaves the spool.
"""

from __future__ import annotations

import random
import shutil
import smtplib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from empath.spool import codec
from tests.daemon import (
    Daemon,
    SpoolContents,
    assert_stored,
    parked_overrides,
    queued_id,
    read_spool,
)
from tests.helpers import wait_for

CLIENTS = 8
KILLS = 5
SPILL_BYTES = 256 * 1024  # FileSpool's default: larger bodies go to their own file
SPILL_EVERY = 25  # every 25th message is larger than SPILL_BYTES
TORN_AFTER_KILL = 2  # after this kill the log also gets a torn record at its end


@dataclass
class Ledger:
    """What the clients were told: id -> (sender, recipients, body) for every 250."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, tuple[str, tuple[str, ...], bytes]] = field(default_factory=dict)
    failures: int = 0  # transactions cut off by a kill (no 250): may or may not be stored

    def snapshot(self) -> dict[str, tuple[str, tuple[str, ...], bytes]]:
        with self.lock:
            return dict(self.acked)

    def __len__(self) -> int:
        with self.lock:
            return len(self.acked)


def message(client: int, seq: int) -> tuple[str, tuple[str, ...], bytes]:
    sender = f"c{client}@parked.test"
    rcpts = tuple(f"r{client}.{seq}.{k}@parked.test" for k in range(1 + seq % 3))
    pad = b"" if seq % SPILL_EVERY else b"%d-pad .\r\n" % seq * 30_000
    body = (
        b"Subject: crash test %d/%d\r\nX-Seq: %d\r\n\r\n"
        b".leading dot %d\r\n..two dots\r\n%s"
        b"end of message %d from client %d\r\n"
    ) % (client, seq, seq, seq, pad, seq, client)
    return sender, rcpts, body


def client_loop(client: int, port: int, ledger: Ledger, stop: threading.Event) -> None:
    """Send until `stop`, reconnecting after every failure; record each 250."""
    seq = 0
    while not stop.is_set():
        try:
            conn = smtplib.SMTP("127.0.0.1", port, timeout=10)
        except (smtplib.SMTPException, OSError):
            time.sleep(0.02)  # the daemon is down: back off briefly and try again
            continue
        try:
            conn.ehlo(f"client{client}.example")
            while not stop.is_set():
                seq += 1
                sender, rcpts, body = message(client, seq)
                conn.mail(sender)
                for rcpt in rcpts:
                    code, text = conn.rcpt(rcpt)
                    if code != 250:
                        raise smtplib.SMTPRecipientsRefused({rcpt: (code, text)})
                code, text = conn.data(body)  # raises SMTPDataError unless 250
                msg_id = queued_id(text)
                with ledger.lock:
                    ledger.acked[msg_id] = (sender, rcpts, body)
        except (smtplib.SMTPException, OSError):
            with ledger.lock:
                ledger.failures += 1
        finally:
            conn.close()


def check_acknowledged(
    contents: SpoolContents, acked: dict[str, tuple[str, tuple[str, ...], bytes]]
) -> None:
    missing = sorted(set(acked) - set(contents.messages))
    assert [] == missing, f"{len(missing)} acknowledged messages lost"
    for msg_id, (sender, rcpts, body) in acked.items():
        msg = assert_stored(contents, msg_id, body)
        assert (sender, rcpts) == (msg.envelope.sender, msg.envelope.recipients)
        assert ["parked.test"] == [u.domain for u in msg.units]
        assert sorted(rcpts) == sorted(r.address for r in msg.units[0].recipients)


def recovered_copy(spool: Path, scratch: Path) -> SpoolContents:
    """Recover a copy of a killed daemon's spool, leaving the original for the daemon."""
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(spool, scratch)
    try:
        return read_spool(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def tear_tail(spool: Path) -> None:
    """Leave what a crash in the middle of a log write leaves: the first part of a record.

    (A SIGKILL rarely tears a write on Linux - the page cache completes it - so the
    torn tail a power cut could leave is made by hand once.)
    """
    seg = max((spool / "log").glob("*.seg"))
    parsed = codec.parse_segment_name(seg.name)
    assert parsed is not None
    record = codec.frame(codec.RecordType.MSG, b"01TORN" + b"x" * 2000, parsed[1])
    with seg.open("r+b") as f:  # where the records end: a pre-formatted segment's zeros follow
        f.seek(len(seg.read_bytes().rstrip(b"\0")))
        f.write(record[: len(record) // 2])


def test_sigkill_during_continuous_ingest_loses_no_acknowledged_message(tmp_path: Path) -> None:
    """Five SIGKILLs 0.3-1.5 s apart while 8 clients send; after each kill and at the end
    every acknowledged message is in the spool byte-exact, corrupt/ holds exactly the
    regions the daemon reported quarantining (a torn tail added after the third kill among
    them), and a final reopen quarantines nothing."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    d = Daemon(tmp_path / "empath", overrides=parked_overrides("parked.test"))
    ledger = Ledger()
    stop = threading.Event()
    threads = [
        threading.Thread(target=client_loop, args=(i, d.smtp_port, ledger, stop), daemon=True)
        for i in range(CLIENTS)
    ]
    d.start()
    try:
        for t in threads:
            t.start()
        for kill in range(KILLS):
            before = len(ledger)

            def twenty_more(n: int = before + 20) -> bool:
                return len(ledger) >= n

            wait_for(twenty_more, 20, what="clients to get 250s")
            time.sleep(rng.uniform(0.3, 1.5))  # a random moment under load, not a sync
            d.kill()
            if kill == TORN_AFTER_KILL:
                tear_tail(d.spool_path)
            acked = ledger.snapshot()
            contents = recovered_copy(d.spool_path, tmp_path / "copy")
            try:
                check_acknowledged(contents, acked)
            except AssertionError as exc:
                raise AssertionError(f"after kill {kill + 1} (seed {seed}): {exc}") from exc
            d.start()
        before = len(ledger)
        wait_for(lambda: len(ledger) >= before + 20, 20, what="clients to get 250s")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        code = d.stop()
    assert not any(t.is_alive() for t in threads)
    assert 0 == code, d.log_tail()

    acked = ledger.snapshot()
    assert len(acked) > 100 * (KILLS + 1) // 2, f"too little traffic: {len(acked)}"
    contents = read_spool(d.spool_path)
    check_acknowledged(contents, acked)
    assert 0 == contents.report.quarantined  # the daemon's recoveries left nothing torn
    assert 0 == contents.report.missing
    # Bodies spilled by transactions a kill cut short were cleaned up: only live ones remain.
    spilled = {i for i, body in contents.bodies.items() if len(body) > SPILL_BYTES}
    assert spilled == {p.name for p in (d.spool_path / "bodies").iterdir()}

    recoveries = [
        line["fields"]
        for line in d.log_lines()
        if line.get("fields", {}).get("message") == "Spool recovered"
    ]
    assert KILLS + 1 == len(recoveries)
    assert 0 == sum(r["missing"] for r in recoveries)
    quarantined = sorted(
        Path(line["fields"]["path"]).name
        for line in d.log_lines()
        if line.get("fields", {}).get("message") == "Quarantined corrupt spool region"
    )
    assert sum(r["quarantined"] for r in recoveries) == len(quarantined)
    assert len(quarantined) >= 1  # at least the torn tail
    assert quarantined == sorted(p.name for p in (d.spool_path / "corrupt").iterdir())
