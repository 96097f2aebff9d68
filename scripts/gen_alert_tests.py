"""Write deploy/prometheus/prometheus-alerts.test.yml (the `promtool test rules` cases).

For every alert of deploy/prometheus/prometheus-alerts.yml: an instance ``fire`` whose
series make it true and an instance ``quiet`` whose series keep it false; evaluated
just before the rule's ``for`` has passed (nothing firing yet) and just after (only
``fire``).  Then the idle node (issue 14 #19): one stuck message, no other traffic, for
two hours -- none of the ratio alerts (nor the listener or breaker alerts) fires.
Expected annotations are the rule's with ``{{ $labels.x }}`` filled in, so
a changed rule regenerates its test: ``.venv/bin/python scripts/gen_alert_tests.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "prometheus-alerts.yml"
OUT = ROOT / "deploy" / "prometheus" / "prometheus-alerts.test.yml"


def s(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def both(
    name: str, extra: dict[str, str], fire: str, quiet: str, job: str = "empath"
) -> list[dict[str, str]]:
    return [
        s(name, {**extra, "instance": "fire", "job": job}, fire),
        s(name, {**extra, "instance": "quiet", "job": job}, quiet),
    ]


def bucket_series(instance: str, counts: dict[str, str]) -> list[dict[str, str]]:
    return [
        s("empath_delivery_queue_age_seconds_bucket", {"le": le, "instance": instance,
                                                       "job": "empath"}, v)
        for le, v in counts.items()
    ]  # fmt: skip


def attempts(instance: str, values: str) -> dict[str, str]:
    """Delivery attempts of one instance (the ratio alerts' minimum-traffic condition)."""
    return s("empath_delivery_queue_age_seconds_count", {"instance": instance, "job": "empath"},
             values)  # fmt: skip


def trips(
    job: str, instance: str, domains: list[str], values: str = "0 1x30"
) -> list[dict[str, str]]:
    return [
        s("empath_delivery_circuit_breaker_trips_total",
          {"domain": d, "instance": instance, "job": job}, values)
        for d in domains
    ]  # fmt: skip


# alert → (source group index or None for "any", series, before, after, output labels of
# fire; a label given as "" is left out of the expected alert)
CASES: dict[str, list[tuple[str | None, list[dict[str, str]], str, str, dict[str, str]]]] = {
    "DeliverySuccessRateLow": [
        (None,
         [*both("empath_delivery_success_rate", {}, "0.5x30", "0.99x30"),
          attempts("fire", "0+30x30"), attempts("quiet", "0+30x30")],
         "5m", "7m", {})
    ],
    "QueueBacklogCritical": [
        (None, both("empath_delivery_queue_size", {"status": "pending"}, "20000x30", "500x30"),
         "1m", "3m", {"status": "pending"}),
    ],
    "SMTPListenerDown": [
        # 100 connections a minute, then none from 29 minutes on.
        (None,
         both("empath_smtp_connections_total", {"listener": "[::]:25"}, "0+100x29 2900x30",
              "0+100x60")
         + both("empath_smtp_connections_active", {"listener": "[::]:25"}, "0x60", "0x60"),
         "32m", "34m", {}),
    ],
    "CircuitBreakerStormDetected": [
        # One node: five domains; the quiet job's node four.
        (None,
         trips("fire", "n1", [f"d{i}.test" for i in range(5)])
         + trips("quiet", "n1", [f"d{i}.test" for i in range(4)]),
         "1m", "3m", {"job": "fire", "instance": ""}),
        # Issue 14 #13, a cluster: six domains tripped 3 + 3 on two nodes is a storm; four
        # domains tripped on both nodes (eight series) is not.
        (None,
         trips("fire", "n1", ["d0.test", "d1.test", "d2.test"])
         + trips("fire", "n2", ["d3.test", "d4.test", "d5.test"])
         + trips("quiet", "n1", [f"d{i}.test" for i in range(4)])
         + trips("quiet", "n2", [f"d{i}.test" for i in range(4)]),
         "1m", "3m", {"job": "fire", "instance": ""}),
        # Series born tripped (failures and trip between two scrapes: no increase()).
        (None,
         trips("fire", "n1", [f"d{i}.test" for i in range(5)], "_ 1x30")
         + trips("quiet", "n1", [f"d{i}.test" for i in range(4)], "_ 1x30"),
         "1m", "3m", {"job": "fire", "instance": ""}),
    ],
    "SpoolDiskSpaceLow": [
        ("node_exporter",
         both("node_filesystem_avail_bytes", {"mountpoint": "/var/spool/empath"}, "5x30",
              "50x30", job="node")
         + both("node_filesystem_size_bytes", {"mountpoint": "/var/spool/empath"}, "100x30",
                "100x30", job="node"),
         "4m", "6m", {"mountpoint": "/var/spool/empath", "job": "node"}),
        ("empath",
         both("empath_spool_free_bytes", {}, "5x30", "50x30")
         + both("empath_spool_size_bytes", {}, "100x30", "100x30"),
         "4m", "6m", {}),
    ],
    "EmpathDown": [(None, both("up", {}, "0x30", "1x30"), "0m", "2m", {})],
    "DeliveryLatencyHigh": [
        (None,
         bucket_series("fire", {"60": "0x40", "600": "0x40", "3600": "0+10x40",
                                "+Inf": "0+10x40"})
         + bucket_series("quiet", {"60": "0+10x40", "600": "0+10x40", "3600": "0+10x40",
                                   "+Inf": "0+10x40"})
         + both("empath_delivery_queue_age_seconds_count", {}, "0+10x40", "0+10x40"),
         "10m", "12m", {}),
    ],
    "OldestMessageAgeHigh": [
        (None, both("empath_delivery_queue_oldest_seconds", {}, "4000x30", "100x30"),
         "4m", "6m", {}),
    ],
    "DnsCacheHitRateLow": [
        (None,
         both("empath_dns_cache_hits_total", {}, "0+10x40", "0+90x40")
         + both("empath_dns_cache_misses_total", {}, "0+90x40", "0+10x40"),
         "15m", "17m", {}),
    ],
    "RateLimitingExcessive": [
        (None,
         [s("empath_delivery_rate_limited_total",
            {"domain": "slow.test", "instance": "fire", "job": "empath"}, "0+300x30"),
          s("empath_delivery_rate_limited_total",
            {"domain": "slow.test", "instance": "quiet", "job": "empath"}, "0+60x30")],
         "5m", "7m", {"domain": "slow.test"}),
    ],
    "DeliveryErrorRateElevated": [
        (None,
         [*both("empath_delivery_error_rate", {}, "0.2x30", "0.01x30"),
          attempts("fire", "0+30x30"), attempts("quiet", "0+30x30")],
         "15m", "17m", {}),
    ],
    "QueueSizeGrowing": [
        (None, both("empath_delivery_queue_size", {"status": "pending"}, "0+100x40", "100x40"),
         "15m", "17m", {"status": "pending"}),
    ],
    "CircuitBreakerOpen": [
        (None,
         [s("empath_delivery_circuit_breaker_state",
            {"domain": "dead.test", "state": "Open", "instance": "fire", "job": "empath"},
            "1x30"),
          s("empath_delivery_circuit_breaker_state",
            {"domain": "dead.test", "state": "Closed", "instance": "quiet", "job": "empath"},
            "0x30"),
          *both("empath_delivery_queue_size", {"status": "retry"}, "20x30", "20x30")],
         "9m", "11m", {"domain": "dead.test"}),
    ],
    "ClusterFallbackMode": [
        (None, both("empath_cluster_fallback", {}, "1x30", "0x30"), "4m", "6m", {}),
    ],
    "DkimSigningFailures": [
        (None,
         both("empath_dkim_signatures_total",
              {"domain": "example.org", "algorithm": "rsa-sha256", "result": "error"},
              "0+1x30", "0x30")
         + both("empath_dkim_signatures_total",
                {"domain": "example.org", "algorithm": "rsa-sha256", "result": "ok"},
                "0+50x30", "0+50x30"),
         "4m", "7m", {"domain": "example.org"}),
    ],
    "DkimKeyNotPublished": [
        (None,
         both("empath_dkim_key_published",
              {"domain": "example.org", "selector": "s202612r", "algorithm": "rsa-sha256"},
              "0x60", "1x60"),
         "14m", "16m", {"domain": "example.org", "selector": "s202612r",
                        "algorithm": "rsa-sha256"}),
    ],
    "ModuleErrorsElevated": [
        (None,
         both("empath_module_calls_total",
              {"module": "rspamd", "hook": "on_data", "result": "error"},
              "0+3x30", "0+1x30")
         + both("empath_module_calls_total",
                {"module": "rspamd", "hook": "on_data", "result": "continue"},
                "0+20x30", "0+40x30"),
         "9m", "12m", {"module": "rspamd"}),
    ],
    "SmtpAuthBruteForce": [
        (None,
         both("empath_smtp_auth_attempts_total", {"mechanism": "PLAIN", "result": "failure"},
              "0+200x30", "0+4x30")
         + both("empath_smtp_auth_attempts_total", {"mechanism": "LOGIN", "result": "blocked"},
                "0+5x30", "0+5x30")
         + both("empath_smtp_auth_attempts_total", {"mechanism": "PLAIN", "result": "success"},
                "0+50x30", "0+50x30"),
         "4m", "7m", {}),
    ],
    "ConfigRestartPending": [
        (None, both("empath_config_restart_pending", {}, "2x90", "0x90"), "59m", "61m", {}),
    ],
}  # fmt: skip


def idle(metric: str, values: str, **labels: str) -> dict[str, str]:
    return s(metric, {**labels, "instance": "idle", "job": "empath"}, values)


# Issue 14 #19: an idle node for two hours with one message stuck to a dead domain (an
# attempt every 5 minutes, each a DNS cache miss, an old queue age, its breaker Open)
# and one message that failed for good; five SMTP sessions long ago.
IDLE_SERIES = [
    idle("empath_delivery_success_rate", "0x120"),
    idle("empath_delivery_error_rate", "1x120"),
    idle("empath_delivery_attempts_total", "0+0.2x120", status="failed", domain="stuck.test",
         smtp_code=""),
    idle("empath_delivery_queue_age_seconds_bucket", "0x120", le="600"),
    idle("empath_delivery_queue_age_seconds_bucket", "0+0.2x120", le="3600"),
    idle("empath_delivery_queue_age_seconds_bucket", "0+0.2x120", le="+Inf"),
    idle("empath_delivery_queue_age_seconds_count", "0+0.2x120"),
    idle("empath_dns_cache_hits_total", "0x120"),
    idle("empath_dns_cache_misses_total", "0+0.2x120"),
    idle("empath_smtp_connections_total", "5x120", listener="[::]:25"),
    idle("empath_smtp_connections_active", "0x120", listener="[::]:25"),
    idle("empath_delivery_circuit_breaker_state", "1x120", domain="stuck.test", state="Open"),
    idle("empath_delivery_circuit_breaker_trips_total", "1+0.2x120", domain="stuck.test"),
    idle("empath_delivery_queue_size", "1x120", status="retry"),
    idle("empath_delivery_queue_size", "0x120", status="pending"),
    idle("up", "1x120"),
]  # fmt: skip
IDLE_QUIET = [
    "DeliverySuccessRateLow",
    "SMTPListenerDown",
    "CircuitBreakerStormDetected",
    "DeliveryLatencyHigh",
    "DnsCacheHitRateLow",
    "DeliveryErrorRateElevated",
    "CircuitBreakerOpen",
]

LABEL_RE = re.compile(r"\{\{ \$labels\.(\w+) \}\}")


def fill(template: str, labels: dict[str, str]) -> str:
    return LABEL_RE.sub(lambda m: labels[m.group(1)], template)


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def main() -> int:
    all_rules = rules()
    names = {r["alert"] for r in all_rules}
    missing = names - CASES.keys()
    if missing:
        print(f"no test case for {sorted(missing)}", file=sys.stderr)
        return 1
    tests = []
    for alert, cases in CASES.items():
        for source, series, before, after, out in cases:
            (rule,) = [
                r for r in all_rules
                if r["alert"] == alert and (source is None or r["labels"].get("source") == source)
            ]  # fmt: skip
            labels = {"instance": "fire", "job": "empath", **out, **rule["labels"]}
            labels = {k: v for k, v in labels.items() if v}
            annotations = {k: fill(v, labels) for k, v in rule["annotations"].items()}
            tests.append(
                {
                    "interval": "1m",
                    "input_series": series,
                    "alert_rule_test": [
                        {"eval_time": before, "alertname": alert, "exp_alerts": []},
                        {
                            "eval_time": after,
                            "alertname": alert,
                            "exp_alerts": [{"exp_labels": labels, "exp_annotations": annotations}],
                        },
                    ],
                }
            )
    tests.append(
        {
            "interval": "1m",
            "input_series": IDLE_SERIES,
            "alert_rule_test": [
                {"eval_time": at, "alertname": alert, "exp_alerts": []}
                for alert in IDLE_QUIET
                for at in ("30m", "60m", "120m")
            ],
        }
    )
    header = (
        "# Generated by scripts/gen_alert_tests.py: for every alert, one instance that fires\n"
        "# after the rule's `for` and one that stays quiet.  Run: promtool test rules <this>\n"
    )
    body = yaml.safe_dump(
        {"rule_files": ["prometheus-alerts.yml"], "evaluation_interval": "1m", "tests": tests},
        sort_keys=False,
        width=120,
    )
    OUT.write_text(header + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
