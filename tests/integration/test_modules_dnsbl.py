"""``empath.modules.dnsbl`` against a blocklist zone served by dnsmasq (RFC 5782)."""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

from tests.daemon import Daemon, deep_merge, parked_overrides, read_spool
from tests.dnsmasq import DnsRecords, dnsmasq
from tests.integration.test_modules_python import metric

REASON = "Listed for spam; see https://bl.test/lookup?127.0.0.1"
RECORDS = DnsRecords(
    zones=("bl.test", "clean.test"),
    hosts={"1.0.0.127.bl.test": ["127.0.0.2"], "2.0.0.127.bl.test": ["127.0.0.2"]},
    txt={"1.0.0.127.bl.test": [REASON]},
)


def config(nameserver: str, zones: list[str]) -> dict[str, Any]:
    parked = parked_overrides("y.test")
    parked["delivery"]["dns"] = {"nameservers": [nameserver]}
    return {
        **parked,
        "smtp_controller": {
            # the test client (127.0.0.1) is not trusted: dnsbl checks it
            "relay": {"trusted_networks": ["10.0.0.0/8"], "accepted_domains": ["y.test"]},
        },
        "modules": [
            {"type": "Python", "name": "empath.modules.dnsbl:Dnsbl", "arguments": {"zones": zones}}
        ],
    }


def test_a_listed_client_is_refused_at_rcpt_with_the_lists_reason(tmp_path: Path) -> None:
    """127.0.0.1 is not on clean.test (NXDOMAIN) but on bl.test: every RCPT gets 554
    5.7.1 naming the zone and its TXT reason, nothing is spooled."""
    with dnsmasq(RECORDS, tmp_path) as dns_server:
        daemon = Daemon(tmp_path / "d")
        daemon.config = deep_merge(
            daemon.config, config(dns_server.nameserver, ["clean.test", "bl.test"])
        )
        with daemon:
            with smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
                client.ehlo()
                client.mail("a@origin.test")
                expected = (554, ("5.7.1 Service unavailable; client [127.0.0.1] blocked "
                                  f"using bl.test; {REASON}").encode())  # fmt: skip
                assert expected == client.rcpt("r1@y.test")
                assert expected == client.rcpt("r2@y.test")
                assert (554, b"5.5.1 No valid recipients") == client.docmd("DATA")
            assert 2 == metric(daemon, "empath_module_calls_total",
                               module="empath.modules.dnsbl:Dnsbl", hook="on_rcpt_to",
                               result="reject")  # fmt: skip
        assert {} == read_spool(daemon.spool_path).messages
        log = dns_server.log()
        assert "1.0.0.127.clean.test" in log and "1.0.0.127.bl.test" in log


def test_a_client_on_no_list_is_accepted(tmp_path: Path) -> None:
    with dnsmasq(RECORDS, tmp_path) as dns_server:
        daemon = Daemon(tmp_path / "d")
        daemon.config = deep_merge(daemon.config, config(dns_server.nameserver, ["clean.test"]))
        with daemon, smtplib.SMTP(daemon.smtp_host, daemon.smtp_port) as client:
            client.ehlo()
            client.mail("a@origin.test")
            assert 250 == client.rcpt("r1@y.test")[0]
            assert 250 == client.data(b"Subject: t\r\n\r\nb\r\n")[0]
