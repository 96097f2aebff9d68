"""OTLP/HTTP push (`metrics.endpoint`): a small receiver on loopback decodes what arrives.

The daemon starts while nothing listens on the endpoint: mail is delivered anyway and
the outage costs one WARN line however many pushes fail.  Then the receiver comes up:
one INFO line says the push recovered, and the next requests carry the DESIGN §6 names
with the values of what happened (one message received and delivered).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from tests.daemon import Daemon, Submitter, ThreadedPeer
from tests.helpers import free_port, wait_for


class Receiver:
    """OTLP/HTTP (protobuf) metrics receiver: keeps every decoded request."""

    def __init__(self, port: int) -> None:
        self.requests: list[ExportMetricsServiceRequest] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportMetricsServiceRequest()
                req.ParseFromString(body)
                received.append(req)
                out = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def latest(self) -> dict[str, Any]:
        """name → metric of the newest request."""
        req = self.requests[-1]
        return {
            m.name: m for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        }


def attrs(point: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in point.attributes}


def test_metrics_are_pushed_over_otlp_and_an_outage_costs_one_line(tmp_path: Path) -> None:
    port = free_port()
    with ThreadedPeer() as good:
        daemon = Daemon(
            tmp_path / "empath",
            overrides={
                "delivery": {"domains": {"good.test": {"mx_override": good.address}}},
                "metrics": {
                    "endpoint": f"http://127.0.0.1:{port}/v1/metrics",
                    "push_interval_secs": 0.3,
                },
            },
        )
        daemon.start()
        try:
            with Submitter(daemon.smtp_port) as s:
                s.send("a@origin.test", ["b@good.test"], "Subject: otlp\n\nhi\n")
            good.wait_delivered(1)  # the collector being down costs no mail
            daemon.wait_log("OTLP metrics push failing")
            time.sleep(1.5)  # several more failed pushes
            assert 1 == len(daemon.logs("OTLP metrics push failing"))

            with Receiver(port) as receiver:
                daemon.wait_log("OTLP metrics push recovered")
                wait_for(lambda: len(receiver.requests) >= 2, timeout=10)
                metrics = receiver.latest()
                # counted while the receiver is still up: once it goes, a new outage begins
                outage_lines = len(daemon.logs("OTLP metrics push failing"))
        finally:
            daemon.stop()
    assert 1 == outage_lines
    assert {
        "empath_delivery_success_rate",
        "empath_delivery_error_rate",
        "empath_delivery_attempts_total",
        "empath_delivery_queue_size",
        "empath_delivery_queue_age_seconds",
        "empath_delivery_queue_oldest_seconds",
        "empath_delivery_circuit_breaker_state",
        "empath_delivery_circuit_breaker_trips_total",
        "empath_smtp_connections_total",
        "empath_smtp_connections_active",
        "empath_smtp_connection_error_rate",
        "empath_smtp_messages_received_total",
        "empath_dns_cache_hits_total",
        "empath_dns_cache_misses_total",
        "empath_dns_cache_evictions_total",
        "empath_spool_free_bytes",
        "empath_spool_size_bytes",
    } <= metrics.keys()
    (received,) = metrics["empath_smtp_messages_received_total"].sum.data_points
    assert 1.0 == received.as_double
    assert metrics["empath_smtp_messages_received_total"].sum.is_monotonic
    (attempt,) = metrics["empath_delivery_attempts_total"].sum.data_points
    assert {"status": "delivered", "domain": "good.test", "smtp_code": "250"} == attrs(attempt)
    assert 1.0 == attempt.as_double
    (age,) = metrics["empath_delivery_queue_age_seconds"].histogram.data_points
    assert 1 == age.count
    assert len(age.explicit_bounds) + 1 == len(age.bucket_counts)
    assert 1 == sum(age.bucket_counts)
    (rate,) = metrics["empath_delivery_success_rate"].gauge.data_points
    assert 1.0 == rate.as_double
    sizes = {
        attrs(p)["status"]: p.as_double
        for p in metrics["empath_delivery_queue_size"].gauge.data_points
    }
    assert {
        "pending": 0.0,
        "in_progress": 0.0,
        "retry": 0.0,
        "failed": 0.0,
        "expired": 0.0,
        "held": 0.0,
    } == sizes
