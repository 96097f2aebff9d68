"""One connection to a milter: the asyncio shell around ``codec`` (no parsing here).

Opened when a session first needs the milter, closed with the session (Postfix
keeps one milter connection per SMTP session too).  Every read has a deadline; a
failure of any kind raises :class:`MilterUnavailableError` with a ``kind`` for
``empath_milter_errors_total{milter,kind}`` (``connect``, ``timeout``, ``closed``,
``protocol``) and the connection is not used again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from empath.errors import EmpathError
from empath.modules.milter import codec
from empath.modules.milter.codec import Cmd, Kind, Negotiated, Response

__all__ = ["MilterConnection", "MilterUnavailableError", "parse_address"]

_READ_BYTES: Final = 65536


class MilterUnavailableError(EmpathError):
    """The milter could not be reached or broke the conversation."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"milter {kind}: {detail}")
        self.kind = kind


def parse_address(address: str) -> tuple[str, str | int]:
    """``inet:127.0.0.1:11332`` or ``inet:11332@host`` → (host, port);
    ``unix:/p`` → ("unix", "/p")."""
    if address.startswith("unix:"):
        return "unix", address[5:]
    rest = address[5:]
    if "@" in rest:
        port_text, _, host = rest.partition("@")
    else:
        host, _, port_text = rest.rpartition(":")
    return host.strip("[]"), int(port_text)


class MilterConnection:
    """A negotiated milter connection; see the module docstring."""

    __slots__ = ("_pending", "_reader", "_writer", "broken", "negotiated", "packets")

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.packets = codec.PacketReader()
        self.negotiated: Negotiated | None = None
        self.broken = False
        self._pending: list[tuple[bytes, bytes]] = []

    async def open(self, address: str, connect_s: float, command_s: float) -> Negotiated:
        host, port = parse_address(address)
        try:
            async with asyncio.timeout(connect_s):
                if host == "unix":
                    assert isinstance(port, str)
                    self._reader, self._writer = await asyncio.open_unix_connection(port)
                else:
                    self._reader, self._writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            self.broken = True
            detail = f"no connection within {connect_s:g} s"
            raise MilterUnavailableError("connect", detail) from None
        except OSError as exc:
            self.broken = True
            raise MilterUnavailableError("connect", exc.strerror or str(exc)) from None
        self.send(codec.optneg())
        reply = await self._packet(command_s)
        if reply[0] != Kind.OPTNEG.value:
            self.broken = True
            raise MilterUnavailableError("protocol", f"expected OPTNEG, got {reply[0]!r}")
        try:
            self.negotiated = codec.decode_optneg(reply[1])
        except codec.MilterProtocolError as exc:
            self.broken = True
            raise MilterUnavailableError("protocol", str(exc)) from None
        return self.negotiated

    def send(self, data: bytes) -> None:
        if self._writer is None or self.broken:
            raise MilterUnavailableError("closed", "connection not open")
        self._writer.write(data)

    async def _packet(self, timeout_s: float) -> tuple[bytes, bytes]:
        reader = self._reader
        assert reader is not None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    if self._pending:
                        return self._pending.pop(0)
                    if self._writer is not None:
                        await self._writer.drain()
                    data = await reader.read(_READ_BYTES)
                    if not data:
                        raise MilterUnavailableError("closed", "the milter closed the connection")
                    self._pending.extend(self.packets.feed(data))
        except TimeoutError:
            self.broken = True
            raise MilterUnavailableError("timeout", f"no reply within {timeout_s:g} s") from None
        except codec.MilterProtocolError as exc:
            self.broken = True
            raise MilterUnavailableError("protocol", str(exc)) from None
        except OSError as exc:
            self.broken = True
            raise MilterUnavailableError("closed", exc.strerror or str(exc)) from None
        except MilterUnavailableError:
            self.broken = True
            raise

    async def step(self, packets: bytes, cmd: Cmd, timeout_s: float) -> list[Response]:
        """Send ``packets`` (macros + the command); unless the milter said it will not
        answer ``cmd``, read replies up to the final one (modifications first)."""
        neg = self.negotiated
        assert neg is not None
        self.send(packets)
        if not neg.answers(cmd):
            return []
        return await self.replies(timeout_s)

    async def replies(self, timeout_s: float) -> list[Response]:
        out: list[Response] = []
        while True:
            cmd, data = await self._packet(timeout_s)
            try:
                resp = codec.decode_response(cmd, data)
            except codec.MilterProtocolError as exc:
                self.broken = True
                raise MilterUnavailableError("protocol", str(exc)) from None
            if resp.kind is Kind.PROGRESS:
                continue  # the milter asks for more time: the deadline restarts
            out.append(resp)
            if resp.final:
                return out

    def abort(self) -> None:
        """Drop the connection now (after a failure: nothing more is said)."""
        self.broken = True
        writer = self._writer
        self._writer = None
        if writer is not None:
            writer.transport.abort()

    async def close(self, *, quit_first: bool = True) -> None:
        writer = self._writer
        self._writer = None
        if writer is None:
            return
        with contextlib.suppress(Exception):
            if quit_first and not self.broken:
                writer.write(codec.encode(Cmd.QUIT))
            writer.close()
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
