"""Write the Grafana dashboards under deploy/grafana/ (uids empath-overview … empath-logs).

Each panel is (title, unit, [queries]); PromQL queries on the Prometheus data source,
LogQL on Loki for empath-logs.  Regenerate after editing: ``python scripts/gen_dashboards.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
PROM = {"type": "prometheus", "uid": "${datasource}"}
LOKI = {"type": "loki", "uid": "${loki}"}

Panel = tuple[str, str, list[str]]

DASHBOARDS: dict[str, tuple[str, list[Panel]]] = {
    "empath-overview": ("Empath MTA - Overview", [
        ("Delivery success rate (SLO 99.5%)", "percentunit", ["empath_delivery_success_rate"]),
        ("Delivery error rate", "percentunit", ["empath_delivery_error_rate"]),
        ("Queue by status", "short", ["sum by (status) (empath_delivery_queue_size)"]),
        ("Messages received / s", "ops",
         ["sum(rate(empath_smtp_messages_received_total[5m]))"]),
        ("Deliveries / s", "ops", ["sum by (status) (rate(empath_delivery_attempts_total[5m]))"]),
        ("Open circuit breakers", "short",
         ["count(empath_delivery_circuit_breaker_state == 1) or vector(0)"]),
        ("Spool free", "percentunit", ["empath_spool_free_bytes / empath_spool_size_bytes"]),
        ("Scrape up", "short", ['up{job="empath"}']),
    ]),
    "empath-delivery": ("Empath MTA - Delivery", [
        ("Success and error rate", "percentunit",
         ["empath_delivery_success_rate", "empath_delivery_error_rate"]),
        ("Failed attempts by domain (top 10)", "ops",
         ["topk(10, sum by (domain) "
          '(rate(empath_delivery_attempts_total{status="failed"}[5m])))']),
        ("Failed attempts by SMTP code", "ops",
         ['sum by (smtp_code) (rate(empath_delivery_attempts_total{status="failed"}[5m]))']),
        ("Queue age p50 / p95 / p99", "s",
         [f"histogram_quantile({q}, sum by (le) "
          "(rate(empath_delivery_queue_age_seconds_bucket[5m])))"
          for q in ("0.5", "0.95", "0.99")]),
        ("Circuit breaker state by domain", "short",
         ["max by (domain) (empath_delivery_circuit_breaker_state)"]),
        ("Circuit breaker trips (5m)", "short",
         ["sum by (domain) (increase(empath_delivery_circuit_breaker_trips_total[5m]))"]),
        ("Rate-limit deferrals / min", "short",
         ["sum by (domain) (rate(empath_delivery_rate_limited_total[1m])) * 60"]),
    ]),
    "empath-smtp": ("Empath MTA - SMTP", [
        ("Connections / s", "ops", ["sum by (listener) (rate(empath_smtp_connections_total[5m]))"]),
        ("Active sessions", "short", ["sum by (listener) (empath_smtp_connections_active)"]),
        ("Messages received / s", "ops",
         ["sum by (listener) (rate(empath_smtp_messages_received_total[5m]))"]),
        ("Session error rate", "percentunit", ["empath_smtp_connection_error_rate"]),
    ]),
    "empath-queue": ("Empath MTA - Queue", [
        ("Units by status", "short", ["empath_delivery_queue_size"]),
        ("Pending growth / min", "short",
         ['deriv(empath_delivery_queue_size{status="pending"}[10m]) * 60']),
        ("Oldest unit age", "s", ["empath_delivery_queue_oldest_seconds"]),
        ("Most retried messages", "short", ["topk(20, empath_delivery_retry_count)"]),
        ("Received vs delivered / s", "ops",
         ["sum(rate(empath_smtp_messages_received_total[5m]))",
          'sum(rate(empath_delivery_attempts_total{status="delivered"}[5m]))']),
    ]),
    "empath-dns": ("Empath MTA - DNS", [
        ("MX cache hit rate", "percentunit",
         ["rate(empath_dns_cache_hits_total[5m]) / (rate(empath_dns_cache_hits_total[5m]) "
          "+ rate(empath_dns_cache_misses_total[5m]))"]),
        ("Cache hits, misses, evictions / s", "ops",
         ["rate(empath_dns_cache_hits_total[5m])", "rate(empath_dns_cache_misses_total[5m])",
          "rate(empath_dns_cache_evictions_total[5m])"]),
        ("Mean lookup time by query type", "s",
         ["sum by (query_type) (rate(empath_dns_lookup_duration_seconds_sum[5m])) / "
          "sum by (query_type) (rate(empath_dns_lookup_duration_seconds_count[5m]))"]),
        ("Lookup p95 by query type", "s",
         ["histogram_quantile(0.95, sum by (query_type, le) "
          "(rate(empath_dns_lookup_duration_seconds_bucket[5m])))"]),
    ]),
    "empath-logs": ("Empath MTA - Log Exploration", [
        ("Errors", "logs", ['{service="empath"} | json | level="ERROR"']),
        ("Delivery errors", "logs",
         ['{service="empath"} | json | level="ERROR" | fields_component="delivery"']),
        ("Permanent failures (5xx)", "logs",
         ['{service="empath"} | json | fields_smtp_code=~"5.."']),
        ("Circuit breaker transitions", "logs",
         ['{service="empath"} | json | fields_message=~"Circuit breaker.*"']),
        ("Rate limiting", "logs", ['{service="empath"} |= "Rate limit exceeded"']),
        ("One message ($message_id)", "logs",
         ['{service="empath"} | json | fields_message_id="$message_id"']),
    ]),
}  # fmt: skip


def panel(i: int, title: str, unit: str, queries: list[str], logs: bool) -> dict[str, Any]:
    return {
        "id": i + 1,
        "title": title,
        "type": "logs" if logs else "timeseries",
        "datasource": LOKI if logs else PROM,
        "gridPos": {"h": 8 if not logs else 10, "w": 12 if not logs else 24,
                    "x": 0 if logs else (i % 2) * 12, "y": (i // (1 if logs else 2)) * 8},
        **({} if logs else {"fieldConfig": {"defaults": {"unit": unit}, "overrides": []}}),
        "targets": [
            {"refId": chr(ord("A") + j), "expr": q, "datasource": LOKI if logs else PROM}
            for j, q in enumerate(queries)
        ],
    }  # fmt: skip


def variables(logs: bool) -> list[dict[str, Any]]:
    if logs:
        return [
            {"name": "loki", "type": "datasource", "query": "loki", "label": "Loki"},
            {"name": "message_id", "type": "textbox", "label": "message id", "query": ""},
        ]
    return [{"name": "datasource", "type": "datasource", "query": "prometheus",
             "label": "Prometheus"}]  # fmt: skip


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    links = [{"title": title, "url": f"/d/{uid}", "type": "link"}
             for uid, (title, _) in DASHBOARDS.items()]  # fmt: skip
    for uid, (title, panels) in DASHBOARDS.items():
        logs = uid == "empath-logs"
        doc = {
            "uid": uid,
            "title": title,
            "tags": ["empath"],
            "timezone": "utc",
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": variables(logs)},
            "links": links,
            "panels": [panel(i, t, u, q, logs) for i, (t, u, q) in enumerate(panels)],
        }
        (OUT / f"{uid}.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
