"""Cluster mode (DESIGN §11, issue 11): three real Empath nodes sharing policy in a real
redis-server on loopback, delivering to scripted peers that count what they see."""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from empath.testing.scripted_peer import PeerScript
from tests.ctl import ctl
from tests.daemon import Daemon, Submitter, ThreadedPeer, log_time, parked_overrides, submit
from tests.helpers import free_port, wait_for
from tests.redis_server import RedisServer

MSG = "Subject: cluster\n\nhello\n"
ID_RE = re.compile(rb" id ([0-9A-HJKMNP-TV-Z]{26})")

Cluster = Callable[..., list[Daemon]]


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer) -> Iterator[Cluster]:
    """start(n, overrides) -> n nodes on one Redis; every node is stopped by PID."""
    started: list[Daemon] = []

    def start(n: int, overrides: dict[str, Any], lease_secs: float = 15.0) -> list[Daemon]:
        nodes: list[Daemon] = []
        for _ in range(n):
            i = len(started)
            cfg = {
                **overrides,
                "cluster": {
                    "redis_url": redis_server.url,
                    "node_id": f"node{i}",
                    "lease_secs": lease_secs,
                    "heartbeat_secs": 0.5,
                },
            }
            d = Daemon(tmp_path / f"node{i}", cfg)
            started.append(d)
            d.start()
            nodes.append(d)
        wait_for(
            lambda: redis_server.command("ZCARD", "empath:nodes") == f":{len(started)}",
            what="every node's first heartbeat",
        )
        return nodes

    try:
        yield start
    finally:
        for d in started:
            d.stop()


def delivered_ids(peer: ThreadedPeer) -> set[str]:
    """Queue ids (from our Received: header) of the messages the peer accepted."""
    return {m.group(1).decode() for t in peer.delivered() if (m := ID_RE.search(t.body))}


def delivery_times(peer: ThreadedPeer) -> list[float]:
    return sorted(t for t, e in peer.events("transaction") if str(e["reply"]).startswith("250"))


@pytest.mark.slow
def test_domain_rate_limit_holds_across_three_nodes(cluster: Cluster) -> None:
    """5 msg/s for a domain holds within 10 % over 30 s of load spread over three nodes."""
    rate, window_s = 5.0, 30.0
    with ThreadedPeer() as peer:
        nodes = cluster(
            3,
            {
                "delivery": {
                    "domains": {"rl.test": {"mx_override": peer.address}},
                    "rate_limit": {
                        "domain_limits": {"rl.test": {"messages_per_second": rate, "burst_size": 5}}
                    },
                }
            },
        )
        total = int(rate * (window_s + 6)) + 20  # more than the window can deliver
        subs = [Submitter(n.smtp_port) for n in nodes]
        try:
            for i in range(total):
                subs[i % 3].send("a@x.org", ["b@rl.test"], MSG)
        finally:
            for s in subs:
                s.close()
        first = delivery_times(peer)[0] if peer.events("transaction") else time.time()
        start = first + 2.0  # past the initial burst
        wait_for(lambda: time.time() > start + window_s + 0.5, timeout=window_s + 30)
        times = [t for t in delivery_times(peer) if start <= t < start + window_s]
        per_second = collections.Counter(int(t - start) for t in times)
        print("deliveries per second:", [per_second.get(s, 0) for s in range(int(window_s))])
        expected = rate * window_s
        assert expected * 0.9 <= len(times) <= expected * 1.1, (len(times), expected)
        # every node delivered part of it: the limit is shared, not one node's
        senders = {n.pid: len(n.logs("Delivered", domain="rl.test")) for n in nodes}
        assert all(v > 0 for v in senders.values()), senders


def test_max_connections_is_never_exceeded_across_nodes(cluster: Cluster) -> None:
    """max_connections: 2 for a domain: the peer never sees 3 concurrent sessions."""
    script = PeerScript(delay_secs={"data_end": 0.3})
    with ThreadedPeer(script) as peer:
        nodes = cluster(
            3,
            {"delivery": {"domains": {"mc.test": {"mx_override": peer.address,
                                                  "max_connections": 2}}}},
        )  # fmt: skip
        n = 24
        subs = [Submitter(node.smtp_port) for node in nodes]
        try:
            for i in range(n):
                subs[i % 3].send("a@x.org", ["b@mc.test"], MSG)
        finally:
            for s in subs:
                s.close()
        peer.wait_delivered(n, timeout=60)
        assert 2 == peer.max_concurrent_sessions()
        assert all(node.logs("Delivered", domain="mc.test") for node in nodes)


def test_breaker_opened_by_one_node_stops_the_others_and_one_probe_closes_it(
    cluster: Cluster,
) -> None:
    """Node A's trip stops B and C within 1 s; one Half-Open probe in the cluster."""
    down = "421 4.3.2 down for maintenance"
    script = PeerScript(greeting=[down, down, down, "220 {host} ESMTP back"])
    with ThreadedPeer(script) as peer:
        a, b, c = cluster(
            3,
            {
                "delivery": {
                    "domains": {"br.test": {"mx_override": peer.address}},
                    "base_retry_delay_secs": 600,
                    "circuit_breaker": {"failure_threshold": 3, "failure_window_secs": 60,
                                        "timeout_secs": 4, "success_threshold": 1},
                }
            },
        )  # fmt: skip
        for _ in range(3):
            submit(a.smtp_port, "a@x.org", ["x@br.test"], MSG)
        opened = a.wait_log("Circuit breaker OPENED for br.test")
        wait_for(lambda: time.time() > log_time(opened[0]) + 1.0, what="one second")
        assert 3 == len(peer.sessions())
        late = [submit(n.smtp_port, "a@x.org", ["y@br.test"], MSG) for n in (b, c, b, c)]
        time.sleep(1.0)  # they must stay parked: nothing new reaches the peer
        assert 3 == len(peer.sessions())
        peer.wait_delivered(4, timeout=20)
        nodes = (a, b, c)
        for text in ("OPENED", "HALF-OPEN", "CLOSED"):
            lines = [x for n in nodes for x in n.logs(f"Circuit breaker {text} for br.test")]
            assert 1 == len(lines), text
        # one probe: the 4th session was the only one between HALF-OPEN and CLOSED
        half = log_time(next(x for n in nodes for x in n.logs("Circuit breaker HALF-OPEN")))
        closed = log_time(next(x for n in nodes for x in n.logs("Circuit breaker CLOSED")))
        during = [t for t, _e in peer.events("session") if half - 0.05 <= t <= closed]
        assert 1 == len(during)
        assert set(late) <= delivered_ids(peer)


def test_sigkilled_node_gives_its_leases_back_within_the_lease_time(cluster: Cluster) -> None:
    """A node holding both leases is SIGKILLed: another node gets one within lease_secs."""
    lease_s = 3.0
    script = PeerScript(delay_secs={"data_end": 30.0})
    with ThreadedPeer(script) as peer:
        a, b = cluster(
            2,
            {"delivery": {"domains": {"lk.test": {"mx_override": peer.address,
                                                  "max_connections": 2}}}},
            lease_secs=lease_s,
        )  # fmt: skip
        submit(a.smtp_port, "a@x.org", ["x@lk.test"], MSG)
        submit(a.smtp_port, "a@x.org", ["y@lk.test"], MSG)
        wait_for(lambda: len(peer.sessions()) == 2, what="A's two sessions")
        submit(b.smtp_port, "a@x.org", ["z@lk.test"], MSG)
        time.sleep(1.0)
        assert 2 == len(peer.sessions())  # B waits: A holds both leases
        a.kill()
        killed = time.monotonic()
        wait_for(lambda: len(peer.sessions()) == 3, timeout=lease_s + 1.0, what="B's session")
        print(f"B connected {time.monotonic() - killed:.2f} s after the kill")


def test_a_sigkilled_nodes_half_open_probe_stalls_the_domain_for_about_a_lease(
    cluster: Cluster,
) -> None:
    """Issue 14 #5: node A trips br.test, claims the Half-Open probe and is SIGKILLed while
    the probe hangs; node B probes (and delivers) about one lease later, not after
    probe_timeout_s (15 minutes)."""
    lease_s = 3.0
    breaker = {"failure_threshold": 1, "failure_window_secs": 60, "timeout_secs": 2,
               "success_threshold": 1}  # fmt: skip
    hangs = PeerScript(greeting=["421 4.3.2 down", "220 {host} ESMTP"],
                       delay_secs={"data_end": 60.0})  # fmt: skip
    with ThreadedPeer(hangs) as peer_a, ThreadedPeer() as peer_b:
        (a,) = cluster(
            1,
            {"delivery": {"domains": {"br.test": {"mx_override": peer_a.address}},
                          "base_retry_delay_secs": 2.5, "circuit_breaker": breaker}},
            lease_secs=lease_s,
        )  # fmt: skip
        (b,) = cluster(
            1,
            {"delivery": {"domains": {"br.test": {"mx_override": peer_b.address}},
                          "base_retry_delay_secs": 2.5, "circuit_breaker": breaker}},
            lease_secs=lease_s,
        )  # fmt: skip
        submit(a.smtp_port, "a@x.org", ["x@br.test"], MSG)
        a.wait_log("Circuit breaker OPENED for br.test")
        a.wait_log("Circuit breaker HALF-OPEN for br.test", timeout=10)
        wait_for(lambda: len(peer_a.sessions()) == 2, what="A's probe session")
        wait_for(lambda: "DATA" in peer_a.sessions()[-1].commands, what="A's probe hangs")
        a.kill()
        killed = time.monotonic()
        late = submit(b.smtp_port, "a@x.org", ["y@br.test"], MSG)
        wait_for(lambda: late in delivered_ids(peer_b), timeout=lease_s + 4.0,
                 what="B's probe delivered")  # fmt: skip
        print(f"B delivered {time.monotonic() - killed:.2f} s after the kill")
        b.wait_log("Circuit breaker CLOSED for br.test")


def test_redis_killed_and_restarted_loses_no_mail(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    """Redis SIGKILLed mid-run: nodes fall back, come back, and every 250'd message arrives."""
    with ThreadedPeer() as peer:
        nodes = cluster(
            3,
            {
                "delivery": {
                    "domains": {"fb.test": {"mx_override": peer.address, "max_connections": 4}},
                    "rate_limit": {"domain_limits": {"fb.test": {"messages_per_second": 40.0}}},
                }
            },
        )
        for n in nodes:
            assert 0.0 == metric(n, "empath_cluster_fallback")
        accepted: list[str] = []
        stop = threading.Event()

        def load() -> None:
            i = 0
            while not stop.is_set():
                accepted.append(submit(nodes[i % 3].smtp_port, "a@x.org", ["r@fb.test"], MSG))
                i += 1
                time.sleep(0.02)

        feeder = threading.Thread(target=load)
        feeder.start()
        try:
            wait_for(lambda: len(accepted) > 20, what="load before the kill")
            redis_server.kill()
            for n in nodes:
                n.wait_log("Cluster: Redis unreachable")
                assert 1.0 == metric(n, "empath_cluster_fallback")
                assert 0.0 == metric(n, "empath_cluster_redis_up")
            wait_for(lambda: len(accepted) > 60, timeout=30, what="load during the fallback")
            redis_server.start()
            for n in nodes:
                n.wait_log("Cluster: Redis reachable again")
            wait_for(lambda: len(accepted) > 90, timeout=30, what="load after the fallback")
        finally:
            stop.set()
            feeder.join(30)
        want = set(accepted)
        wait_for(
            lambda: want <= delivered_ids(peer), timeout=60, what="every accepted message delivered"
        )
        for n in nodes:
            assert 1 == len(n.logs("Cluster: Redis unreachable"))
            assert 1 == len(n.logs("Cluster: Redis reachable again"))
            assert 0.0 == metric(n, "empath_cluster_fallback")
            assert 1.0 == metric(n, "empath_cluster_redis_up")
            assert 1.0 == metric(n, "empath_cluster_fallback_entries_total")


def test_cluster_status_lists_every_node_with_its_queue_and_heartbeat(cluster: Cluster) -> None:
    """`empathctl cluster status` (plain and --json), `system status` and /metrics."""
    nodes = cluster(2, parked_overrides("park.test"))
    ids = [submit(nodes[0].smtp_port, "a@x.org", ["p@park.test"], MSG) for _ in range(2)]

    def queued_on_node0() -> dict[str, int]:
        data = json.loads(ctl(nodes[1], "--json", "cluster", "status").stdout)
        node0 = next(n for n in data["nodes"] if n["node_id"] == "node0")
        return dict(node0["queue"]) if sum(node0["queue"].values()) >= len(ids) else {}

    queue = wait_for(queued_on_node0, timeout=15, what="node0's queue in its heartbeat")
    assert len(ids) == queue["pending"] + queue["retry"] + queue["in_progress"]
    data = json.loads(ctl(nodes[1], "--json", "cluster", "status").stdout)
    assert ["node0", "node1"] == sorted(n["node_id"] for n in data["nodes"])
    assert all(n["alive"] and n["heartbeat_age_s"] < 5 for n in data["nodes"])
    assert (False, True, 2) == (data["fallback"], data["redis_up"], data["node_count"])
    plain = ctl(nodes[0], "cluster", "status")
    assert 0 == plain.returncode, plain.stderr
    lines = [x for x in plain.stdout.splitlines() if x.startswith("node: ")]
    assert 2 == len(lines)
    assert all(", alive, heartbeat: " in x for x in lines)
    status = ctl(nodes[0], "system", "status").stdout
    assert "Cluster: node node0, 2 live node(s), Redis up" in status
    assert 2 == sum(1 for x in status.splitlines() if x.startswith("  node: "))
    sys_json = json.loads(ctl(nodes[0], "--json", "system", "status").stdout)
    assert ["node0", "node1"] == sorted(n["node_id"] for n in sys_json["cluster"]["nodes"])
    assert 2.0 == metric(nodes[0], "empath_cluster_nodes")
    assert 1.0 == metric(nodes[0], "empath_cluster_redis_up")
    assert metric(nodes[0], "empath_cluster_redis_roundtrip_seconds_count") > 0


def test_cluster_status_without_cluster_mode_says_so(tmp_path: Path) -> None:
    """`empathctl cluster status` on a node without `cluster`: "off", exit 0; metrics
    say a cluster of one, never in fallback."""
    with Daemon(tmp_path / "solo") as d:
        r = ctl(d, "cluster", "status")
        assert (0, "") == (r.returncode, r.stderr)
        assert "cluster mode is off" in r.stdout
        assert {"enabled": False} == json.loads(ctl(d, "cluster", "status", "--json").stdout)
        assert 0.0 == metric(d, "empath_cluster_fallback")
        assert 1.0 == metric(d, "empath_cluster_nodes")


def metric(node: Daemon, name: str) -> float:
    """The value of an unlabelled sample in the node's /metrics."""
    for line in node.http_get("/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_two_nodes_share_one_port_with_reuse_port(tmp_path: Path) -> None:
    """reuse_port: two nodes listen on the same port and both accept connections."""
    port = free_port()
    closed = free_port()
    nodes = []
    try:
        for i in range(2):
            d = Daemon(
                tmp_path / f"n{i}",
                {"delivery": {"domains": {"rp.test": {"mx_override": f"127.0.0.1:{closed}"}},
                              "base_retry_delay_secs": 600}},
                listener={"reuse_port": True},
            )  # fmt: skip
            d.smtp_port = port
            d.config["smtp_controller"]["listeners"][0]["socket"] = f"127.0.0.1:{port}"
            nodes.append(d)
            d.start()
        for _ in range(40):
            submit(port, "a@x.org", ["x@rp.test"], MSG)
        wait_for(lambda: sum(len(d.logs("Message received")) for d in nodes) == 40)
        received = [len(d.logs("Message received")) for d in nodes]
        assert all(r > 0 for r in received), received
    finally:
        for d in nodes:
            d.stop()
