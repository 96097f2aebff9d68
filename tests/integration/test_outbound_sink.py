"""Outbound delivery to Postfix's smtp-sink: byte-exact bodies, reuse, soft/hard rejects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from empath.delivery.attempt import Target, attempt_delivery
from empath.delivery.classify import AttemptResult
from empath.errors import PermanentDeliveryError, TemporaryDeliveryError
from empath.spool.model import Envelope
from empath.testing.settings import attempt_settings, connection_pool
from empath.transport.outbound import BodySource
from empath.transport.pool import ConnectionPool
from tests.helpers import free_port
from tests.sink import SmtpSink

T = TypeVar("T")
SETTINGS = attempt_settings()


async def send(
    pool: ConnectionPool,
    targets: list[Target],
    sender: str,
    rcpts: tuple[str, ...],
    body: BodySource,
    size: int,
) -> AttemptResult:
    env = Envelope(sender, rcpts, 0.0, size=size)
    return await attempt_delivery(targets, env, rcpts, body, settings=SETTINGS, pool=pool)


def chunked(body: bytes, size: int) -> Callable[[], AsyncIterator[bytes]]:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(body), size):
            yield body[i : i + size]

    return gen


BODIES = [
    b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: plain\r\n\r\nHello.\r\n",
    b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nmiddle . dot\r\n. \r\n",
    b"Subject: no final newline\r\n\r\nlast line without CRLF",
    "Subject: 8bit\r\n\r\nGrüße aus Köln — ünïcödé\r\n".encode(),
    b"Subject: big\r\n\r\n"
    + b"".join(b"%06d .........................\r\n" % i for i in range(4000)),
]


async def test_bodies_arrive_byte_exact_with_all_recipients() -> None:
    with SmtpSink(dump=True) as sink:
        target = [Target("sink.test", sink.port, ("127.0.0.1",))]
        rcpts = ("one@dst.test", "two@dst.test", "three@dst.test")

        async def scenario() -> list[AttemptResult]:
            pool = connection_pool()
            results = []
            for i, body in enumerate(BODIES):
                source: BodySource = body if i % 2 else chunked(body, 1021)
                results.append(await send(pool, target, "a@src.test", rcpts, source, len(body)))
            await pool.close_all()
            return results

        results = await scenario()
        assert all(rcpts == r.delivered for r in results)
        sink.wait_messages(len(BODIES))
        got = sink.messages()
        expected = [b if b.endswith(b"\r\n") else b + b"\r\n" for b in BODIES]
        assert sorted(expected) == sorted(m.body for m in got)
        for m in got:
            assert "a@src.test" == m.sender
            assert rcpts == m.recipients
            assert "relay.test" == m.helo


async def test_connection_reuse_sessions_far_fewer_than_messages() -> None:
    with SmtpSink() as sink:
        target = [Target("sink.test", sink.port, ("127.0.0.1",))]
        body = b"Subject: reuse\r\n\r\nx\r\n"

        async def scenario() -> ConnectionPool:
            pool = connection_pool(max_per_key=4)
            sem = asyncio.Semaphore(4)

            async def one(i: int) -> AttemptResult:
                async with sem:
                    return await send(pool, target, "a@src.test", (f"r{i}@d.test",), body, 20)

            results = await asyncio.gather(*(one(i) for i in range(200)))
            assert all(r.delivered for r in results)
            await pool.close_all()
            return pool

        pool = await scenario()
        assert 200 == sink.wait_messages(200).messages
        counters = sink.wait_sessions(pool.stats.opened)
        assert counters.sessions <= 4
        assert pool.stats.opened == counters.sessions
        assert 200 - pool.stats.opened == pool.stats.reused
        assert counters.sessions == counters.quits  # closed politely with QUIT


async def test_soft_rejected_recipients_are_temporary() -> None:
    with SmtpSink(soft_reject=("RCPT",)) as sink:

        async def scenario() -> AttemptResult:
            pool = connection_pool()
            result = await send(
                pool,
                [Target("sink.test", sink.port, ("127.0.0.1",))],
                "a@src.test",
                ("x@d.test", "y@d.test"),
                b"x\r\n",
                3,
            )
            await pool.close_all()
            return result

        result = await scenario()
        assert ("x@d.test", "y@d.test") == result.temporary
        assert {450} == {o.code for o in result.outcomes}
        assert isinstance(result.error, TemporaryDeliveryError)
        assert 0 == sink.message_count()


async def test_hard_rejected_mail_is_permanent_for_every_recipient() -> None:
    with SmtpSink(hard_reject=("MAIL",)) as sink:

        async def scenario() -> AttemptResult:
            pool = connection_pool()
            result = await send(
                pool,
                [Target("sink.test", sink.port, ("127.0.0.1",))],
                "a@src.test",
                ("x@d.test", "y@d.test"),
                b"x\r\n",
                3,
            )
            await pool.close_all()
            return result

        result = await scenario()
        assert ("x@d.test", "y@d.test") == result.permanent
        assert isinstance(result.error, PermanentDeliveryError)
        assert "5.3.0" == result.outcomes[0].enhanced


async def test_disconnect_after_data_leaves_recipients_temporary() -> None:
    """At-least-once: a lost end-of-data reply is retried, never assumed delivered."""
    with SmtpSink(disconnect=(".",)) as sink:

        async def scenario() -> AttemptResult:
            pool = connection_pool()
            result = await send(
                pool,
                [Target("sink.test", sink.port, ("127.0.0.1",))],
                "a@src.test",
                ("x@d.test",),
                b"x\r\n",
                3,
            )
            await pool.close_all()
            return result

        result = await scenario()
        assert ("x@d.test",) == result.temporary
        assert None is result.outcomes[0].code
        assert "lost connection" in result.outcomes[0].text


async def test_failover_from_refusing_target_to_sink() -> None:
    with SmtpSink(dump=True) as sink:

        async def scenario() -> AttemptResult:
            pool = connection_pool()
            result = await send(
                pool,
                [
                    Target("mx1.test", free_port(), ("127.0.0.1",)),
                    Target("sink.test", sink.port, ("127.0.0.1",)),
                ],
                "a@src.test",
                ("x@d.test",),
                b"Subject: f\r\n\r\nfailover\r\n",
                25,
            )
            await pool.close_all()
            return result

        result = await scenario()
        assert "sink.test" == result.mx
        sink.wait_messages(1)
        assert [b"Subject: f\r\n\r\nfailover\r\n"] == [m.body for m in sink.messages()]
