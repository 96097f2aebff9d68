"""Suspension and breaker reset across two cluster nodes sharing a real redis-server: the
command is given on one node and the other obeys it (issue 15)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ctl import ctl
from tests.daemon import Daemon, submit
from tests.helpers import free_port, wait_for
from tests.redis_server import RedisServer
from tests.sink import SmtpSink

SENDER = "ops@origin.test"
BODY = "Subject: cluster ops\n\nhello\n"


@pytest.fixture
def world(
    tmp_path: Path, redis_server: RedisServer
) -> Iterator[tuple[list[Daemon], SmtpSink, int]]:
    down_port = free_port()
    with SmtpSink() as sink:
        overrides = {
            "delivery": {
                "base_retry_delay_secs": 3600.0,
                "domains": {
                    "sus.test": {"mx_override": f"127.0.0.1:{sink.port}"},
                    "down.test": {"mx_override": f"127.0.0.1:{down_port}"},
                },
                "circuit_breaker": {"failure_threshold": 1, "timeout_secs": 3600.0},
            }
        }
        nodes: list[Daemon] = []
        try:
            for i in range(2):
                cfg = {
                    **overrides,
                    "cluster": {
                        "redis_url": redis_server.url,
                        "node_id": f"node{i}",
                        "heartbeat_secs": 0.5,
                    },
                }
                d = Daemon(tmp_path / f"node{i}", cfg)
                nodes.append(d)
                d.start()
            wait_for(
                lambda: redis_server.command("ZCARD", "empath:nodes") == ":2",
                what="both nodes' heartbeats",
            )
            yield nodes, sink, down_port
        finally:
            for d in nodes:
                d.stop()


def js(d: Daemon, *args: str) -> dict:  # type: ignore[type-arg]
    r = ctl(d, *args, "--json")
    assert 0 == r.returncode, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_a_suspension_given_on_one_node_holds_on_the_other_until_resumed_there(
    world: tuple[list[Daemon], SmtpSink, int],
) -> None:
    (a, b), sink, _ = world
    out = js(a, "queue", "suspend", "sus.test", "--reason", "cluster drill")
    assert out["cluster"] is True
    wait_for(
        lambda: [s["domain"] for s in js(b, "queue", "stats")["suspended"]] == ["sus.test"],
        timeout=5,
        what="node1 to see the suspension",
    )
    assert 'empath_delivery_domain_suspended{domain="sus.test"} 1.0' in b.http_get("/metrics")
    msg = submit(b.smtp_port, SENDER, ["u@sus.test"], BODY)
    time.sleep(1.5)
    assert 0 == sink.session_count()
    (unit,) = js(b, "queue", "view", msg)["units"]
    assert ["suspended"] == [w["kind"] for w in unit["waiting_for"]]
    js(b, "queue", "resume", "sus.test")
    sink.wait_messages(1, timeout=10)
    wait_for(lambda: js(a, "queue", "stats")["suspended"] == [], timeout=5, what="node0 resumed")


def test_a_breaker_reset_on_one_node_releases_the_mail_waiting_on_the_other(
    world: tuple[list[Daemon], SmtpSink, int],
) -> None:
    (a, b), _sink, down_port = world
    submit(b.smtp_port, SENDER, ["u1@down.test"], BODY)
    b.wait_log("Circuit breaker OPENED for down.test")
    waiting = submit(b.smtp_port, SENDER, ["u2@down.test"], BODY)

    def open_on_a() -> bool:
        rows = js(a, "breaker", "list")["breakers"]
        return any(r["domain"] == "down.test" and r["state"] == "Open" for r in rows)

    wait_for(open_on_a, timeout=5, what="node0 to mirror the open breaker")
    with SmtpSink(port=down_port) as back:
        time.sleep(1.0)
        assert 0 == back.message_count()  # the breaker still holds node1's unit
        r = ctl(a, "breaker", "reset", "down.test")
        assert 0 == r.returncode, r.stderr
        assert "closed (was Open)" in r.stdout
        back.wait_messages(1, timeout=5)
    a.wait_log("Circuit breaker CLOSED for down.test")
    assert waiting not in ctl(b, "queue", "list").stdout
