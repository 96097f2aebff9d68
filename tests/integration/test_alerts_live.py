"""The shipped alert rules fire for real: Prometheus scrapes a live Empath every second.

A test copy of deploy/prometheus/prometheus-alerts.yml has its `for:` durations and
range windows shortened (nothing else changes).  Before any mail, none of the delivery
alerts fires; then a domain whose MX answers 5xx drives DeliverySuccessRateLow, six
domains whose MX is dead trip their breakers (CircuitBreakerOpen for each, and
CircuitBreakerStormDetected), and the listener, silent afterwards but with far less
than a connection a minute over the day, does not drive SMTPListenerDown (issue 14 #19)
— all read back through Prometheus's HTTP API.  A real Alertmanager
with the shipped inhibitions shows every CircuitBreakerOpen muted by the storm.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon import Daemon, Submitter, ThreadedPeer
from tests.helpers import free_port, require_tool, stop_pid, wait_for, wait_port

ROOT = Path(__file__).resolve().parents[2]
DEAD_DOMAINS = [f"d{i}.test" for i in range(6)]
BODY = "From: s@origin.test\nSubject: alerts\n\nhello\n"
WINDOWS = {"1m": "5s", "5m": "30s", "10m": "30s", "30m": "60s"}


def shortened_rules() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        (ROOT / "deploy" / "prometheus" / "prometheus-alerts.yml").read_text()
    )
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["for"] = "2s"
            rule["expr"] = re.sub(
                r"\[(\d+m)\]", lambda m: f"[{WINDOWS[m.group(1)]}]", str(rule["expr"])
            )
    return doc


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status) == 200
    except OSError:
        return False


class Stack:
    def __init__(self, prom: str, am: str) -> None:
        self.prom = prom
        self.am = am

    def alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        data = get_json(f"{self.prom}/api/v1/alerts")["data"]["alerts"]
        return [a for a in data if a["state"] == state]

    def firing(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts() if a["labels"]["alertname"] == name]

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prom}/api/v1/query?query={urllib.parse.quote(expr)}"
        result: list[dict[str, Any]] = get_json(url)["data"]["result"]
        return result

    def am_alerts(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = get_json(f"{self.am}/api/v2/alerts")
        return result


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Daemon, Stack]]:
    prometheus = require_tool("prometheus")
    alertmanager = require_tool("prometheus-alertmanager")
    with ThreadedPeer({"rcpt_default": "550 5.1.1 no such user"}) as hard:
        dead = f"127.0.0.1:{free_port()}"
        daemon = Daemon(
            tmp_path / "empath",
            overrides={
                "delivery": {
                    "domains": {
                        "hard.test": {"mx_override": hard.address},
                        **{d: {"mx_override": dead} for d in DEAD_DOMAINS},
                    },
                    "base_retry_delay_secs": 1.5,
                    "circuit_breaker": {"failure_threshold": 2, "timeout_secs": 300.0},
                },
                "dsn": {"enabled": False},
                "metrics": {"rate_window_secs": 30.0},
            },
        )
        daemon.start()
        am_port, prom_port = free_port(), free_port()
        am_cfg = yaml.safe_load((ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
        for receiver in am_cfg["receivers"]:
            receiver["webhook_configs"][0]["url"] = f"http://127.0.0.1:{free_port()}/"
        (tmp_path / "am.yml").write_text(yaml.safe_dump(am_cfg))
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(shortened_rules()))
        prom_cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yml")],
            "alerting": {
                "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
            },
            "scrape_configs": [
                {
                    "job_name": "empath",
                    "static_configs": [{"targets": [f"127.0.0.1:{daemon.http_port}"]}],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))
        am = start(
            [alertmanager, f"--config.file={tmp_path / 'am.yml'}",
             f"--storage.path={tmp_path / 'am-data'}",
             f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
            tmp_path / "am.log",
        )  # fmt: skip
        prom = start(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'prom-data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            tmp_path / "prometheus.log",
        )  # fmt: skip
        try:
            wait_port("127.0.0.1", am_port, timeout=20)
            wait_port("127.0.0.1", prom_port, timeout=20)
            wait_for(lambda: http_ok(f"http://127.0.0.1:{prom_port}/-/ready"), timeout=30)
            wait_for(lambda: http_ok(f"http://127.0.0.1:{am_port}/-/ready"), timeout=30)
            yield daemon, Stack(f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}")
        finally:
            stop_pid(prom)
            stop_pid(am)
            daemon.stop()


def test_alerts_fire_in_a_real_prometheus_and_alertmanager_inhibits(
    stack: tuple[Daemon, Stack],
) -> None:
    daemon, s = stack
    # Scraped, and quiet: no mail yet, so no delivery alert.
    wait_for(lambda: s.query('up{job="empath"} == 1'), timeout=20, what="first scrape")
    wait_for(lambda: len(s.query("empath_delivery_success_rate")) > 0, timeout=10)
    time.sleep(3)  # a few evaluations with for: 2s
    quiet = {a["labels"]["alertname"] for a in s.alerts("firing") + s.alerts("pending")}
    assert set() == quiet & {
        "DeliverySuccessRateLow",
        "CircuitBreakerOpen",
        "CircuitBreakerStormDetected",
        "EmpathDown",
    }

    with Submitter(daemon.smtp_port) as smtp:
        # Enough traffic for the ratio alerts' minimum (20 attempts in the window) and
        # for CircuitBreakerOpen's (10 units waiting): 20 bounces, two per dead domain.
        for i in range(20):
            smtp.send("s@origin.test", [f"u{i}@hard.test"], BODY)
        for d in DEAD_DOMAINS:
            smtp.send("s@origin.test", [f"u@{d}", f"v@{d}"], BODY)
            smtp.send("s@origin.test", [f"w@{d}"], BODY)

    wait_for(lambda: s.firing("DeliverySuccessRateLow"), timeout=30, what="DeliverySuccessRateLow")

    def all_open() -> list[dict[str, Any]]:
        found = s.firing("CircuitBreakerOpen")
        return found if len(found) == len(DEAD_DOMAINS) else []

    opened = wait_for(all_open, timeout=40, what="CircuitBreakerOpen for every dead domain")
    assert set(DEAD_DOMAINS) == {a["labels"]["domain"] for a in opened}
    (storm,) = wait_for(lambda: s.firing("CircuitBreakerStormDetected"), timeout=30, what="storm")
    assert "critical" == storm["labels"]["severity"]

    def inhibited() -> list[dict[str, Any]]:
        alerts = s.am_alerts()
        names = {a["labels"]["alertname"]: a for a in alerts}
        if "CircuitBreakerStormDetected" not in names:
            return []
        opens = [a for a in alerts if a["labels"]["alertname"] == "CircuitBreakerOpen"]
        if len(opens) < len(DEAD_DOMAINS):
            return []
        if not all(a["status"]["state"] == "suppressed" for a in opens):
            return []
        return opens

    opens = wait_for(inhibited, timeout=30, what="CircuitBreakerOpen inhibited in Alertmanager")
    storm_fp = next(
        a for a in s.am_alerts() if a["labels"]["alertname"] == "CircuitBreakerStormDetected"
    )["fingerprint"]
    assert all([storm_fp] == a["status"]["inhibitedBy"] for a in opens)
    am_storm = [
        a for a in s.am_alerts() if a["labels"]["alertname"] == "CircuitBreakerStormDetected"
    ]
    assert "active" == am_storm[0]["status"]["state"]

    # No connection since the submission session closed, but this listener never had a
    # connection a minute over the day: silence is normal for it, nothing pages.
    wait_for(lambda: s.query("rate(empath_smtp_connections_total[5s]) == 0"), timeout=20)
    time.sleep(3)  # past the rule's shortened for: 2s
    states = {a["labels"]["alertname"] for a in s.alerts("firing") + s.alerts("pending")}
    assert "SMTPListenerDown" not in states
