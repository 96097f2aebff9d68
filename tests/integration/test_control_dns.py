"""`empathctl dns ...` against a daemon resolving through a real dnsmasq: the cache lines,
refresh (answer or error) and clear, checked against the records served."""

from __future__ import annotations

import json
from pathlib import Path

from tests.ctl import ctl, ctl_env, sh
from tests.daemon import Daemon, ThreadedPeer, submit
from tests.dnsmasq import DnsRecords, dnsmasq

MX_ADDRESS = "127.0.0.50"  # this suite's stand-in MX address (port 25)
RECORDS = DnsRecords(mx={"dns.test": [(10, "mx.dns.test")]}, hosts={"mx.dns.test": [MX_ADDRESS]})


def test_dns_cache_lines_refresh_and_clear(tmp_path: Path) -> None:
    with (
        dnsmasq(RECORDS, tmp_path / "dnsmasq") as dns,
        ThreadedPeer({"hostname": "mx.dns.test"}, host=MX_ADDRESS, port=25) as mx,
    ):
        overrides = {"delivery": {"dns": {"nameservers": [dns.nameserver], "timeout_secs": 2.0}}}
        with Daemon(tmp_path / "d", overrides) as d:
            submit(d.smtp_port, "ops@origin.test", ["a@dns.test"], "Subject: dns\n\nx\n")
            mx.wait_delivered(1)

            listing = sh(d, "empathctl dns list-cache")
            assert 0 == listing.returncode, listing.stderr
            lines = listing.stdout.splitlines()
            assert any(
                line.startswith("dns.test MX ttl=") and f"10 mx.dns.test [{MX_ADDRESS}]" in line
                for line in lines
            ), lines
            entries = json.loads(ctl(d, "dns", "list-cache", "--json").stdout)["entries"]
            count = sh(d, "empathctl dns list-cache | wc -l").stdout.strip()
            assert str(len(entries)) == count == str(len(lines))

            refresh = sh(d, "empathctl dns refresh $DOMAIN", env=ctl_env(d, DOMAIN="dns.test"))
            assert 0 == refresh.returncode, refresh.stderr
            assert f"10 mx.dns.test [{MX_ADDRESS}]" in refresh.stdout

            missing = ctl(d, "dns", "refresh", "missing.test")
            assert 1 == missing.returncode
            assert "missing.test" in missing.stderr

            cleared = sh(d, "empathctl dns clear-cache")
            assert 0 == cleared.returncode
            assert cleared.stdout.startswith("cleared ")
            assert "0" == sh(d, "empathctl dns list-cache | wc -l").stdout.strip()

            status = json.loads(ctl(d, "system", "status", "--json").stdout)
            assert 0 == status["dns_cache"]["entries"]
            assert status["dns_cache"]["misses"] >= 1
