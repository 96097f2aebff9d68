"""What the operator is told is true (issue 14, defect 20), against a live daemon.

* `system status` has the scheduler heartbeat line the runbook promises, and the DNS
  hit rate it shows is the recent one (labelled), with the since-start figure beside it
  instead of alone;
* `queue stats` / `queue list --status delivered` say what `delivered` counts: units
  already delivered of a message still queued for another domain;
* with `--json`, errors are JSON too.

(`config reload` with restart-only changes: tests/integration/test_reload_truth.py.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.ctl import LIST_LINE, ctl
from tests.daemon import Daemon, ThreadedPeer, submit
from tests.dnsmasq import DnsRecords, dnsmasq
from tests.helpers import free_port, wait_for

MX_ADDRESS = "127.0.0.51"
RECORDS = DnsRecords(mx={"win.test": [(10, "mx.win.test")]}, hosts={"mx.win.test": [MX_ADDRESS]})
WINDOW_S = 3.0


def test_status_shows_the_heartbeat_and_the_recent_dns_hit_rate(tmp_path: Path) -> None:
    """Misses long ago, hits now: the recent rate is 100 % while the since-start rate is
    lower - the old status showed only the since-start figure, and no heartbeat."""
    with (
        dnsmasq(RECORDS, tmp_path / "dnsmasq") as dns,
        ThreadedPeer({"hostname": "mx.win.test"}, host=MX_ADDRESS, port=25) as mx,
    ):
        overrides = {
            "delivery": {"dns": {"nameservers": [dns.nameserver], "timeout_secs": 2.0}},
            "metrics": {"rate_window_secs": WINDOW_S},
        }
        with Daemon(tmp_path / "d", overrides) as d:
            submit(d.smtp_port, "ops@origin.test", ["a@win.test"], "Subject: 1\n\nx\n")
            mx.wait_delivered(1)
            first = json.loads(ctl(d, "--json", "system", "status").stdout)["dns_cache"]
            assert first["misses"] >= 1
            time.sleep(WINDOW_S * 1.5)  # the misses fall out of the window
            for i in range(4):
                submit(d.smtp_port, "ops@origin.test", [f"b{i}@win.test"], "Subject: 2\n\nx\n")
            mx.wait_delivered(5)
            status = json.loads(ctl(d, "--json", "system", "status").stdout)
            dns_now = status["dns_cache"]
            assert dns_now["window_misses"] == 0 and dns_now["window_hits"] >= 4
            assert 1.0 == dns_now["window_hit_rate"]
            assert dns_now["hit_rate"] < 1.0  # since start: the early misses count
            assert dns_now["window_s"] <= WINDOW_S * 1.2
            assert status["scheduler"]["heartbeat_ok"] is True
            assert status["scheduler"]["heartbeat_age_s"] < 10
            plain = ctl(d, "system", "status").stdout
            dns_line = next(x for x in plain.splitlines() if x.startswith("DNS cache:"))
            assert "hit rate 100.0% over the last" in dns_line
            assert "since start" in dns_line
            assert any(
                x.startswith("Scheduler heartbeat: ") and x.endswith("(ok)")
                for x in plain.splitlines()
            )


def test_delivered_means_delivered_units_of_messages_still_queued(tmp_path: Path) -> None:
    dead = free_port()
    with ThreadedPeer({}) as sink:
        overrides = {
            "delivery": {
                "domains": {
                    "up.test": {"mx_override": sink.address},
                    "down.test": {"mx_override": f"127.0.0.1:{dead}"},
                }
            }
        }
        with Daemon(tmp_path / "d", overrides) as d:
            msg = submit(d.smtp_port, "a@origin.test", ["r@up.test", "r@down.test"], "S: x\n\nx\n")
            sink.wait_delivered(1)
            wait_for(lambda: d.logs("Delivery deferred"), 15, what="down.test deferred")
            listed = ctl(d, "queue", "list", "--status", "delivered").stdout.splitlines()
            assert 1 == len(listed)
            m = LIST_LINE.match(listed[0])
            assert m is not None and (msg, "up.test") == (m["id"], m["domain"])
            stats = ctl(d, "queue", "stats").stdout
            assert "delivered: units already delivered of messages still queued" in stats
            assert (
                1 == json.loads(ctl(d, "--json", "queue", "stats").stdout)["by_status"]["delivered"]
            )


def test_json_errors_are_json(tmp_path: Path) -> None:
    with Daemon(tmp_path / "d") as d:
        missing = ctl(d, "--json", "queue", "view", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
        assert 1 == missing.returncode
        error = json.loads(missing.stdout)
        assert error["ok"] is False
        assert "not_found" == error["error"]["kind"]
        assert "01ARZ3NDEKTSV4RRFFQ69G5FAV" in error["error"]["message"]
        usage = ctl(d, "--json", "queue", "retry")
        assert 2 == usage.returncode
        assert "usage" == json.loads(usage.stdout)["error"]["kind"]
        bad_arg = ctl(d, "--json", "queue", "list", "--limit", "zero")
        assert 2 == bad_arg.returncode
        assert "usage" == json.loads(bad_arg.stdout)["error"]["kind"]
        plain = ctl(d, "queue", "view", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
        assert (1, "") == (plain.returncode, plain.stdout)
        assert plain.stderr.startswith("empathctl: ")


def test_retry_does_not_claim_delivery_now_while_a_breaker_holds_the_units(
    tmp_path: Path,
) -> None:
    """`queue retry` / `process-now` said "scheduled for delivery now" for units an open
    breaker keeps back; now: how many will be attempted, how many stay held, and why."""
    dead = free_port()
    overrides = {
        "delivery": {
            "domains": {"down.test": {"mx_override": f"127.0.0.1:{dead}"}},
            "circuit_breaker": {"failure_threshold": 1, "timeout_secs": 600},
        }
    }
    with Daemon(tmp_path / "d", overrides) as d:
        ids = [
            submit(d.smtp_port, "a@o.test", [f"r{i}@down.test"], "S: x\n\nx\n") for i in range(3)
        ]
        wait_for(lambda: d.logs("Circuit breaker OPENED for down.test"), 15, what="breaker open")
        for cmd in (("queue", "retry", ids[0]), ("queue", "process-now")):
            out = ctl(d, *cmd)
            assert 0 == out.returncode, out.stderr
            assert "scheduled for delivery now" not in out.stdout
            assert "0 will be attempted now" in out.stdout
            assert "circuit breaker open" in out.stdout
        data = json.loads(ctl(d, "--json", "queue", "process-now").stdout)
        assert 0 == data["attempted_now"]
        assert data["waiting"]["breaker"] >= 1
