"""The outbound pump answers a 354 with a body it holds whole, in the same network
callback: the attempt waiting on it is woken once per message (for the end of the
transaction), not twice."""

from __future__ import annotations

import asyncio

from empath.smtp.client import (
    OutboundTransaction,
    SendBody,
    SessionReady,
    SmtpClient,
    TlsPolicy,
    TransactionDone,
)
from empath.testing.clock import FakeClock
from empath.transport.outbound import _Pump

BODY = b"Subject: hi\r\n\r\n.leading dot\r\n"


class Wire(asyncio.Transport):
    """What the pump wrote, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False


def ready_pump() -> tuple[_Pump, Wire]:
    client = SmtpClient("me.test", mx="mx.test", tls_policy=TlsPolicy.DISABLED)
    pump = _Pump(client, {}, "mx.test[127.0.0.1]:25", FakeClock())
    wire = Wire()
    pump.connection_made(wire)
    pump.data_received(b"220 mx.test ESMTP\r\n")
    pump.data_received(b"250-mx.test\r\n250 PIPELINING\r\n")
    assert isinstance(pump.events.popleft(), SessionReady)
    client.start_transaction(OutboundTransaction("s@a.test", ("r@mx.test",), len(BODY)))
    pump.flush_client()
    wire.written.clear()
    return pump, wire


def test_a_held_body_is_written_on_the_354_without_an_event() -> None:
    pump, wire = ready_pump()
    pump.body = BODY
    pump.data_received(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
    assert [b"Subject: hi\r\n\r\n..leading dot\r\n.\r\n"] == wire.written
    assert not pump.events  # nothing for the attempt to wake up for
    assert pump.body is None
    pump.data_received(b"250 2.0.0 queued\r\n")
    done = pump.events.popleft()
    assert isinstance(done, TransactionDone)
    assert ["r@mx.test"] == [a for a, _ in done.result.verdicts]


def test_without_a_held_body_the_354_is_an_event_for_the_attempt() -> None:
    pump, wire = ready_pump()
    pump.data_received(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
    assert [] == wire.written
    assert isinstance(pump.events.popleft(), SendBody)
