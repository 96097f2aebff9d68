"""The shipped operations files, checked with the real Prometheus and Alertmanager tools.

`promtool check rules` / `promtool test rules` (a firing and a quiet case per alert),
`promtool check config`, `amtool check-config` and `amtool config routes test`, the
dashboards' uids, and the alerts' runbook links (each names a section of docs/RUNBOOKS.md).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import require_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "prometheus-alerts.yml"
AM = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD_UIDS = {
    "empath-overview",
    "empath-delivery",
    "empath-smtp",
    "empath-queue",
    "empath-dns",
    "empath-logs",
}
RUNBOOK_ALERTS = {
    "critical": {
        "DeliverySuccessRateLow",
        "QueueBacklogCritical",
        "SMTPListenerDown",
        "CircuitBreakerStormDetected",
        "SpoolDiskSpaceLow",
        "EmpathDown",
        "DkimSigningFailures",
    },
    "warning": {
        "DeliveryLatencyHigh",
        "OldestMessageAgeHigh",
        "DnsCacheHitRateLow",
        "RateLimitingExcessive",
        "DeliveryErrorRateElevated",
        "QueueSizeGrowing",
        "CircuitBreakerOpen",
        "ClusterFallbackMode",  # issue 11: a node without Redis for 5 minutes
        "DkimKeyNotPublished",  # issue 17: a signing selector whose DNS record does not match
        "ModuleErrorsElevated",  # issue 19: a module or milter timing out or failing
        "SmtpAuthBruteForce",  # issue 18: over 100 refused SMTP AUTH attempts in 10 minutes
        "ConfigRestartPending",  # issue 14 #1: reloaded changes waiting for a restart for 1 h
    },
}


def run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert 0 == proc.returncode, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def alert_rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_accepts_the_rules_and_the_scrape_config() -> None:
    promtool = require_tool("promtool")
    # +2 DKIM, +1 modules, +1 AUTH, +1 config restart pending
    assert "SUCCESS: 20 rules found" in run(promtool, "check", "rules", str(RULES))
    run(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))


def test_every_alert_fires_after_its_for_and_stays_quiet_otherwise() -> None:
    """deploy/prometheus/prometheus-alerts.test.yml: per alert a `fire` and a `quiet` instance."""
    promtool = require_tool("promtool")
    tests = DEPLOY / "prometheus" / "prometheus-alerts.test.yml"
    out = run(promtool, "test", "rules", str(tests))
    assert "SUCCESS" in out
    covered = {
        case["alertname"]
        for group in yaml.safe_load(tests.read_text())["tests"]
        for case in group["alert_rule_test"]
    }
    assert {str(r["alert"]) for r in alert_rules()} == covered


def test_the_runbooks_twelve_alerts_and_empath_down_with_severity_and_links() -> None:
    rules = alert_rules()
    by_severity: dict[str, set[str]] = {}
    for rule in rules:
        labels = rule["labels"]
        assert isinstance(labels, dict)
        by_severity.setdefault(labels["severity"], set()).add(str(rule["alert"]))
        assert labels["component"]
        ann = rule["annotations"]
        assert isinstance(ann, dict)
        assert {"summary", "description", "runbook_url", "dashboard_url"} <= ann.keys()
        uid = ann["dashboard_url"].rsplit("/", 1)[1]
        assert uid in DASHBOARD_UIDS
    assert RUNBOOK_ALERTS == by_severity
    fors = {str(r["alert"]): r.get("for") for r in rules}
    assert {
        "DeliverySuccessRateLow": "5m",
        "QueueBacklogCritical": "2m",
        "SMTPListenerDown": "3m",
        "DeliveryLatencyHigh": "10m",
        "DnsCacheHitRateLow": "15m",
        "DeliveryErrorRateElevated": "15m",
        "QueueSizeGrowing": "15m",
        "CircuitBreakerOpen": "10m",
        "ClusterFallbackMode": "5m",
        "DkimSigningFailures": "5m",
        "DkimKeyNotPublished": "15m",
        "ModuleErrorsElevated": "10m",
        "SmtpAuthBruteForce": "5m",
        "ConfigRestartPending": "1h",
    }.items() <= fors.items()
    # SpoolDiskSpaceLow: the node_exporter rule and the variant on Empath's own gauge
    spool = [r for r in rules if r["alert"] == "SpoolDiskSpaceLow"]
    assert 2 == len(spool)
    assert any("empath_spool_free_bytes" in str(r["expr"]) for r in spool)


def test_runbook_urls_point_at_sections_of_our_runbook() -> None:
    text = (ROOT / "docs" / "RUNBOOKS.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", text, flags=re.M)
    }
    for rule in alert_rules():
        ann = rule["annotations"]
        assert isinstance(ann, dict)
        url = ann["runbook_url"]
        assert url.split("#")[0].endswith("docs/RUNBOOKS.md")
        assert url.split("#")[1] in anchors, url


def test_alertmanager_config_and_routes() -> None:
    amtool = require_tool("amtool")
    out = run(amtool, "check-config", str(AM))
    assert "3 inhibit rules" in out
    routes = [amtool, "config", "routes", "test", f"--config.file={AM}"]
    assert "page" == run(*routes, "severity=critical", "alertname=SMTPListenerDown").split()[0]
    assert "ticket" == run(*routes, "severity=warning", "alertname=CircuitBreakerOpen").split()[0]


def test_alertmanager_inhibitions_are_the_three_of_the_spec() -> None:
    doc = yaml.safe_load(AM.read_text())
    pairs = {(r["source_matchers"][0], r["target_matchers"][0]) for r in doc["inhibit_rules"]}
    assert {
        ('alertname="DeliverySuccessRateLow"', 'alertname="DeliveryErrorRateElevated"'),
        ('alertname="QueueBacklogCritical"', 'alertname="QueueSizeGrowing"'),
        ('alertname="CircuitBreakerStormDetected"', 'alertname="CircuitBreakerOpen"'),
    } == pairs
    # The storm is counted over the job (a cluster's nodes together, issue 14 #13), so it
    # mutes the per-domain alerts of every instance of that job.
    (storm,) = [r for r in doc["inhibit_rules"] if "Storm" in r["source_matchers"][0]]
    assert ["job"] == storm["equal"]


@pytest.mark.parametrize("uid", sorted(DASHBOARD_UIDS))
def test_dashboards_have_their_uid_and_queries(uid: str) -> None:
    doc = json.loads((DEPLOY / "grafana" / f"{uid}.json").read_text())
    assert uid == doc["uid"]
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert exprs
    if uid == "empath-logs":
        assert all(e.startswith('{service="empath"}') for e in exprs)


def test_systemd_unit_reloads_with_sighup_and_raises_the_fd_limit() -> None:
    unit = (DEPLOY / "systemd" / "empath.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "LimitNOFILE=65536" in unit


def test_log_shippers_label_the_stream_service_empath() -> None:
    promtail = yaml.safe_load((DEPLOY / "promtail" / "promtail.yml").read_text())
    relabel = promtail["scrape_configs"][0]["relabel_configs"]
    assert {"target_label": "service", "replacement": "empath"} in relabel
    assert "journal" in promtail["scrape_configs"][0]
    alloy = (DEPLOY / "promtail" / "config.alloy").read_text()
    assert 'target_label = "service"' in alloy and 'replacement  = "empath"' in alloy
