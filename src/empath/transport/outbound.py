"""Outbound SMTP connections: connect, STARTTLS, send messages, keep them pooled.

Why this module is (just) over 600 lines: connect, TLS policy and the client pump for one
delivery attempt read best together; the pool is in pool.py.

Theory of operation
-------------------
An :class:`OutboundConnection` is a thin asyncio pump around the sans-I/O
:class:`~empath.smtp.client.SmtpClient`.  Its :class:`_Pump` protocol feeds
every read to the client, writes whatever the client wants written, and queues
the client's events; the coroutines here only wait for *events* (session ready,
354, transaction done), never for individual replies, so a pipelined message
costs two waits.  One lazy timer (on the injected :class:`~empath.clock.Clock`, so
tests run in virtual time) enforces the per-phase timeouts of
``smtp_timeouts``: the phase is the oldest outstanding command, and its timeout is
a *deadline for its whole reply*, set when that reply becomes the one awaited and
never moved by bytes that arrive meanwhile (a server dripping one byte a second
must not hold a connection for ever).  On top of that, each attempt has a cap
(``attempt_secs``, by default the sum of the phase timeouts with ``data_secs``
twice: 400 s): from the connect, or from the start of a transaction on a pooled
connection, to its last reply.  A timeout or a network error ends the connection;
the client then settles every open recipient as temporary.

TLS (RFC 3207): STARTTLS is used whenever the server offers it.  Opportunistic
sessions use an unverified context (any certificate is better than plaintext);
``require_tls`` sessions fail unless STARTTLS succeeds with a certificate
verified against the MX host name, which is also the SNI name.
``accept_invalid_certs`` keeps TLS mandatory but skips verification.

The pool that keeps these connections open between messages is
:class:`empath.transport.pool.ConnectionPool`.

Not frozen, against the house style: ``PoolKey`` (one per relayed message). Why, and
what stands in for frozen: DESIGN §15.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, cast

from empath.clock import Clock, Timer
from empath.errors import (
    DeliveryError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
    TlsHandshakeError,
)
from empath.logs import get_logger
from empath.smtp.client import (
    ClientEvent,
    ClientState,
    Cmd,
    OutboundTransaction,
    SendBody,
    SessionClosed,
    SessionFailed,
    SessionReady,
    SmtpClient,
    StartTls,
    TlsPolicy,
    TransactionDone,
    TransactionResult,
)
from empath.transport.failures import error_from_exception

log = get_logger("delivery", __name__)

BodySource = bytes | Callable[[], AsyncIterator[bytes]]
"""A message body in stored form (CRLF lines): bytes, or a factory of chunk iterators."""


@dataclass(frozen=True, slots=True)
class OutboundTimeouts:
    """The client's deadlines in seconds: one per phase (the oldest outstanding command's)
    and ``attempt_secs`` for a whole attempt (None: :func:`attempt_cap_s` sums the phases).
    ``config/derive.py`` builds it from ``delivery.smtp_timeouts``."""

    connect_secs: float
    ehlo_secs: float
    starttls_secs: float
    mail_from_secs: float
    rcpt_to_secs: float
    data_secs: float
    quit_secs: float
    attempt_secs: float | None


def attempt_cap_s(t: OutboundTimeouts) -> float:
    """The whole-attempt deadline: ``attempt_secs``, or the sum of the phases (data
    twice: the content, then the reply to the final dot)."""
    if t.attempt_secs is not None:
        return t.attempt_secs
    return (
        t.connect_secs + t.ehlo_secs + t.starttls_secs + t.mail_from_secs
        + t.rcpt_to_secs + 2 * t.data_secs + t.quit_secs
    )  # fmt: skip


class TlsMode(enum.Enum):
    """How a connection uses TLS; part of the pool key."""

    NONE = "none"  # plaintext only (fallback after a broken opportunistic handshake)
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered, certificate not checked
    REQUIRED = "required"  # STARTTLS mandatory, certificate verified against the MX name
    REQUIRED_UNVERIFIED = "required_unverified"  # mandatory, accept_invalid_certs

    @property
    def policy(self) -> TlsPolicy:
        if self is TlsMode.NONE:
            return TlsPolicy.DISABLED
        if self is TlsMode.OPPORTUNISTIC:
            return TlsPolicy.OPPORTUNISTIC
        return TlsPolicy.REQUIRED

    @property
    def verify(self) -> bool:
        return self is TlsMode.REQUIRED


def tls_mode_for(require_tls: bool, accept_invalid_certs: bool) -> TlsMode:
    if not require_tls:
        return TlsMode.OPPORTUNISTIC
    return TlsMode.REQUIRED_UNVERIFIED if accept_invalid_certs else TlsMode.REQUIRED


@dataclass(slots=True, init=False, unsafe_hash=True)  # not frozen: see the module doc
class PoolKey:
    host: str  # MX host name (verification and SNI name)
    port: int
    tls: TlsMode

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(self, host: str, port: int, tls: TlsMode) -> None:
        self.host = host
        self.port = port
        self.tls = tls


class TlsContexts:
    """Builds and caches the two kinds of client SSL context (building one costs ms)."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[bool, str | None], ssl.SSLContext] = {}

    def get(self, verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
        key = (verify, ca_file if verify else None)
        ctx = self._cache.get(key)
        if ctx is None:
            if verify:
                ctx = ssl.create_default_context()
                if ca_file:
                    ctx.load_verify_locations(cafile=ca_file)
            else:
                # Opportunistic TLS (RFC 7435): encrypt without authenticating.
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._cache[key] = ctx
        return ctx


_PHASE_TEXT: Final = {
    Cmd.GREETING: "receiving the initial server greeting",
    Cmd.EHLO: "receiving the EHLO reply",
    Cmd.HELO: "receiving the HELO reply",
    Cmd.STARTTLS: "performing the STARTTLS handshake",
    Cmd.RSET: "sending RSET",
    Cmd.MAIL: "sending MAIL FROM",
    Cmd.RCPT: "sending RCPT TO",
    Cmd.DATA: "sending message content",
    Cmd.DOT: "sending end of data -- message may be sent more than once",
    Cmd.QUIT: "sending QUIT",
}


def _phase_timeouts(t: OutboundTimeouts) -> dict[Cmd | None, float]:
    return {
        None: t.quit_secs,
        Cmd.GREETING: t.ehlo_secs,
        Cmd.EHLO: t.ehlo_secs,
        Cmd.HELO: t.ehlo_secs,
        Cmd.STARTTLS: t.starttls_secs,
        Cmd.RSET: t.mail_from_secs,
        Cmd.MAIL: t.mail_from_secs,
        Cmd.RCPT: t.rcpt_to_secs,
        Cmd.DATA: t.data_secs,
        Cmd.DOT: t.data_secs,
        Cmd.QUIT: t.quit_secs,
    }


class _Pump(asyncio.Protocol):
    """Network side of one connection: bytes → client → events, with a phase timer."""

    def __init__(
        self, client: SmtpClient, timeouts: dict[Cmd | None, float], label: str, clock: Clock
    ) -> None:
        self.client = client
        self.label = label
        self._clock = clock  # times the reply deadlines (virtual in tests)
        self.transport: asyncio.Transport | None = None
        self.events: collections.deque[ClientEvent] = collections.deque()
        self.closed = False
        self._timeouts = timeouts
        self._waiter: asyncio.Future[None] | None = None
        self._timer: Timer | None = None
        self._timer_at = 0.0  # when the pending timer fires (clock.monotonic() time)
        self._deadline = 0.0  # monotonic time by which the awaited reply must be complete
        self._deadline_phase: Cmd | None = None
        # what the deadline is for: (phase, replies received, client state); only a
        # change of it starts a new deadline
        self._deadline_for: tuple[Cmd | None, int, ClientState] | None = None
        self._phase_deadline = 0.0
        self._cap = float("inf")  # the attempt's deadline (start_attempt)
        self._cap_s = 0.0
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # the transaction's body when it is held whole: written from data_received as
        # soon as the 354 arrives, with no wake-up of the waiting attempt in between
        self.body: bytes | None = None
        # asyncio.get_running_loop() costs a getpid() syscall per call on 3.11: once
        self._loop: asyncio.AbstractEventLoop | None = None

    # asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        events = self.client.receive_data(data)
        out = self.client.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)
        if events and self.body is not None:
            events = self._body_now(events)
        if events:
            self.events.extend(events)
            self._wake()
        elif self._waiter is not None:
            self._arm()  # a reply completed: the next one gets its own deadline

    def _body_now(self, events: list[ClientEvent]) -> list[ClientEvent]:
        """Answer a 354 here with the whole body and its final dot (the attempt only
        waits for the transaction's end): one loop turn and one task wake-up fewer per
        message.  The other events keep their order."""
        kept: list[ClientEvent] = []
        for event in events:
            body = self.body
            if body is not None and isinstance(event, SendBody):
                self.body = None
                client = self.client
                self.write(client.send_body(body) + client.end_body())
            else:
                kept.append(event)
        return kept

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        reason = f"lost connection with {self.label}"
        if exc is not None:
            reason += f": {exc}"
        events = self.client.connection_lost(reason)
        self.events.extend(events)
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # used by OutboundConnection ------------------------------------------------

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def flush_client(self) -> None:
        self.write(self.client.data_to_send())

    async def next_event(self) -> ClientEvent:
        while not self.events:
            if self.closed and not self.events:
                raise RuntimeError("connection closed without a final event")
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            self._arm()
            try:
                await self._waiter
            finally:
                self._waiter = None  # the (lazy) timer stays; see _arm
        return self.events.popleft()

    async def drain(self, timeout_s: float) -> None:
        if not self._paused or self.closed:
            return
        waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            if not waiter.done():
                waiter.set_result(None)

        wait_s = min(timeout_s, self._cap - self._clock.monotonic())
        timer = self._clock.call_later(max(0.0, wait_s), expire)
        try:
            await waiter
        finally:
            timer.cancel()
            self._drain_waiter = None
        if expired:
            self._timed_out(Cmd.DATA)

    def start_attempt(self, cap_s: float) -> None:
        """From now the attempt must be over within ``cap_s`` seconds."""
        self._cap_s = cap_s
        self._cap = self._clock.monotonic() + cap_s

    def end_attempt(self) -> None:
        self._cap = float("inf")

    def abort(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        """Set the deadline for the reply awaited now.

        A new deadline starts only when the awaited reply changes (another phase,
        another reply received, another client state), never because bytes of the
        same reply arrived; it is capped by the attempt's deadline.  The timer is
        lazy: a new reply only moves ``_deadline``; the one pending timer re-checks
        it when it fires.  This saves a TimerHandle per reply on the hot path (a
        pooled connection keeps one timer alive, not thousands).
        """
        now = self._clock.monotonic()
        client = self.client
        phase = client.phase
        awaited = (phase, client.replies_received, client.state)
        if awaited != self._deadline_for:
            self._deadline_for = awaited
            self._deadline_phase = phase
            self._phase_deadline = now + self._timeouts.get(phase, 30.0)
        self._deadline = min(self._phase_deadline, self._cap)
        timer = self._timer
        if timer is None or self._deadline < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._set_timer(now)

    def _set_timer(self, now: float) -> None:
        self._timer_at = self._deadline
        self._timer = self._clock.call_later(self._deadline - now, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._waiter is None or self.closed:
            return
        now = self._clock.monotonic()
        if now >= self._deadline:
            self._timed_out(self._deadline_phase)
        else:
            self._set_timer(now)

    def _timed_out(self, phase: Cmd | None) -> None:
        what = _PHASE_TEXT.get(phase, "waiting") if phase is not None else "waiting"
        over = self._clock.monotonic() >= self._cap
        limit = f" (attempt time limit of {self._cap_s:g}s exceeded)" if over else ""
        events = self.client.connection_lost(
            f"conversation with {self.label} timed out while {what}{limit}"
        )
        self.events.extend(events)
        self._wake()
        self.abort()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _error_from_event(event: ClientEvent, mx: str) -> DeliveryError:
    if isinstance(event, SessionFailed):
        cls = PermanentDeliveryError if event.permanent else TemporaryDeliveryError
        code = event.reply.code if event.reply is not None else None
        return cls(event.text, code=code, enhanced=event.enhanced, mx=mx)
    if isinstance(event, SessionClosed):
        code = event.reply.code if event.reply is not None else None
        return TemporaryDeliveryError(event.text, code=code, enhanced="4.4.2", mx=mx)
    return TemporaryDeliveryError(f"unexpected {type(event).__name__} from {mx}", mx=mx)


class OutboundConnection:
    """One established SMTP session to one MX address (see module docstring)."""

    __slots__ = (
        "_idle_timer",
        "_pump",
        "address",
        "client",
        "key",
        "label",
        "last_used",
        "messages_sent",
        "reused",
        "timeouts",
    )

    def __init__(self, key: PoolKey, address: str, pump: _Pump, timeouts: OutboundTimeouts) -> None:
        self.key = key
        self.address = address
        self.label = pump.label
        self.client = pump.client
        self.timeouts = timeouts
        self.messages_sent = 0
        self.reused = False  # handed out by the pool from its idle list (set by the pool)
        self.last_used = 0.0
        self._pump = pump
        self._idle_timer: Timer | None = None

    @classmethod
    async def open(
        cls,
        key: PoolKey,
        *,
        address: str,
        local_hostname: str,
        timeouts: OutboundTimeouts,
        tls_contexts: TlsContexts,
        clock: Clock,
        tls_ca_file: str | None = None,
    ) -> OutboundConnection:
        """Connect to ``address`` (or the MX name when empty) and set the session up.

        ``clock`` times the reply deadlines and the attempt cap; the connect and the
        TLS handshake are bounded by asyncio's own (real-time) timeouts.

        Raises TemporaryDeliveryError for connect failures, timeouts, 4xx greetings
        and TLS failures, PermanentDeliveryError for 5xx greetings/EHLO refusals.
        """
        loop = asyncio.get_running_loop()
        target = address or key.host
        label = f"{key.host}[{target}]:{key.port}"
        client = SmtpClient(local_hostname, mx=key.host, tls_policy=key.tls.policy)
        pump = _Pump(client, _phase_timeouts(timeouts), label, clock)
        pump.start_attempt(attempt_cap_s(timeouts))
        try:
            async with asyncio.timeout(timeouts.connect_secs):
                await loop.create_connection(lambda: pump, target, key.port)
        except TimeoutError:
            raise TemporaryDeliveryError(
                f"connect to {label}: Connection timed out", enhanced="4.4.1", mx=key.host
            ) from None
        except OSError as exc:
            # asyncio's "Connect call failed (addr)" hides the errno's own text.
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise TemporaryDeliveryError(
                f"connect to {label}: {reason}", enhanced="4.4.1", mx=key.host
            ) from None
        conn = cls(key, address, pump, timeouts)
        try:
            await conn._setup(tls_contexts, tls_ca_file)
        except BaseException:
            pump.close()
            raise
        return conn

    async def _setup(self, tls_contexts: TlsContexts, tls_ca_file: str | None) -> None:
        pump = self._pump
        while True:
            event = await pump.next_event()
            if isinstance(event, SessionReady):
                return
            if isinstance(event, StartTls):
                await self._upgrade(tls_contexts, tls_ca_file)
                continue
            raise _error_from_event(event, self.key.host)

    async def _upgrade(self, tls_contexts: TlsContexts, tls_ca_file: str | None) -> None:
        pump = self._pump
        assert pump.transport is not None
        ctx = tls_contexts.get(self.key.tls.verify, tls_ca_file)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeouts.starttls_secs):
                new_transport = await loop.start_tls(
                    pump.transport,
                    pump,
                    ctx,
                    server_hostname=self.key.host,
                    ssl_handshake_timeout=self.timeouts.starttls_secs,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            pump.abort()
            err = error_from_exception(exc, self.key.host, "performing the STARTTLS handshake")
            raise TlsHandshakeError(err.text, enhanced=err.enhanced, mx=self.key.host) from None
        if new_transport is None:
            raise TlsHandshakeError(f"TLS handshake failed with {self.label}", mx=self.key.host)
        pump.transport = new_transport
        self.client.tls_started()
        pump.flush_client()

    # --- state -------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Healthy and idle: a new message may be sent now."""
        return self.client.usable and not self._pump.closed

    @property
    def tls_active(self) -> bool:
        return self.client.tls_active

    @property
    def tls_session(self) -> tuple[str, str]:
        """(protocol, cipher) of the TLS session, e.g. ``("TLSv1.3", "TLS_AES_256_GCM_SHA384")``;
        ``("", "")`` in plaintext (delivery log lines)."""
        transport = self._pump.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return "", ""
        cipher = ssl_object.cipher()
        return str(ssl_object.version() or ""), str(cipher[0]) if cipher else ""

    @property
    def peer_address(self) -> str:
        """The remote IP address this connection goes to (``address`` when given)."""
        if self.address:
            return self.address
        transport = self._pump.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if peer else ""

    # --- sending -----------------------------------------------------------------

    async def send(self, txn: OutboundTransaction, body: BodySource) -> TransactionResult:
        """Run one transaction; never raises for remote or network trouble.

        Network failures and timeouts come back as temporary per-recipient
        verdicts (the connection is then unusable).
        """
        pump = self._pump
        if self.messages_sent:  # a pooled connection: this transaction is the attempt
            pump.start_attempt(attempt_cap_s(self.timeouts))
        try:
            events = self.client.start_transaction(txn)
            for event in events:
                if isinstance(event, TransactionDone):
                    return event.result
            if isinstance(body, bytes):
                pump.body = body  # sent by the pump itself on the 354
            pump.flush_client()
            self.messages_sent += 1
            while True:
                event = await pump.next_event()
                if isinstance(event, TransactionDone):
                    return event.result
                if isinstance(event, SendBody):
                    await self._write_body(body)
                # SessionClosed without TransactionDone cannot happen: the client
                # settles the transaction first.
        finally:
            pump.body = None
            pump.end_attempt()

    async def _write_body(self, body: BodySource) -> None:
        pump = self._pump
        client = self.client
        if isinstance(body, bytes):
            pump.write(client.send_body(body) + client.end_body())
            return
        data_secs = self.timeouts.data_secs
        async for chunk in body():
            if client.state is not ClientState.BODY:
                return  # the server ended the session meanwhile
            pump.write(client.send_body(chunk))
            await pump.drain(data_secs)
        if client.state is ClientState.BODY:
            pump.write(client.end_body())

    async def quit(self) -> None:
        """QUIT politely (bounded by quit_secs), then close."""
        self.cancel_idle_timer()
        pump = self._pump
        try:
            if not pump.closed and self.client.quit():
                pump.flush_client()
                while True:
                    event = await pump.next_event()
                    if isinstance(event, SessionClosed):
                        break
        except Exception as exc:  # closing anyway
            log.debug("QUIT failed", mx=self.label, error=str(exc))
        finally:
            pump.close()

    def close(self) -> None:
        """Close at once (no QUIT)."""
        self.cancel_idle_timer()
        self._pump.close()

    def set_idle_timer(self, handle: Timer) -> None:
        self.cancel_idle_timer()
        self._idle_timer = handle

    @property
    def idle_timer_armed(self) -> bool:
        return self._idle_timer is not None

    def cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
