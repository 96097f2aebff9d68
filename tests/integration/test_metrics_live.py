"""DESIGN §6 metrics, §8 logs and the runbooks' queries against one live daemon and real peers.

The scenario (module fixture): mail to a good sink, a sink answering 4xx, one answering
5xx, a dead MX that trips its circuit breaker, a rate-limited domain, and a domain
resolved through dnsmasq (its MX is a peer on 127.0.0.60:25) three times.  Afterwards
each metric has the value the scenario implies; `promtool check metrics` passes on the
scrape; every PromQL expression of the dashboards and of docs/RUNBOOKS.md parses and
names only metrics present in the scrape; every LogQL query of the operators' runbook
finds the right log lines.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import logql
from tests.daemon import Daemon, Submitter, ThreadedPeer
from tests.dkim_support import dkim_section, make_selector, txt_records
from tests.dnsmasq import DnsRecords, dnsmasq
from tests.helpers import free_port, require_tool, wait_for

ROOT = Path(__file__).resolve().parents[2]
SENDER = "sender@good.test"
BODY = "From: sender@good.test\nSubject: metrics scenario\n\nhello\n"
MX_HOST = "127.0.0.60"  # this suite's stand-in MX address (port 25)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Scenario:
    daemon: Daemon
    samples: Samples
    scrape: str
    ids: dict[str, list[str]]
    sessions: int


def parse_scrape(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("metrics")
    dkim_key = make_selector(tmp / "dkim", "s1", "rsa-sha256")  # mail From: good.test is signed
    records = DnsRecords(
        mx={"dns.test": [(10, "mx.dns.test")]},
        hosts={"mx.dns.test": [MX_HOST]},
        txt=txt_records("good.test", dkim_key),
    )
    with (
        dnsmasq(records, tmp) as dns,
        ThreadedPeer() as good,
        ThreadedPeer({"data_end": "451 4.3.0 try again later"}) as soft,
        ThreadedPeer({"rcpt_default": "550 5.1.1 no such user"}) as hard,
        ThreadedPeer(host=MX_HOST, port=25) as dnspeer,
    ):
        dead = f"127.0.0.1:{free_port()}"
        daemon = Daemon(
            tmp / "empath",
            overrides={
                "delivery": {
                    "domains": {
                        "good.test": {"mx_override": good.address},
                        "slow.test": {"mx_override": good.address},
                        "soft.test": {"mx_override": soft.address},
                        "hard.test": {"mx_override": hard.address},
                        "dead.test": {"mx_override": dead},
                    },
                    "rate_limit": {
                        "domain_limits": {
                            "slow.test": {"messages_per_second": 0.0001, "burst_size": 1}
                        }
                    },
                    "circuit_breaker": {"failure_threshold": 3, "timeout_secs": 300.0},
                    "dns": {"nameservers": [dns.nameserver]},
                },
                "dkim": dkim_section("good.test", [dkim_key]),
                # a module on every RCPT, for the module series (trusted clients: no lookup)
                "modules": [
                    {
                        "type": "Python",
                        "name": "empath.modules.dnsbl:Dnsbl",
                        "arguments": {"zones": ["bl.test"]},
                    }
                ],
            },
        )
        daemon.start()
        try:
            ids: dict[str, list[str]] = {}
            with Submitter(daemon.smtp_port) as s:
                for domain, n in (("good", 2), ("soft", 1), ("hard", 1), ("dead", 3), ("slow", 3)):
                    ids[domain] = [s.send(SENDER, [f"u{i}@{domain}.test"], BODY) for i in range(n)]
            ids["dns"] = []
            for i in range(3):  # one after the other: the first lookup misses, the rest hit
                with Submitter(daemon.smtp_port) as s:
                    ids["dns"].append(s.send(SENDER, [f"u{i}@dns.test"], BODY))
                dnspeer.wait_delivered(i + 1)
            good.wait_delivered(2 + 1 + 1)  # good.test, the first slow.test, the DSN
            daemon.wait_log("Delivery failed permanently", domain="hard.test")
            daemon.wait_log("Delivery deferred", domain="soft.test")
            daemon.wait_log("Circuit breaker OPENED for dead.test")
            daemon.wait_log("Rate limit exceeded", domain="slow.test")  # one line per 10 s
            daemon.wait_log("Delivery deferred", count=3, domain="dead.test")
            # one session ends by error: the client resets it after the greeting
            with socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=10) as raw:
                assert raw.recv(1024).startswith(b"220")
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            wait_for(lambda: "empath_smtp_connection_error_rate 0.2" in daemon.http_get("/metrics"))
            wait_for(lambda: "empath_dkim_key_published{" in daemon.http_get("/metrics"))
            scrape = daemon.http_get("/metrics")
            yield Scenario(daemon, parse_scrape(scrape), scrape, ids, sessions=5)
        finally:
            daemon.stop()


# --- values --------------------------------------------------------------------------


def test_delivery_attempts_by_status_domain_and_code(scenario: Scenario) -> None:
    assert {
        frozenset({("status", "delivered"), ("domain", "good.test"), ("smtp_code", "250")}): 3.0,
        frozenset({("status", "delivered"), ("domain", "slow.test"), ("smtp_code", "250")}): 1.0,
        frozenset({("status", "delivered"), ("domain", "dns.test"), ("smtp_code", "250")}): 3.0,
        frozenset({("status", "failed"), ("domain", "soft.test"), ("smtp_code", "451")}): 1.0,
        frozenset({("status", "failed"), ("domain", "hard.test"), ("smtp_code", "550")}): 1.0,
        frozenset({("status", "failed"), ("domain", "dead.test"), ("smtp_code", "")}): 3.0,
    } == series(scenario.samples, "empath_delivery_attempts_total")


def test_success_and_error_rates_over_the_window(scenario: Scenario) -> None:
    # 7 units delivered (3 good incl. the DSN, 1 slow, 3 dns), 1 failed permanently (5xx)
    assert 7 / 8 == pytest.approx(value(scenario.samples, "empath_delivery_success_rate"))
    # 5 failed attempts (soft, hard, 3 dead) of 12
    assert 5 / 12 == pytest.approx(value(scenario.samples, "empath_delivery_error_rate"))


def test_queue_sizes_oldest_age_and_retry_counts(scenario: Scenario) -> None:
    s = scenario.samples
    assert {
        "pending": 2.0,
        "in_progress": 0.0,
        "retry": 4.0,
        "failed": 1.0,
        "expired": 0.0,
        "held": 0.0,
    } == {
        dict(labels)["status"]: v for labels, v in series(s, "empath_delivery_queue_size").items()
    }
    assert 0 < value(s, "empath_delivery_queue_oldest_seconds") < 120
    retried = {
        dict(k)["message_id"]: v for k, v in series(s, "empath_delivery_retry_count").items()
    }
    assert dict.fromkeys(scenario.ids["soft"] + scenario.ids["dead"], 1.0) == retried
    # one queue-age observation per attempt
    assert 12.0 == value(s, "empath_delivery_queue_age_seconds_count")
    assert 12.0 == value(s, "empath_delivery_queue_age_seconds_bucket", le="+Inf")


def test_breaker_state_trips_and_rate_limited(scenario: Scenario) -> None:
    s = scenario.samples
    assert 1.0 == value(
        s, "empath_delivery_circuit_breaker_state", domain="dead.test", state="Open"
    )
    assert 0.0 == value(
        s, "empath_delivery_circuit_breaker_state", domain="soft.test", state="Closed"
    )
    assert 1 == sum(
        1
        for k in series(s, "empath_delivery_circuit_breaker_state")
        if ("domain", "dead.test") in k
    )
    assert 1.0 == value(s, "empath_delivery_circuit_breaker_trips_total", domain="dead.test")
    assert 0.0 == value(s, "empath_delivery_circuit_breaker_trips_total", domain="soft.test")
    assert 2.0 <= value(s, "empath_delivery_rate_limited_total", domain="slow.test")


def test_smtp_counters(scenario: Scenario) -> None:
    s = scenario.samples
    listener = scenario.daemon.config["smtp_controller"]["listeners"][0]["socket"]
    assert float(scenario.sessions) == value(s, "empath_smtp_connections_total", listener=listener)
    assert 0.0 == value(s, "empath_smtp_connections_active", listener=listener)
    assert 13.0 == value(s, "empath_smtp_messages_received_total", listener=listener)
    assert 1 / 5 == value(s, "empath_smtp_connection_error_rate")  # the reset session


def test_dns_cache_and_lookup_durations(scenario: Scenario) -> None:
    s = scenario.samples
    assert 1.0 <= value(s, "empath_dns_cache_misses_total")
    assert 2.0 <= value(s, "empath_dns_cache_hits_total")
    assert 0.0 == value(s, "empath_dns_cache_evictions_total")
    assert 1.0 <= value(s, "empath_dns_lookup_duration_seconds_count", query_type="MX")


def test_spool_filesystem_gauges(scenario: Scenario) -> None:
    st = os.statvfs(scenario.daemon.spool_path)
    total = float(st.f_blocks * st.f_frsize)
    assert total == value(scenario.samples, "empath_spool_size_bytes")
    free = value(scenario.samples, "empath_spool_free_bytes")
    assert abs(free - st.f_bavail * st.f_frsize) < 0.01 * total


def test_promtool_check_metrics_accepts_the_scrape(scenario: Scenario) -> None:
    promtool = require_tool("promtool")
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=scenario.scrape, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert 0 == proc.returncode, proc.stdout + proc.stderr


# --- every query of the dashboards and of our runbook ---------------------------------


def dashboard_exprs() -> list[str]:
    out = []
    for path in sorted((ROOT / "deploy" / "grafana").glob("*.json")):
        doc = json.loads(path.read_text())
        for panel in doc["panels"]:
            if panel["datasource"]["type"] == "prometheus":
                out += [t["expr"] for t in panel["targets"]]
    return out


def doc_blocks(path: Path, lang: str) -> list[str]:
    text = path.read_text()
    return [b.strip() for b in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)]


def runbook_promql(path: Path) -> list[str]:
    """Each non-comment line of ```promql blocks is one expression (trailing # comments cut)."""
    out = []
    for block in doc_blocks(path, "promql"):
        for line in block.splitlines():
            expr = re.sub(r"\s+#.*$", "", line).strip()
            if expr and not expr.startswith("#"):
                out.append(expr)
    return out


def check_promql(exprs: list[str], tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rules = {
        "groups": [
            {
                "name": "parse",
                "rules": [
                    {"record": f"check:expr{i}", "expr": e.replace("$DOMAIN", "example.com")}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip
    assert 0 == proc.returncode, proc.stdout + proc.stderr


def metric_names(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in re.findall(r"\bempath_[a-z_]+", e)}


def scraped_names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def test_dashboard_queries_parse_and_name_scraped_metrics(
    scenario: Scenario, tmp_path: Path
) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    check_promql(exprs, tmp_path)
    assert set() == metric_names(exprs) - scraped_names(scenario.samples)


def test_runbook_queries_parse_and_name_scraped_metrics(scenario: Scenario, tmp_path: Path) -> None:
    exprs = runbook_promql(ROOT / "docs" / "RUNBOOKS.md")
    assert len(exprs) > 15
    check_promql(exprs, tmp_path)
    names = metric_names(exprs)
    assert {"empath_delivery_success_rate", "empath_spool_free_bytes"} <= names
    assert set() == names - scraped_names(scenario.samples)


def test_alert_rule_metrics_are_scraped(scenario: Scenario) -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus-alerts.yml").read_text())
    exprs = [str(r["expr"]) for g in doc["groups"] for r in g["rules"]]
    assert set() == metric_names(exprs) - scraped_names(scenario.samples)


# --- logs --------------------------------------------------------------------------------


def raw_lines(scenario: Scenario) -> list[str]:
    return scenario.daemon.log_path.read_text(errors="replace").splitlines()


def test_failed_delivery_lines_carry_level_component_domain_id_and_code(
    scenario: Scenario,
) -> None:
    (line,) = scenario.daemon.logs("Delivery failed permanently")
    assert "ERROR" == line["level"]
    f = line["fields"]
    assert ("delivery", "hard.test", scenario.ids["hard"][0], "550") == (
        f["component"], f["domain"], f["message_id"], f["smtp_code"]
    )  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"])
    assert line["target"].startswith("empath.")


# The operators' runbook's LogQL, with its placeholders filled from the scenario.
def seed_logql() -> list[str]:
    seed = ROOT.parent.parent / "shared" / "seed" / "RUNBOOKS.md"
    if not seed.exists():
        seed = Path("/work/shared/seed/RUNBOOKS.md")
    text = seed.read_text()
    found = re.findall(r'(\{service="empath"\}[^\n`]*)', text)
    return sorted({q.strip() for q in found})


def expected(lines: list[dict[str, Any]], pred: Any) -> list[dict[str, Any]]:
    return [ln for ln in lines if pred(ln.get("level", ""), ln.get("fields", {}))]


def test_every_runbook_logql_query_finds_the_right_lines(scenario: Scenario) -> None:
    queries = seed_logql()
    assert len(queries) >= 9, queries
    raw = raw_lines(scenario)
    parsed = [json.loads(x) for x in raw]
    hard_id = scenario.ids["hard"][0]
    fill = {
        "$DOMAIN": "dead.test",
        "<message-id>": hard_id,
        "01JCXYZ...": hard_id,
        "example.com": "soft.test",
    }
    # an independent predicate per query shape
    preds: dict[str, Any] = {
        'level="ERROR"': lambda lv, f: lv == "ERROR",
        'fields.component="delivery"': lambda lv, f: f.get("component") == "delivery",
        'fields.component="smtp"': lambda lv, f: f.get("component") == "smtp",
        'fields.domain!=""': lambda lv, f: f.get("domain", "") != "",
        'fields.smtp_code!=""': lambda lv, f: f.get("smtp_code", "") != "",
        'fields.smtp_code=~"5.."': lambda lv, f: re.fullmatch("5..", f.get("smtp_code", "")),
        'fields.message=~"Circuit breaker.*"': lambda lv, f: f["message"].startswith(
            "Circuit breaker"
        ),
        'fields.domain="dead.test"': lambda lv, f: f.get("domain") == "dead.test",
        'fields.domain="soft.test"': lambda lv, f: f.get("domain") == "soft.test",
        f'fields.message_id="{hard_id}"': lambda lv, f: f.get("message_id") == hard_id,
    }
    nonempty = 0
    for query in queries:
        q = query
        for k, v in fill.items():
            q = q.replace(k, v)
        got = logql.run(q, raw, {"service": "empath"})
        conds = [c.strip() for c in q.split("|")[2:]]
        want = [
            json.dumps(x)
            for x in parsed
            if all(preds[c](x.get("level", ""), x.get("fields", {})) for c in conds)
        ]
        assert sorted(want) == sorted(json.dumps(json.loads(g)) for g in got), q
        nonempty += bool(got)
        if "Circuit breaker" in q:
            assert any("OPENED for dead.test" in g for g in got)
        if "5.." in q:
            assert any(hard_id in g for g in got)
    assert nonempty >= len(queries) - 1  # only the smtp-error query has nothing to find
    assert logql.run('{service="empath"} |= "Rate limit exceeded"', raw, {"service": "empath"})
