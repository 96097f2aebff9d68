"""Outbound delivery against the scripted SMTP peer over loopback.

Per-recipient mixed replies, failover between targets/addresses, connection reuse
and its limits, idle QUIT, per-phase timeouts, and the peer as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from empath.delivery.attempt import AttemptSettings, Target, attempt_delivery
from empath.delivery.classify import AttemptResult
from empath.errors import PermanentDeliveryError, TemporaryDeliveryError
from empath.spool.model import Envelope
from empath.testing.clock import FakeClock
from empath.testing.scripted_peer import ScriptedPeer, read_records
from empath.testing.settings import attempt_settings, connection_pool
from empath.transport.pool import ConnectionPool
from tests.helpers import free_port, stop_pid

T = TypeVar("T")
BODY = b"From: s@a.test\r\nSubject: hello\r\n\r\n.a line with a leading dot\r\nbye\r\n"
SETTINGS = attempt_settings()


def envelope(*rcpts: str, sender: str = "s@a.test") -> Envelope:
    return Envelope(sender, tuple(rcpts), 0.0, size=len(BODY))


async def deliver(
    pool: ConnectionPool,
    targets: list[Target],
    *rcpts: str,
    settings: AttemptSettings = SETTINGS,
) -> AttemptResult:
    return await attempt_delivery(
        targets, envelope(*rcpts), rcpts, BODY, settings=settings, pool=pool
    )


def by_address(result: AttemptResult) -> dict[str, tuple[str, int | None, str]]:
    return {o.address: (o.kind.value, o.code, o.enhanced) for o in result.outcomes}


async def test_mixed_per_recipient_replies_give_per_recipient_outcomes() -> None:
    script = {
        "rcpt": {"bad@x.test": "550 5.1.1 No such user", "later@x.test": "451 4.3.0 Try later"}
    }

    async def scenario() -> None:
        async with ScriptedPeer(script) as peer:
            pool = connection_pool()
            result = await deliver(
                pool,
                [Target("mx1.test", peer.port, ("127.0.0.1",))],
                "ok@x.test",
                "bad@x.test",
                "later@x.test",
            )
            await pool.close_all()
            assert {
                "ok@x.test": ("delivered", 250, "2.0.0"),
                "bad@x.test": ("permanent", 550, "5.1.1"),
                "later@x.test": ("temporary", 451, "4.3.0"),
            } == by_address(result)
            assert result.error is None
            assert "mx1.test" == result.mx
            assert 1 == len(peer.transactions)
            txn = peer.transactions[0]
            assert ["ok@x.test"] == txn.recipients
            assert ["bad@x.test", "later@x.test"] == txn.rejected
            assert BODY == txn.body  # dot-stuffed on the wire, unstuffed by the peer
            assert "SIZE=" in txn.mail_params
            assert "relay.test" == peer.sessions[0].helo

    await scenario()


async def test_all_recipients_rejected_sends_no_data_and_reports_unit_error() -> None:
    script = {"rcpt_default": "550 5.1.1 No such user"}

    async def scenario() -> None:
        async with ScriptedPeer(script) as peer:
            pool = connection_pool()
            target = [Target("mx1.test", peer.port, ("127.0.0.1",))]
            result = await deliver(pool, target, "a@x.test", "b@x.test")
            assert isinstance(result.error, PermanentDeliveryError)
            assert ("a@x.test", "b@x.test") == result.permanent
            assert [] == peer.transactions
            # The connection is reused for the next message, which starts with RSET.
            peer.script.rcpt_default = "250 2.1.5 Ok"
            result2 = await deliver(pool, target, "c@x.test")
            await pool.close_all()
            assert ("c@x.test",) == result2.delivered
            assert 1 == peer.session_count
            commands = peer.sessions[0].commands
            assert "RSET" == commands[commands.index("DATA") + 1]

    await scenario()


async def test_failover_to_second_target_when_first_refuses_connections() -> None:
    async def scenario() -> None:
        async with ScriptedPeer() as peer:
            pool = connection_pool()
            dead = Target("mx1.test", free_port(), ("127.0.0.1",))
            live = Target("mx2.test", peer.port, ("127.0.0.1",))
            result = await deliver(pool, [dead, live], "a@x.test")
            await pool.close_all()
            assert ("a@x.test",) == result.delivered
            assert "mx2.test" == result.mx
            assert 1 == len(result.failures)
            assert "Connection refused" in result.failures[0].error.text
            assert 1 == len(peer.transactions)

    await scenario()


async def test_every_address_of_a_target_is_tried_in_order() -> None:
    async def scenario() -> None:
        async with ScriptedPeer() as peer:  # listens on 127.0.0.1 only
            pool = connection_pool()
            target = Target("mx1.test", peer.port, ("127.0.0.2", "127.0.0.1"))
            result = await deliver(pool, [target], "a@x.test")
            await pool.close_all()
            assert ("a@x.test",) == result.delivered
            assert "127.0.0.1" == result.address
            assert [f"mx1.test[127.0.0.2]:{peer.port}"] == [f.mx for f in result.failures]

    await scenario()


async def test_failover_to_second_target_when_first_greets_421() -> None:
    async def scenario() -> None:
        async with (
            ScriptedPeer({"greeting": "421 4.3.2 Service not available"}) as busy,
            ScriptedPeer() as good,
        ):
            pool = connection_pool()
            result = await deliver(
                pool,
                [
                    Target("mx1.test", busy.port, ("127.0.0.1",)),
                    Target("mx2.test", good.port, ("127.0.0.1",)),
                ],
                "a@x.test",
            )
            await pool.close_all()
            assert ("a@x.test",) == result.delivered
            assert "mx2.test" == result.mx
            assert 1 == busy.session_count
            assert [] == busy.transactions
            assert 421 == result.failures[0].error.code

    await scenario()


async def test_5xx_greeting_moves_on_and_is_permanent_only_when_every_host_refuses() -> None:
    """Decision: a 5xx greeting skips to the next MX (as Postfix does)."""

    async def scenario() -> None:
        refuse = {"greeting": "554 5.7.1 No SMTP service here"}
        async with ScriptedPeer(refuse) as a, ScriptedPeer(refuse) as b:
            pool = connection_pool()
            targets = [
                Target("mx1.test", a.port, ("127.0.0.1",)),
                Target("mx2.test", b.port, ("127.0.0.1",)),
            ]
            all_5xx = await deliver(pool, targets, "a@x.test")
            mixed = await deliver(
                pool, [*targets, Target("mx3.test", free_port(), ("127.0.0.1",))], "a@x.test"
            )
            await pool.close_all()
            assert isinstance(all_5xx.error, PermanentDeliveryError)
            assert ("permanent", 554, "5.7.1") == by_address(all_5xx)["a@x.test"]
            assert 2 == len(all_5xx.failures)
            assert isinstance(mixed.error, TemporaryDeliveryError)
            assert ("a@x.test",) == mixed.temporary
            assert a.sessions[0].quit  # a refused client still says QUIT

    await scenario()


async def test_connection_is_reused_for_following_messages() -> None:
    async def scenario() -> None:
        async with ScriptedPeer() as peer:
            pool = connection_pool()
            target = [Target("mx1.test", peer.port, ("127.0.0.1",))]
            results = [await deliver(pool, target, f"r{i}@x.test") for i in range(25)]
            await pool.close_all()
            assert all(r.delivered for r in results)
            assert 25 == len(peer.transactions)
            assert 1 == peer.session_count
            assert (1, 24) == (pool.stats.opened, pool.stats.reused)
            assert [False] + [True] * 24 == [r.reused for r in results]
            assert peer.sessions[0].quit
            assert "RSET" not in peer.sessions[0].commands  # only after failures

    await scenario()


async def test_pool_cap_limits_concurrent_connections_per_key() -> None:
    async def scenario() -> None:
        async with ScriptedPeer({"delay_secs": {"data_end": 0.05}}) as peer:
            pool = connection_pool(max_per_key=2)
            target = [Target("mx1.test", peer.port, ("127.0.0.1",))]
            results = await asyncio.gather(
                *(deliver(pool, target, f"r{i}@x.test") for i in range(8))
            )
            await pool.close_all()
            assert all(r.delivered for r in results)
            assert 8 == len(peer.transactions)
            assert 2 == peer.max_concurrent_sessions
            assert 2 == pool.stats.opened

    await scenario()


async def test_idle_connection_is_closed_with_quit_after_idle_timeout() -> None:
    """The idle timer runs in virtual time: not a moment early, then QUIT."""

    async def scenario() -> None:
        async with ScriptedPeer() as peer:
            clock = FakeClock()
            pool = connection_pool(idle_timeout_s=10.0, clock=clock)
            await deliver(pool, [Target("mx1.test", peer.port, ("127.0.0.1",))], "a@x.test")
            assert 1 == pool.idle_count()
            await clock.run_for(9.9)
            assert 1 == pool.idle_count()
            assert not peer.sessions[0].ended
            await clock.run_for(0.1)
            assert 0 == pool.idle_count()
            async with asyncio.timeout(5):
                while not peer.sessions[0].ended:
                    await asyncio.sleep(0.02)
            assert peer.sessions[0].quit
            assert "QUIT" == peer.sessions[0].commands[-1]
            assert 1 == pool.stats.closed_idle
            assert 0 == pool.idle_count()
            await pool.close_all()

    await scenario()


async def test_dead_pooled_connection_is_replaced_by_a_fresh_one() -> None:
    async def scenario() -> None:
        port = free_port()
        pool = connection_pool()
        target = [Target("mx1.test", port, ("127.0.0.1",))]
        async with ScriptedPeer(port=port) as first:
            assert (await deliver(pool, target, "a@x.test")).delivered
        assert 1 == len(first.transactions)
        async with ScriptedPeer(port=port) as second:  # the old session was cut
            result = await deliver(pool, target, "b@x.test")
            await pool.close_all()
        assert ("b@x.test",) == result.delivered
        assert 1 == len(second.transactions)
        assert 2 == pool.stats.opened

    await scenario()


async def advance_when(clock: FakeClock, ready: Callable[[], bool], seconds: float) -> None:
    """Once ``ready()`` holds and a deadline timer is armed, move ``clock`` on once."""
    for _ in range(1000):
        if ready() and clock.pending():
            await clock.run_for(seconds)
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the attempt never reached the awaited phase")


async def test_phase_timeout_defers_with_the_phase_named() -> None:
    """The MAIL reply never comes (in virtual time: the deadlines run on a FakeClock)."""

    async def scenario() -> None:
        clock = FakeClock()
        async with ScriptedPeer({"delay_secs": {"mail": 3600.0}}) as peer:
            pool = connection_pool(clock=clock)
            task = asyncio.create_task(
                deliver(pool, [Target("mx1.test", peer.port, ("127.0.0.1",))], "a@x.test")
            )

            def mail_sent() -> bool:
                return any(c.startswith("MAIL") for s in peer.sessions for c in s.commands)

            await advance_when(clock, mail_sent, SETTINGS.timeouts.mail_from_secs + 1)
            result = await task
            await pool.close_all()
            (outcome,) = result.outcomes
            assert ("temporary", None) == (outcome.kind.value, outcome.code)
            assert "timed out while sending MAIL FROM" in outcome.text
            assert isinstance(result.error, TemporaryDeliveryError)
            assert 0 == pool.open_count()

    await scenario()


async def test_greeting_timeout_moves_to_next_target() -> None:
    """The first MX never greets (virtual time); the second one takes the message."""

    async def scenario() -> None:
        async with (
            ScriptedPeer({"delay_secs": {"connect": 3600.0}}) as slow,
            ScriptedPeer() as good,
        ):
            clock = FakeClock()
            pool = connection_pool(clock=clock)
            targets = [
                Target("mx1.test", slow.port, ("127.0.0.1",)),
                Target("mx2.test", good.port, ("127.0.0.1",)),
            ]
            task = asyncio.create_task(deliver(pool, targets, "a@x.test"))
            await advance_when(
                clock, lambda: slow.session_count == 1, SETTINGS.timeouts.ehlo_secs + 1
            )
            result = await task
            await pool.close_all()
            assert "mx2.test" == result.mx
            assert "timed out while receiving the initial server greeting" in (
                result.failures[0].error.text
            )

    await scenario()


async def test_body_from_an_async_chunk_iterator_is_sent_byte_exact() -> None:
    body = b"".join(b".line %d with some text\r\n" % i for i in range(5000))

    def chunks() -> Any:
        async def gen() -> Any:
            for i in range(0, len(body), 4093):  # odd size: splits CRLFs and dots
                yield body[i : i + 4093]

        return gen()

    async def scenario() -> None:
        async with ScriptedPeer() as peer:
            pool = connection_pool()
            env = Envelope("s@a.test", ("a@x.test",), 0.0, size=len(body))
            result = await attempt_delivery(
                [Target("mx1.test", peer.port, ("127.0.0.1",))],
                env,
                ("a@x.test",),
                chunks,
                settings=SETTINGS,
                pool=pool,
            )
            await pool.close_all()
            assert ("a@x.test",) == result.delivered
            assert body == peer.transactions[0].body

    await scenario()


def test_scripted_peer_runs_as_a_subprocess_and_records_to_a_file(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"rcpt": {"bad@x.test": "550 5.1.1 No such user"}}))
    record = tmp_path / "record.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "empath.testing.scripted_peer",
            "--port",
            "0",
            "--script",
            str(script),
            "--record",
            str(record),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("LISTENING ")
        port = int(line.split()[1])

        async def scenario() -> AttemptResult:
            pool = connection_pool()
            result = await deliver(
                pool, [Target("mx1.test", port, ("127.0.0.1",))], "ok@x.test", "bad@x.test"
            )
            await pool.close_all()
            return result

        result = asyncio.run(scenario())
    finally:
        stop_pid(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    assert ("ok@x.test",) == result.delivered
    assert ("bad@x.test",) == result.permanent
    events = read_records(record)
    txns = [e for e in events if e["event"] == "transaction"]
    assert 1 == len(txns)
    assert ["ok@x.test"] == txns[0]["recipients"]
    assert BODY.decode() == txns[0]["body"]
    assert ["session", "transaction", "session_end"] == [e["event"] for e in events]


async def test_scripted_reply_lists_are_used_in_order_then_the_last_repeats() -> None:
    script = {
        "data_end": ["451 4.3.0 Try again", "250 2.0.0 Ok"],
        "rcpt": {"slow@x.test": ["450 4.2.1 busy", "250 2.1.5 Ok"]},
    }

    async def scenario() -> None:
        async with ScriptedPeer(script) as peer:
            pool = connection_pool()
            target = [Target("mx1.test", peer.port, ("127.0.0.1",))]
            first = await deliver(pool, target, "a@x.test", "slow@x.test")
            second = await deliver(pool, target, "a@x.test", "slow@x.test")
            third = await deliver(pool, target, "a@x.test")
            await pool.close_all()
            assert {
                "a@x.test": ("temporary", 451, "4.3.0"),
                "slow@x.test": ("temporary", 450, "4.2.1"),
            } == by_address(first)
            assert ("a@x.test", "slow@x.test") == second.delivered
            assert ("a@x.test",) == third.delivered
            assert 3 == len(peer.transactions)
            assert 2 == len(peer.delivered)

    await scenario()
