"""Torture, crash: SIGKILLs at random moments while the daemon relays mail to several domains.

The daemon relays to an in-process sink (one asyncio SMTP server, behaviour by
recipient domain): ``a/b/c.test`` accept, ``defer.test`` answers ``451`` (those
units stay queued), ``bounce.test`` answers ``550`` (a DSN goes to the sender's
domain ``dsn.test``, which accepts).  A fifth of the messages go to several
domains (mixes included).  The spool rotates every 64 KiB and is compacted twice a
second, so kills land during group commits, segment rotations, compactions and DSN
creation alike (the figure line says what each daemon life had done).

At each kill the daemon is first frozen (SIGSTOP); the sink's deliveries and a copy
of the frozen spool give the deliveries *in flight*: accepted by the sink (or in a
transaction with it) but not yet final in the spool, plus DSNs created for a bounced
unit not yet final - the only ones a restart may repeat.  Then SIGKILL and
restart, while the clients keep sending.  After the last restart: every message
that got a 250 reached each accepting domain (multi-domain ones: every domain),
its 4xx units are still queued, its bounced units produced a DSN; no corrupt record
is left unquarantined; duplicates <= the sum of deliveries in flight at the kills.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import shutil
import signal
import smtplib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from empath.spool.fs import FileSpool
from empath.spool.model import UnitStatus
from tests.daemon import Daemon, queued_id, read_spool
from tests.torture.conftest import figure, pick
from tests.torture.relay_sink import BOUNCE, DEFER, DSN, TID, Sink

ACCEPT = ("a.test", "b.test", "c.test")
SENDERS = 4


# --- the clients ------------------------------------------------------------------


@dataclass
class Sent:
    acked: dict[int, tuple[str, ...]] = field(default_factory=dict)  # torture id -> domains
    next_id: int = 0
    refused: int = 0  # transactions cut by a kill (no 250: not required)
    lock: threading.Lock = field(default_factory=threading.Lock)


def domains_for(rng: random.Random) -> tuple[str, ...]:
    roll = rng.random()
    if roll < 0.6:
        return (rng.choice(ACCEPT),)
    if roll < 0.8:  # multi-domain, some mixed with a deferring or a bouncing domain
        extra = rng.choice(((), (), (DEFER,), (BOUNCE,)))
        return (*rng.sample(ACCEPT, rng.choice((2, 3))), *extra)
    return (DEFER,) if roll < 0.9 else (BOUNCE,)


def client(port: int, sent: Sent, total: int, seed: int, stop: threading.Event) -> None:
    rng = random.Random(seed)
    conn: smtplib.SMTP | None = None
    while not stop.is_set():
        if conn is None:  # connect first: while the daemon is down, no message is used up
            try:
                conn = smtplib.SMTP("127.0.0.1", port, timeout=30)
            except OSError:
                time.sleep(0.02)
                continue
        with sent.lock:
            if sent.next_id >= total:
                break
            tid = sent.next_id
            sent.next_id += 1
        domains = domains_for(rng)
        rcpts = [f"u{tid}@{d}" for d in domains]
        body = (
            f"Subject: torture {tid}\r\nX-Torture-Id: {tid}\r\n\r\n".encode()
            + b"crash torture body line\r\n" * rng.randrange(2, 40)
        )
        try:
            conn.ehlo_or_helo_if_needed()
            code, _ = conn.mail(f"s{tid}@{DSN}")
            for r in rcpts:
                if code == 250:
                    code, _ = conn.rcpt(r)
            if code != 250:
                raise smtplib.SMTPResponseException(code, b"refused")
            code, text = conn.data(body)
            if code == 250:
                queued_id(text)
                with sent.lock:
                    sent.acked[tid] = domains
                continue
            raise smtplib.SMTPResponseException(code, text)
        except (OSError, smtplib.SMTPException):
            with sent.lock:
                sent.refused += 1
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            conn = None
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.quit()


# --- kills ------------------------------------------------------------------------


def pending_keys(spool_copy: Path) -> tuple[set[tuple[int, str]], int]:
    """(torture id, domain or "dsn") a frozen spool would still deliver, and how many of
    its DSNs were created but their bounced unit is not yet final (a restart bounces it
    again: a second DSN)."""

    async def go() -> tuple[set[tuple[int, str]], int]:
        spool = FileSpool(spool_copy)
        await spool.open()
        keys: set[tuple[int, str]] = set()
        dsns: set[int] = set()
        bouncing: set[int] = set()
        try:
            for msg in spool.messages():
                found = TID.search(await spool.read_body(msg.id))
                if found is None:
                    continue
                tid = int(found.group(1))
                if msg.envelope.is_dsn:
                    dsns.add(tid)
                for unit in msg.units:
                    if unit.status.terminal:
                        continue
                    keys.add((tid, "dsn") if msg.envelope.is_dsn else (tid, unit.domain))
                    if unit.domain == BOUNCE:
                        keys.add((tid, "dsn"))
                        bouncing.add(tid)
        finally:
            await spool.close()
        return keys, len(dsns & bouncing)

    return asyncio.run(go())


@dataclass(frozen=True)
class Kill:
    at_acked: int
    in_flight: int
    open_txns: int
    life: str  # what the killed daemon had done


def life_of(d: Daemon, since: int) -> str:
    lines = d.log_lines()[since:]
    count = collections.Counter(str(line.get("fields", {}).get("message")) for line in lines)
    return (
        f"{count['Message received']} received, {count['Delivered']} delivered, "
        f"{count['Compacted a spool segment']} compactions, {count['DSN queued']} DSNs"
    )


def kill(d: Daemon, sink: Sink, sent: Sent, work: Path, n: int, since: int) -> Kill:
    d.signal(signal.SIGSTOP)
    try:
        delivered, open_txns = sink.state.snapshot()
        with sent.lock:
            at = len(sent.acked)
        frozen = work / f"frozen{n}"
        shutil.copytree(d.spool_path, frozen, ignore=shutil.ignore_patterns("lock"))
    finally:
        d.kill()  # SIGKILL works on a stopped process
    pending, dsns_in_flight = pending_keys(frozen)
    in_flight = len(pending & delivered) + open_txns + dsns_in_flight
    shutil.rmtree(frozen)
    return Kill(at, in_flight, open_txns, life_of(d, since))


@pytest.mark.timeout(pick(300, 3600))
@pytest.mark.parametrize("commit_delay_us", [0, 300])
def test_sigkill_during_relay_loses_nothing(tmp_path: Path, commit_delay_us: int) -> None:
    """With and without the group commit delay (spool/commit_delay.py: held records
    must not be acknowledged before they are written)."""
    total = pick(1_500, 20_000)
    kills = pick(4, 20)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    sent = Sent()
    stop = threading.Event()
    with Sink() as sink:
        route = {"mx_override": f"127.0.0.1:{sink.port}"}
        overrides: dict[str, Any] = {
            "spool": {
                "segment_bytes": 64 * 1024,
                "compact_interval_secs": 0.5,
                "commit_delay_us": commit_delay_us,
            },
            "delivery": {"domains": dict.fromkeys((*ACCEPT, DEFER, BOUNCE, DSN), route)},
            "health": {"max_queue_size": 10 * total},
        }
        d = Daemon(tmp_path / "mta", overrides=overrides)
        d.start()
        clients = [
            threading.Thread(
                target=client, args=(d.smtp_port, sent, total, rng.random(), stop), daemon=True
            )
            for _ in range(SENDERS)
        ]
        for t in clients:
            t.start()
        done: list[Kill] = []
        since = 0  # the current daemon life's first log line
        try:
            marks = sorted(rng.uniform(0.05, 1.0) * total for _ in range(kills))
            for n, mark in enumerate(marks):
                deadline = time.monotonic() + 120
                while (
                    len(sent.acked) < mark * 0.9
                    and sent.next_id < total
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.3))
                done.append(kill(d, sink, sent, tmp_path, n, since))
                since = len(d.log_lines())
                d.start(timeout=60)
            for t in clients:
                t.join(300)
            assert not any(t.is_alive() for t in clients)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                missing = _undelivered(sent, sink.state.snapshot()[0])
                if not missing:
                    break
                time.sleep(0.2)
        finally:
            stop.set()
            code = d.stop()
        assert 0 == code, d.log_tail()
    segments = max(int(p.name.split("-")[0]) for p in (d.spool_path / "log").glob("*.seg"))
    contents = read_spool(d.spool_path)
    again = read_spool(d.spool_path)
    delivered = sink.state.delivered
    dups = sum(c - 1 for c in delivered.values() if c > 1)
    allowed = sum(k.in_flight for k in done)
    multi = sum(1 for doms in sent.acked.values() if len(doms) > 1)
    queued = {
        (int(m.group(1)), u.domain)
        for msg_id, body in contents.bodies.items()
        if (m := TID.search(body)) is not None
        for u in contents.messages[msg_id].units
        if u.status in (UnitStatus.PENDING, UnitStatus.RETRY)
    }
    for k in done:
        print(
            f"  kill at {k.at_acked:>6} acked: {k.in_flight} in flight "
            f"({k.open_txns} open sink transactions); that life: {k.life}"
        )
    figure(
        "crash",
        f"{len(done)} SIGKILLs over {len(sent.acked):,} acknowledged messages ({multi:,} "
        f"multi-domain; {sent.refused} transactions cut by kills, not acknowledged): "
        f"0 lost; duplicates {dups} <= {allowed} deliveries in flight at the kills; "
        f"{contents.report.quarantined} torn regions quarantined at the last start, "
        f"{again.report.quarantined} left; {len(queued)} 4xx units still queued; "
        f"{segments} segments written (64 KiB each)",
    )
    assert [] == _undelivered(sent, set(delivered))
    for tid, domains in sent.acked.items():
        if DEFER in domains:
            assert (tid, DEFER) in queued, f"message {tid}: its 4xx unit left the queue"
    assert (0, 0) == (again.report.quarantined, again.report.missing)
    assert dups <= allowed
    assert len(sent.acked) >= total * 0.9


def _undelivered(sent: Sent, delivered: set[tuple[int, str]]) -> list[tuple[int, str]]:
    """Acknowledged (message, domain) pairs not delivered yet (a bounce: its DSN)."""
    with sent.lock:
        acked = list(sent.acked.items())
    out: list[tuple[int, str]] = []
    for tid, domains in acked:
        for domain in domains:
            key = (tid, "dsn") if domain == BOUNCE else (tid, domain)
            if domain != DEFER and key not in delivered:
                out.append(key)
    return out
