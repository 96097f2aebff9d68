"""Issue 14, defect 18: a DNS outage with `dns clear-cache` (the runbook's first step)
no longer stops mail that the cache had kept flowing - RFC 8767 serve-stale, against
a real dnsmasq that is stopped in the middle of the test."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from tests.ctl import sh
from tests.daemon import Daemon, ThreadedPeer, submit
from tests.dnsmasq import DnsRecords, dnsmasq

SENDER = "sender@origin.test"
BODY = "From: sender@origin.test\nSubject: stale\n\nhello\n"
RECORDS = DnsRecords(
    mx={"stale.test": [(10, "mx.stale.test")]}, hosts={"mx.stale.test": ["127.0.0.9"]}, ttl_s=1
)


def metric(d: Daemon, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", d.http_get("/metrics"), re.MULTILINE)
    assert found, name
    return float(found.group(1))


def test_mail_keeps_flowing_on_the_last_good_answer_when_dns_dies_and_the_cache_is_cleared(
    tmp_path: Path,
) -> None:
    """Delivered through dnsmasq; dnsmasq stopped; `empathctl dns clear-cache`; the next
    message is still delivered to the same MX on the stale answer, counted in
    `empath_dns_stale_answers_total`; with serve-stale off the same steps defer."""
    with (
        ThreadedPeer({"hostname": "origin.test"}) as origin,
        ThreadedPeer({"hostname": "mx.stale.test"}, host="127.0.0.9", port=25) as mx,
    ):
        for window, delivered in ((86400, True), (0, False)):
            with contextlib.ExitStack() as dns_up:
                dns = dns_up.enter_context(dnsmasq(RECORDS, tmp_path / f"dns{window}"))
                overrides = {
                    "delivery": {
                        "dns": {
                            "nameservers": [dns.nameserver],
                            "timeout_secs": 1.0,
                            "min_cache_ttl_secs": 1,
                            "serve_stale_secs": window,
                        },
                        "domains": {"origin.test": {"mx_override": origin.address}},
                    }
                }
                d = Daemon(tmp_path / f"empath{window}", overrides)
                d.start()
                try:
                    before = len(mx.transactions())
                    submit(d.smtp_port, SENDER, ["a@stale.test"], BODY)
                    mx.wait_delivered(before + 1)
                    dns_up.close()  # dnsmasq stopped: every query now fails
                    cleared = sh(d, "empathctl dns clear-cache")
                    assert 0 == cleared.returncode, cleared.stderr
                    second = submit(d.smtp_port, SENDER, ["b@stale.test"], BODY)
                    if delivered:
                        mx.wait_delivered(before + 2)
                        d.wait_log("Delivered", message_id=second, mx="mx.stale.test")
                        assert metric(d, "empath_dns_stale_answers_total") >= 1
                        listing = sh(d, "empathctl dns list-cache").stdout
                        assert "stale.test MX" in listing and " stale " in listing, listing
                    else:
                        (deferred,) = d.wait_log("Delivery deferred", message_id=second)
                        assert "MX lookup" in deferred["fields"]["error"], deferred
                        assert 0 == metric(d, "empath_dns_stale_answers_total")
                finally:
                    assert 0 == d.stop(), d.log_tail()
