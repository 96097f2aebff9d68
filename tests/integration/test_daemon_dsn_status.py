"""What the daemon reports about a delivery (issue 7, defect 9): DSN Action/Status pairs per
RFC 3464, Remote-MTA of an address-only route, and TLS / MX address in the log lines.

One daemon, one message to three domains served by real peers over loopback:
``grey.test`` always answers ``450 4.2.0`` (a delay warning, then the give-up DSN),
``bad.test`` refuses with ``550 5.1.1``, ``tls.test`` offers STARTTLS and accepts.
"""

from __future__ import annotations

import email
import ssl
from email.message import Message
from pathlib import Path

import trustme

from empath.testing.scripted_peer import RecordedTransaction
from tests.daemon import Daemon, ThreadedPeer, submit
from tests.helpers import wait_for

SENDER = "sender@origin.test"
BODY = "From: sender@origin.test\nSubject: dsn status\n\nhello\n"


def status_groups(txn: RecordedTransaction) -> list[dict[str, str]]:
    """The per-recipient groups of a DSN's message/delivery-status part."""
    msg = email.message_from_bytes(txn.body)
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            payload = part.get_payload()
            assert isinstance(payload, list)
            blocks = [b for b in payload if isinstance(b, Message)]
            return [{k.lower(): str(v) for k, v in b.items()} for b in blocks[1:]]
    raise AssertionError("no message/delivery-status part")


def test_dsn_status_classes_remote_mta_literal_and_tls_log_fields(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("tls.test").configure_cert(server_ctx)
    with (
        ThreadedPeer({"hostname": "origin.test"}) as origin,
        ThreadedPeer(
            {"rcpt": {"g@grey.test": "450 4.2.0 greylisted", "b@bad.test": "550 5.1.1 no user"}}
        ) as plain,
        ThreadedPeer({"hostname": "tls.test"}, ssl_context=server_ctx) as secure,
    ):
        routes = {
            "origin.test": origin.address,
            "grey.test": plain.address,
            "bad.test": plain.address,
            "tls.test": secure.address,
        }
        daemon = Daemon(
            tmp_path / "empath",
            overrides={
                "delivery": {
                    "domains": {d: {"mx_override": a} for d, a in routes.items()},
                    "base_retry_delay_secs": 0.3,
                    "max_attempts": 4,
                },
                "dsn": {"delay_warning_secs": 0.5},
            },
        )
        daemon.start()
        try:
            msg_id = submit(
                daemon.smtp_port, SENDER, ["g@grey.test", "b@bad.test", "t@tls.test"], BODY
            )
            daemon.wait_log("Delivery gave up", timeout=20, message_id=msg_id)
            dsns = origin.wait_delivered(3, timeout=15)
            wait_for(lambda: len(daemon.logs("DSN queued")) == 3, what="three DSNs")

            reports = {}
            for txn in dsns:
                (group,) = status_groups(txn)
                reports[(group["final-recipient"], group["action"])] = group
            # RFC 3464 §2.3.3/§2.3.4 with RFC 3463 classes: failed is 5.x.x, delayed 4.x.x
            delayed = reports[("rfc822; g@grey.test", "delayed")]
            assert "4.2.0" == delayed["status"]
            assert "will-retry-until" in delayed
            exhausted = reports[("rfc822; g@grey.test", "failed")]
            assert "5.2.0" == exhausted["status"]
            refused = reports[("rfc822; b@bad.test", "failed")]
            assert "5.1.1" == refused["status"]
            # The route is an address: Remote-MTA is an address literal, not a host name.
            for group in (delayed, exhausted, refused):
                assert "dns; [127.0.0.1]" == group["remote-mta"]
            kinds = sorted(q["fields"]["kind"] for q in daemon.logs("DSN queued"))
            assert ["delayed", "exhausted", "failed"] == kinds

            (delivered,) = daemon.logs("Delivered", message_id=msg_id)
            fields = delivered["fields"]
            assert "tls.test" == fields["domain"]
            assert fields["tls"].startswith("TLSv1.")
            assert fields["tls_cipher"]
            assert "127.0.0.1" == fields["mx_address"]
            assert 1 == len(secure.delivered()) and secure.delivered()[0].tls

            deferred = daemon.logs("Delivery deferred", message_id=msg_id)
            assert [1, 2, 3] == [d["fields"]["attempt"] for d in deferred]
            for d in deferred:
                assert "none" == d["fields"]["tls"]
                assert "" == d["fields"]["tls_cipher"]
                assert "127.0.0.1" == d["fields"]["mx_address"]
        finally:
            daemon.stop()
