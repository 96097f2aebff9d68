"""Outbound timeouts are deadlines (issue 7, defect 5): a reply that drips in one byte
at a time still has to be complete within its phase's timeout, and a whole attempt has
a cap however promptly each single reply comes."""

from __future__ import annotations

import asyncio

from empath.delivery.attempt import Target, attempt_delivery
from empath.spool.model import Envelope
from empath.testing.scripted_peer import ScriptedPeer
from empath.testing.settings import attempt_settings, connection_pool, outbound_timeouts
from empath.transport.outbound import attempt_cap_s

BODY = b"Subject: drip\r\n\r\nhello\r\n"


async def drip(writer: asyncio.StreamWriter, text: bytes, interval_s: float) -> None:
    for i in range(len(text)):
        writer.write(text[i : i + 1])
        await writer.drain()
        await asyncio.sleep(interval_s)


async def dripping_peer(drip_on: bytes, interval_s: float, total_s: list[float]) -> asyncio.Server:
    """An SMTP peer that answers every command at once, except the one starting with
    `drip_on`, whose reply comes one byte per `interval_s`; records how long it talked."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            writer.write(b"220 drip.test ESMTP\r\n")
            while line := await reader.readline():
                word = line[:4].upper()
                if word == drip_on:
                    await drip(writer, b"250-drip.test\r\n250 PIPELINING\r\n", interval_s)
                elif word == b"DATA":
                    writer.write(b"354 go\r\n")
                    while (await reader.readline()) != b".\r\n":
                        pass
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif word == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250-drip.test\r\n250 PIPELINING\r\n" if word == b"EHLO"
                                 else b"250 2.0.0 Ok\r\n")  # fmt: skip
        except (ConnectionError, OSError):
            pass
        finally:
            total_s.append(loop.time() - t0)
            writer.close()

    return await asyncio.start_server(session, "127.0.0.1", 0)


def test_a_dripped_reply_times_out_at_its_phase_deadline() -> None:
    """An MX that sends its EHLO reply one byte every 0.1 s (3 s in all) with
    ehlo_secs=0.8: the attempt is deferred 'timed out while receiving the EHLO reply'
    and the connection is dropped within the deadline's order of magnitude, not after
    the whole drip (the old timer was re-armed by every byte)."""

    async def scenario() -> None:
        talked: list[float] = []
        server = await dripping_peer(b"EHLO", 0.1, talked)
        port = server.sockets[0].getsockname()[1]
        pool = connection_pool()
        settings = attempt_settings(timeouts=outbound_timeouts(ehlo_secs=0.8))
        try:
            result = await attempt_delivery(
                [Target("mx.test", port, ("127.0.0.1",))],
                Envelope("s@a.test", ("r@x.test",), 0.0, size=len(BODY)),
                ("r@x.test",), BODY, settings=settings, pool=pool,
            )  # fmt: skip
            await pool.close_all()
            assert () == result.delivered
            (failure,) = result.failures
            assert "timed out while receiving the EHLO reply" in failure.error.text
            async with asyncio.timeout(10):
                while not talked:
                    await asyncio.sleep(0.02)
            print(f"dripping MX held the connection {talked[0]:.2f} s (ehlo_secs 0.8, drip 3 s)")
            assert talked[0] < 2.5  # generous; the old code waited for the whole drip
        finally:
            server.close()

    asyncio.run(scenario())


def test_the_attempt_cap_ends_a_transaction_of_prompt_but_slow_replies() -> None:
    """Each RCPT reply comes 0.4 s after its command (inside rcpt_to_secs=2), but five
    of them exceed attempt_secs=1.2: the attempt is deferred, naming the limit."""

    async def scenario() -> None:
        rcpts = tuple(f"r{i}@x.test" for i in range(5))
        async with ScriptedPeer({"delay_secs": {"rcpt": 0.4}}) as peer:
            pool = connection_pool()
            timeouts = outbound_timeouts(rcpt_to_secs=2.0, attempt_secs=1.2)
            result = await attempt_delivery(
                [Target("mx.test", peer.port, ("127.0.0.1",))],
                Envelope("s@a.test", rcpts, 0.0, size=len(BODY)),
                rcpts, BODY, settings=attempt_settings(timeouts=timeouts),
                pool=pool,
            )  # fmt: skip
            await pool.close_all()
        assert () == result.delivered
        texts = {o.text for o in result.outcomes}
        assert any("attempt time limit of 1.2s exceeded" in t for t in texts), texts
        assert [] == peer.delivered

    asyncio.run(scenario())


def test_default_attempt_cap_is_the_sum_of_the_phases() -> None:
    """Without attempt_secs the cap is connect+ehlo+starttls+mail+rcpt+2*data+quit."""
    assert 400.0 == attempt_cap_s(outbound_timeouts())
    assert 7.0 == attempt_cap_s(outbound_timeouts(attempt_secs=7.0))


def test_pool_repr_says_what_it_holds() -> None:
    """ConnectionPool's repr names its counts and limits."""
    text = repr(connection_pool(max_per_key=3, idle_timeout_s=2.5))
    assert "<ConnectionPool keys=0 open=0 idle=0 in_use=0 opened=0 reused=0 max_per_key=3 " \
        "idle_timeout_s=2.5>" == text  # fmt: skip
