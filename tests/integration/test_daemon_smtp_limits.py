"""The daemon's inbound limits from its config file: smtp_controller.hop_limit and the
postmaster address (issue 7, defects 4 and 8), end to end through a live daemon."""

from __future__ import annotations

from pathlib import Path

from tests.daemon import Daemon, RawSmtp, parked_overrides, queued_id, read_spool


def hops(n: int) -> bytes:
    return b"".join(b"Received: from h%d.example by relay.example; Mon, 1 Jan 2024\r\n" % i
                    for i in range(n))  # fmt: skip


def test_hop_limit_and_postmaster_from_the_config(tmp_path: Path) -> None:
    """With hop_limit: 3, a message with 4 Received: fields is refused 554 5.4.6 and one
    with 3 is queued; an untrusted client's RCPT TO:<Postmaster> is accepted although
    relaying is denied to it, and queued for dsn.postmaster."""
    overrides = parked_overrides("ops.example", "victim.test")
    overrides["smtp_controller"] = {
        "hop_limit": 3,
        "relay": {"trusted_networks": ["10.9.9.0/24"], "accepted_domains": ["victim.test"]},
    }
    overrides["dsn"] = {"postmaster": "hostmaster@ops.example"}
    daemon = Daemon(tmp_path, overrides=overrides)
    daemon.start()
    try:
        with RawSmtp("127.0.0.1", daemon.smtp_port) as c:
            assert 220 == c.reply()[0]
            c.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<r@victim.test>\r\nDATA\r\n")
            assert [250, 250, 250, 354] == c.codes(4)
            c.send(hops(4) + b"Subject: loop\r\n\r\nx\r\n.\r\n")
            assert (554, "5.4.6 Too many hops") == c.reply()
            c.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<r@victim.test>\r\nDATA\r\n")
            assert [250, 250, 354] == c.codes(3)
            c.send(hops(3) + b"Subject: ok\r\n\r\nx\r\n.\r\n")
            code, text = c.reply()
            assert 250 == code
            kept = queued_id(text)
            c.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<r@elsewhere.example>\r\n"
                   b"RCPT TO:<Postmaster>\r\nDATA\r\n")  # fmt: skip
            assert [250, 554, 250, 354] == c.codes(4)
            c.send(b"Subject: hello postmaster\r\n\r\nx\r\n.\r\n")
            code, text = c.reply()
            assert 250 == code
            to_postmaster = queued_id(text)
    finally:
        daemon.stop()
    contents = read_spool(daemon.spool_path)
    assert {kept, to_postmaster} == set(contents.messages)
    assert ("hostmaster@ops.example",) == contents.messages[to_postmaster].envelope.recipients
