"""Mail for a domain that routes back to Empath itself is failed, not sent in circles
(issue 7, defect 4: "mail for <domain> loops back to myself", 5.4.6, as Postfix)."""

from __future__ import annotations

from pathlib import Path

from tests.daemon import Daemon, ThreadedPeer, submit
from tests.integration.test_daemon_delivery import assert_nothing_more, dsn_report


def test_an_accepted_domain_routed_back_to_our_own_wildcard_listener_fails_as_a_loop(
    tmp_path: Path,
) -> None:
    with ThreadedPeer({"hostname": "origin.test"}) as origin:
        # A wildcard listener: 127.0.0.1 is one of its local addresses, so the override
        # to 127.0.0.1:<our port> reaches ourselves although no listener names 127.0.0.1.
        daemon = Daemon(tmp_path / "empath", smtp_host="0.0.0.0")
        daemon.config["smtp_controller"]["relay"]["accepted_domains"] = ["loop.test"]
        daemon.config["delivery"]["domains"] = {
            "loop.test": {"mx_override": f"127.0.0.1:{daemon.smtp_port}"},
            "origin.test": {"mx_override": origin.address},
        }
        daemon.start()
        try:
            msg_id = submit(
                daemon.smtp_port, "sender@origin.test", ["r@loop.test"], "Subject: l\n\nx\n"
            )
            (failed,) = daemon.wait_log(
                "Delivery failed permanently", message_id=msg_id, domain="loop.test"
            )
            assert "mail for loop.test loops back to myself" == failed["fields"]["error"]
            assert "5.4.6" == failed["fields"]["dsn"]
            (dsn,) = origin.wait_delivered(1)
            report = dsn_report(dsn)
            assert "Status: 5.4.6" in report
            assert "loops back to myself" in report
            # The message was received once: it never came back through the listener.
            assert_nothing_more(lambda: daemon.logs("Message received"), 1, 1.0)
            assert [] == daemon.logs("Delivered", message_id=msg_id)
        finally:
            daemon.stop()
