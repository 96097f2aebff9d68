"""AUTH failures counted across a cluster (DESIGN §11, §13): two nodes on one real
redis-server; an address guessing on both is blocked by their sum, and every node
refuses it; with Redis gone the nodes go on counting locally.  The hourly message
quota is shared too (one message late per node)."""

from __future__ import annotations

import asyncio
import json
import smtplib
from dataclasses import replace
from pathlib import Path

from empath.submission.users import UserEntry
from tests.ctl import ctl
from tests.redis_server import RedisServer
from tests.submission import ALICE, PASSWORD, Submission, make_submission, plain_b64

LIMITS = {"max_failures_per_ip": 4, "delay_secs": 0, "max_failures_per_login": 100}


async def auth(sub: Submission, source: str, password: str) -> str:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", sub.implicit_port, ssl=sub.client_context(), local_addr=(source, 0),
        server_hostname="localhost",
    )  # fmt: skip
    try:
        await reader.readline()
        writer.write(b"EHLO node.test\r\n")
        while (await reader.readline())[3:4] != b" ":
            pass
        writer.write(f"AUTH PLAIN {plain_b64('alice', password)}\r\n".encode())
        return (await reader.readline()).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


def node(
    tmp_path: Path, name: str, redis: RedisServer, users: dict[str, UserEntry] | None = None
) -> Submission:
    sub = make_submission(tmp_path / name, auth={"limits": LIMITS}, users=users)
    # a generous Redis timeout: on a loaded test machine the default 250 ms would turn
    # this test of sharing into one of the local fallback
    sub.daemon.config["cluster"] = {"redis_url": redis.url, "node_id": name,
                                    "key_prefix": "authtest:", "timeout_ms": 3000}  # fmt: skip
    return sub


def test_failures_on_two_nodes_add_up_and_block_everywhere(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Two failures on each node from one address: the fourth, cluster-wide, blocks it;
    both nodes then answer 454 (neither saw four itself); another address is not
    touched; `user list` shows the block on either node and `user unblock` on one lifts
    it on both; after Redis stops, failures are still answered (local counts)."""
    a, b = node(tmp_path, "n1", redis_server), node(tmp_path, "n2", redis_server)
    a.daemon.start()
    b.daemon.start()
    try:
        replies = [asyncio.run(auth(s, "127.0.0.7", "wrong")) for s in (a, a, b, b)]
        assert ["535"] * 4 == [r[:3] for r in replies]
        b.daemon.wait_log("Address blocked after failed authentications", ip="127.0.0.7")
        assert asyncio.run(auth(a, "127.0.0.7", PASSWORD)).startswith("454 4.7.0")
        assert asyncio.run(auth(b, "127.0.0.7", PASSWORD)).startswith("454 4.7.0")
        assert asyncio.run(auth(a, "127.0.0.8", PASSWORD)).startswith("235")
        listed = json.loads(ctl(b.daemon, "user", "list", "--json").stdout)
        assert ["127.0.0.7"] == list(listed["blocked_ips"])
        # lifted on one node, lifted everywhere (node 2 had blocked it itself)
        assert 0 == ctl(a.daemon, "user", "unblock", "127.0.0.7").returncode
        assert asyncio.run(auth(b, "127.0.0.7", PASSWORD)).startswith("235")
        redis_server.stop()
        assert asyncio.run(auth(a, "127.0.0.9", "wrong")).startswith("535")
        a.daemon.wait_log("AUTH limits: Redis unreachable")
    finally:
        a.daemon.stop()
        b.daemon.stop()


def send(sub: Submission) -> int:
    """One message as alice over implicit TLS; the MAIL reply code."""
    with smtplib.SMTP_SSL("127.0.0.1", sub.implicit_port, timeout=30,
                          context=sub.client_context()) as c:  # fmt: skip
        c.login("alice", PASSWORD)
        code, _ = c.mail("alice@example.org")
        if code == 250:
            c.rcpt("bob@parked.test")
            c.data(b"Subject: quota\r\n\r\nx\r\n")
        return int(code)


def test_hourly_quota_is_shared_by_the_nodes(tmp_path: Path, redis_server: RedisServer) -> None:
    """messages_per_hour 4: two sent through node 2, then node 1 takes two more and
    refuses the third (451 4.7.1) - alone it would have taken four."""
    users = {"alice": replace(ALICE, messages_per_hour=4)}
    a = node(tmp_path, "n1", redis_server, users)
    b = node(tmp_path, "n2", redis_server, users)
    a.daemon.start()
    b.daemon.start()
    try:
        assert [250, 250] == [send(b), send(b)]
        assert [250, 250, 451] == [send(a), send(a), send(a)]
        a.daemon.wait_log("Message quota exceeded", user="alice")
    finally:
        a.daemon.stop()
        b.daemon.stop()
