"""Recipients past ``max_recipients`` (issue 14, defect 2), against real clients.

``452 4.5.3`` tells a client to send the remaining recipients in a new transaction
(RFC 5321 §4.5.3.1.10).  Counted as bad commands, they closed the session with 421
after ``max_recipients + 9`` recipients and the whole transaction was lost - for ever,
since the client retried the same message.  Here a real Postfix relays a 25-recipient
message into Empath with a limit of 10, and every recipient arrives.
"""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

from tests.daemon import Daemon, parked_overrides, read_spool
from tests.helpers import require_tool, wait_for
from tests.postfix import PostfixPeer

DOMAIN = "many.test"
RECIPIENTS = 25
LIMIT = 10


def _daemon(tmp_path: Path) -> Daemon:
    return Daemon(tmp_path / "empath", parked_overrides(DOMAIN), listener={"max_recipients": LIMIT})


def test_real_postfix_delivers_25_recipients_to_a_limit_of_10(tmp_path: Path) -> None:
    """Postfix's smtp client gets 452 4.5.3 for recipients 11-25, defers them and sends
    them in follow-up transactions: Empath ends with all 25, in messages of at most 10."""
    daemon = _daemon(tmp_path)
    daemon.start()
    try:
        with PostfixPeer(relay_port=daemon.smtp_port, domain=DOMAIN) as pf:
            smtp_source = require_tool("smtp-source")
            out = subprocess.run(
                [smtp_source, "-m", "1", "-r", str(RECIPIENTS), "-f", "s@client.test",
                 "-t", f"rcpt@{DOMAIN}", f"127.0.0.1:{pf.port}"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert 0 == out.returncode, out.stdout + out.stderr
            wait_for(lambda: pf.queued() == 0 and pf.log(), timeout=120, what="postfix queue empty")
            log = pf.log()
            assert "4.5.3" in log  # the limit was met, and Postfix was told so
            assert "status=sent" in log
    finally:
        daemon.stop()
    messages = read_spool(daemon.spool_path).messages.values()
    got = [r for m in messages for r in m.envelope.recipients]
    assert RECIPIENTS == len(got) == len(set(got))
    assert max(len(m.envelope.recipients) for m in messages) == LIMIT
    assert len(messages) >= 3
    assert not daemon.logs("Too many errors")


def test_smtplib_with_110_recipients_on_the_default_limit(tmp_path: Path) -> None:
    """The issue's smtplib case: 110 recipients against the default max_recipients (100)
    got a 421 and nothing accepted.  Now 100 are accepted, smtplib reports the other 10
    as refused with 452, and a second transaction on the same connection takes them."""
    daemon = Daemon(tmp_path / "empath", parked_overrides(DOMAIN))
    rcpts = [f"u{i}@{DOMAIN}" for i in range(110)]
    daemon.start()
    try:
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as client:
            refused = client.sendmail("s@client.test", rcpts, b"Subject: many\r\n\r\nx\r\n")
            assert sorted(rcpts[100:]) == sorted(refused)
            assert {452} == {code for code, _ in refused.values()}
            assert {} == client.sendmail(
                "s@client.test", list(refused), b"Subject: rest\r\n\r\nx\r\n"
            )
    finally:
        daemon.stop()
    messages = read_spool(daemon.spool_path).messages.values()
    assert sorted(rcpts) == sorted(r for m in messages for r in m.envelope.recipients)
