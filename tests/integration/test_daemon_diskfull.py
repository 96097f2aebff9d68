"""Disk full: the real daemon with its spool on a small tmpfs.

The spool directory is a fresh 8 MiB tmpfs mount (we run as root; it is always
unmounted afterwards).  Once the daemon is up, a filler file takes all but a
little of the space and clients send until they are refused: the refusal is
``452 4.3.1`` (never a 250 that is not durable, never a crash), the readiness
check turns 503 on the spool's free space, and the daemon keeps answering.
After the filler is deleted, mail is accepted again.  The stopped daemon's spool
then reopens with nothing quarantined and every 250-acknowledged message intact,
and no half-written body file is left behind.
"""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon, assert_stored, parked_overrides, queued_id, read_spool
from tests.helpers import fill, tmpfs_mount, wait_for

TMPFS_SIZE = "8m"
LEFT_FREE_BYTES = 64 * 1024  # what the filler leaves: below the 1% readiness floor
SPILL_BYTES = 256 * 1024  # FileSpool's default: larger bodies go to their own file


@pytest.fixture
def tmpfs_spool(tmp_path: Path) -> Iterator[Path]:
    """A size-limited tmpfs mounted where the daemon's spool will be."""
    with tmpfs_mount(tmp_path / "empath" / "spool", TMPFS_SIZE) as point:
        yield point


def body_of(n: int, size: int) -> bytes:
    line = b"%06d disk full test line .\r\n" % n
    return b"Subject: disk full %d\r\n\r\n.dot first\r\n" % n + line * (size // len(line))


def send(conn: smtplib.SMTP, body: bytes) -> tuple[int, str]:
    """One transaction; (code, text) of the final reply (MAIL/RCPT refusals included)."""
    conn.ehlo_or_helo_if_needed()
    for code, text in (conn.mail("s@parked.test"), conn.rcpt("r@parked.test")):
        if code != 250:
            conn.rset()
            return code, text.decode()
    code, text = conn.data(body)
    return code, text.decode()


def test_full_spool_filesystem_gives_452_and_acceptance_resumes_when_space_returns(
    tmpfs_spool: Path,
) -> None:
    """Clients filling the last free space get 452 4.3.1 (small and spilled bodies alike),
    readiness reports the spool check failing with 503, the daemon keeps serving; once the
    filler is removed, messages get 250 again; afterwards the spool reopens clean with
    every acknowledged message byte-exact and no leftover body files."""
    d = Daemon(tmpfs_spool.parent, overrides=parked_overrides("parked.test"))
    assert tmpfs_spool == d.spool_path
    acked: dict[str, bytes] = {}
    refusals: list[tuple[int, str]] = []
    d.start()
    try:
        status, ready = d.http_json("/health/ready")
        assert (200, True) == (status, ready["checks"]["spool_free_ratio"]["ok"])

        filler = tmpfs_spool / "filler"
        fill(filler, LEFT_FREE_BYTES)
        status, ready = d.http_json("/health/ready")
        assert 503 == status
        assert "not_ready" == ready["status"]
        assert not ready["checks"]["spool_free_ratio"]["ok"]
        assert ready["checks"]["spool_free_ratio"]["value"] < 0.01

        with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=20) as conn:
            # 8 KiB messages until the space runs out (a few fit, then 452).
            for n in range(60):
                body = body_of(n, 8192)
                code, text = send(conn, body)
                if code == 250:
                    acked[queued_id(text)] = body
                else:
                    refusals.append((code, text))
                    break
            assert refusals, "the full spool never refused a message"
            fill(filler)  # now take the rest too: nothing of 8 KiB or more fits any more
            # A body large enough to be spilled to its own file is refused too.
            big = body_of(1000, 2 * SPILL_BYTES)
            refusals.append(send(conn, big))
            # The session is still usable after a refusal.
            assert 250 == conn.noop()[0]
        assert all(code == 452 for code, _ in refusals), refusals
        assert all(text.startswith("4.3.1 ") for _, text in refusals), refusals
        assert len(acked) < 60

        # The daemon stays up and keeps answering new sessions while the disk is full.
        assert d.proc is not None and d.proc.poll() is None
        assert 200 == d.http_status("/health/live")
        with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=20) as conn:
            code, text = send(conn, body_of(2000, 8192))
            assert (452, "4.3.1") == (code, text[:5])

        filler.unlink()
        wait_for(lambda: d.http_status("/health/ready") == 200, 10, what="readiness to recover")
        with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=20) as conn:
            for n, size in ((3000, 8192), (3001, 2 * SPILL_BYTES), (3002, 100)):
                body = body_of(n, size)
                code, text = send(conn, body)
                assert 250 == code, text
                acked[queued_id(text)] = body
    finally:
        exit_code = d.stop()
    assert 0 == exit_code, d.log_tail()
    refused_logged = [
        line["fields"]
        for line in d.log_lines()
        if line.get("fields", {}).get("message") == "Spool full, message refused"
    ]
    assert len(refusals) + 1 == len(refused_logged)
    assert {"452"} == {f["smtp_code"] for f in refused_logged}

    contents = read_spool(d.spool_path)
    assert (0, 0) == (contents.report.quarantined, contents.report.missing)
    assert [] == list((d.spool_path / "corrupt").iterdir())
    assert set(acked) == set(contents.messages)
    for msg_id, body in acked.items():
        msg = assert_stored(contents, msg_id, body)
        assert ("s@parked.test", ("r@parked.test",)) == (
            msg.envelope.sender,
            msg.envelope.recipients,
        )
    spilled = {i for i, body in contents.bodies.items() if len(body) > SPILL_BYTES}
    assert spilled == {p.name for p in (d.spool_path / "bodies").iterdir()}


def test_start_on_a_full_spool_filesystem(tmpfs_spool: Path) -> None:
    """Issue 7 defect 7: a torn tail that cannot be copied to corrupt/ on a full disk does
    not stop the daemon (it starts, serves, and logs the region left in place); when
    start-up cannot go on (a fresh spool needs its first segment) it exits 1 with a
    "Startup failed" line that names the cause - never an unrelated BufferError."""
    d = Daemon(tmpfs_spool.parent, overrides=parked_overrides("parked.test"))
    d.start()
    try:
        with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=20) as conn:
            code, text = send(conn, body_of(1, 1000))
        assert 250 == code, text
    finally:
        assert 0 == d.stop(), d.log_tail()
    (seg,) = (tmpfs_spool / "log").iterdir()
    with seg.open("ab") as f:  # a batch cut off mid-record
        f.write(b"EMPR" + b"\x01" * 5000)
    fill(tmpfs_spool / "filler")
    try:
        d.start(wait_path="/health/live")  # not ready: the spool has no free space
        (line,) = d.logs("Could not quarantine a corrupt spool region")
        assert "no space left on the spool filesystem" in line["fields"]["error"]
        assert d.logs("Spool recovered", left_in_place=1, messages=1)
    finally:
        assert 0 == d.stop(), d.log_tail()
    for sub in ("log", "bodies", "corrupt", "lock"):
        subprocess.run(["rm", "-rf", str(tmpfs_spool / sub)], check=True)
    fill(tmpfs_spool / "filler")  # take what the removal gave back
    try:
        with pytest.raises(RuntimeError, match="exited with 1"):
            d.start()
    finally:
        d.stop()
    (line,) = d.logs("Startup failed")
    assert "spool filesystem is full" in line["fields"]["error"], line
    assert not d.logs("BufferError")
