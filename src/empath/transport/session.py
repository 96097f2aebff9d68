"""The inbound SMTP pump: one ``asyncio.Protocol`` per connection.

Why this module is longer than 600 lines: the pump, its backpressure, its timeouts and
the spool commit read and write the same per-connection state and run per message, so
they stay one class; the waits on modules, the authenticator and the acceptance steps
are in handoffs.py, the SMTP logic in smtp/server.py.

Theory of operation
-------------------
The protocol owns no SMTP logic.  ``data_received`` feeds bytes to the sans-I/O
:class:`~empath.smtp.server.SmtpServer`, writes the reply bytes it produced, then
carries out its events:

* ``BodyStart``  → ``spool.begin()`` and write our ``Received:`` header first;
* ``BodyChunk``  → ``BodyWriter.write`` (synchronous, cheap: the spool spills big
  bodies to disk itself, so nothing here holds a whole message);
* ``BodyAbort``  → ``BodyWriter.abort``;
* ``MessageComplete`` → ``spool.start_commit(...)`` (a future, no Task), then answer
  from its done-callback through ``message_committed``/``message_failed`` (250 only
  once durable; ``SpoolFullError`` → 452 4.3.1, other spool errors → 451 4.3.0);
  pipelined input read meanwhile stays buffered in the state machine;
* ``StartTls``   → pause reading, ``loop.start_tls``, then ``tls_started``;
* ``AuthCheck``  → the listener's Authenticator checks the credentials (off the
  event loop; handoffs.py), then ``auth_succeeded``/``auth_failed``;
* ``Check``      → the listener's modules answer (handoffs.py), then ``check_done``;
* ``Close``      → close after the reply is flushed.

With end-of-data acceptance steps configured for the listener (DKIM, modules, the
submission From: check; see acceptance.py), ``BodyStart`` opens a
:class:`~empath.transport.acceptance.HeldBody` instead, which keeps the body in memory,
and ``MessageComplete`` runs the steps before the spool commit: in place when they
never wait, from the last step's future's done-callback when only that one waits (DKIM
signing in its key process: acceptance.py ``run_soon``), else in one task
(handoffs.py).  Without
steps nothing of that runs: the body-chunk path is the same call either way.

asyncio.Protocol rather than streams: no per-read coroutine switch, which is most
of the difference between ~3k and ~7k messages/s on two cores.

Timeouts: each read records ``clock.monotonic()``; one sweeper per listener (see
listener.py: a ``clock.call_later`` timer, virtual in tests) checks every session
each tick — no timer per connection or per read.

Backpressure (DESIGN §3): the session stops reading while any of these holds, and
resumes once none does:

* the transport's write buffer is over its high-water mark (``pause_writing`` →
  ``resume_writing``): a client that pipelines and never reads its replies cannot
  make us buffer them without bound;
* the state machine stopped at its per-call work bound (``has_backlog``): the rest
  is interpreted from ``call_soon`` callbacks, one bounded batch per loop
  iteration, so a client pipelining megabytes does not starve other sessions;
* a commit is pending with more than 64 KiB of pipelined input behind it;
* a TLS handshake is starting.

A session whose timeout fires while output is still unsent is *aborted*: a
``close()`` would wait for a buffer the client never drains and keep the slot
(per-IP and global) forever.  A session closing (QUIT, 421) whose last reply does
not drain within the command timeout is aborted too.

The per-IP cap counts IPv4 clients by address and IPv6 clients by /64 (one
customer's allocation; any address in it is the same client for the cap).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from empath.errors import SpoolError, SpoolFullError
from empath.logs import get_logger
from empath.smtp.replies import Reply
from empath.smtp.sasl import AuthOutcome
from empath.smtp.server import (
    MAX_COMMANDS_PER_TURN,
    AuthCheck,
    BodyAbort,
    BodyChunk,
    BodyStart,
    Check,
    Close,
    Event,
    MessageComplete,
    Phase,
    SmtpServer,
    StartTls,
    Transaction,
    received_header,
)
from empath.spool.model import Envelope, MessageState, initial_units
from empath.transport.acceptance import (
    R_STEP_ERROR,
    AcceptedMessage,
    HeldBody,
    Later,
    SessionFacts,
    Verdict,
)
from empath.transport.admission import per_ip_key
from empath.transport.handoffs import (
    accepted_message,
    authenticate,
    log_refusal,
    module_check,
    module_check_now,
    module_session,
    run_acceptance,
)

if TYPE_CHECKING:
    from empath.modules.api import Session as ModuleSession
    from empath.modules.host import ModuleHost
    from empath.spool.store import BodyWriter
    from empath.transport.listener import ListenerRuntime

log = get_logger("smtp", __name__)

_R_SPOOL_FULL: Final = Reply.of(452, "4.3.1", "Insufficient system storage, try again later")
_R_SPOOL_ERROR: Final = Reply.of(451, "4.3.0", "Local error in processing, try again later")
_R_TOO_MANY: Final = Reply.of(421, "4.7.0", "Too many connections, try again later").to_bytes()
_R_SHUTDOWN_NOW: Final = Reply.of(421, "4.3.2", "Service shutting down").to_bytes()

_NO_FIELDS: Final[dict[str, object]] = {}
_MAX_HELD_WAITING: Final = 64 * 1024  # pipelined input held while a commit is pending


_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                  "Nov", "Dec")  # fmt: skip


@dataclass(slots=True)
class _DateCache:
    second: int = -1
    text: str = ""


_date_cache = _DateCache()


def rfc5322_date(wall_s: float) -> str:
    """``Mon, 20 Nov 2023 12:00:00 +0000`` (locale-independent, cached per second)."""
    sec = int(wall_s)
    if sec != _date_cache.second:
        t = time.gmtime(sec)
        _date_cache.text = (
            f"{_DAYS[t.tm_wday]}, {t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
        )
        _date_cache.second = sec
    return _date_cache.text


class SmtpSession(asyncio.Protocol):
    """One inbound connection; see module doc."""

    __slots__ = (
        "_backlog_call",
        "_close_deadline",
        "_closing",
        "_commit_body",
        "_commit_fields",
        "_commit_task",
        "_commit_txn",
        "_conn_deadline",
        "_counted",
        "_eof",
        "_errored",
        "_ip",
        "_ip_key",
        "_last_read",
        "_modules",
        "_msession",
        "_paused",
        "_peer",
        "_rt",
        "_server",
        "_tls_starting",
        "_transport",
        "_write_paused",
        "_writer",
    )

    def __init__(self, runtime: ListenerRuntime) -> None:
        self._rt = runtime
        self._transport: asyncio.Transport | None = None
        self._server: SmtpServer | None = None
        self._writer: BodyWriter | None = None
        self._commit_task: asyncio.Future[Any] | None = None  # commit or TLS handshake
        self._commit_txn: Transaction | None = None
        self._commit_body: BodyWriter | None = None
        self._commit_fields: dict[str, object] | None = None  # from acceptance steps
        self._ip = ""
        self._ip_key = ""  # what the per-IP cap counts: the address, or its /64 for IPv6
        self._peer = ""
        self._last_read = 0.0
        self._conn_deadline = 0.0
        self._close_deadline = 0.0
        self._counted = False  # counted in active/per-IP totals
        self._errored = False
        self._eof = False  # the client half-closed; close once its input is answered
        self._closing = False
        self._paused = False  # reading paused (see module doc: backpressure)
        self._write_paused = False  # the transport's write buffer is over high water
        self._tls_starting = False
        self._backlog_call: asyncio.Handle | None = None
        self._modules: ModuleHost | None = None  # the modules this session started with
        self._msession: ModuleSession | None = None  # what they know of it

    def __repr__(self) -> str:
        return (
            f"<SmtpSession {self._peer} listener={self._rt.label} server={self._server!r} "
            f"read_paused={self._paused} write_paused={self._write_paused} "
            f"closing={self._closing}>"
        )

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it
        self._transport = transport = cast(asyncio.Transport, transport)
        rt = self._rt
        peer = transport.get_extra_info("peername")
        ip, port = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]  # an IPv4 client of a dual-stack [::] listener
        self._ip = ip
        self._ip_key = per_ip_key(ip)
        self._peer = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        stats = rt.stats
        stats.connections_total += 1
        if rt.shutting_down:
            transport.write(_R_SHUTDOWN_NOW)
            transport.close()
            return
        spec = rt.spec
        if not rt.admit(ip):
            # DESIGN §3: connection limits give 421 4.7.0.
            transport.write(_R_TOO_MANY)
            transport.close()
            log.debug("Connection refused: limit reached", peer=self._peer,
                      listener=rt.label)  # fmt: skip
            return
        self._counted = True
        stats.sessions_total += 1
        rt.sessions.add(self)
        host = rt.modules
        if host is None:
            self._server = server = SmtpServer(
                rt.server_config, rt.relay_check(ip), tls_active=rt.spec.tls_implicit
            )
        else:
            self._server = server = self._with_modules(host, ip, port)
        transport.write(server.data_to_send())
        now = rt.clock.monotonic()
        self._last_read = now
        self._conn_deadline = now + spec.connection_timeout_s
        rt.session_added()
        if host is not None and (check := server.pending_check) is not None:
            self._check(check)

    def data_received(self, data: bytes) -> None:
        server = self._server
        if server is None:
            return
        self._last_read = self._rt.clock.monotonic()
        events = server.receive_data(data)
        out = server.data_to_send()
        if out and self._transport is not None:
            self._transport.write(out)
        if events:
            self._handle(events)
        if (
            server.has_backlog
            or self._write_paused
            or self._paused
            or (server.phase is Phase.WAITING and server.buffered_bytes > _MAX_HELD_WAITING)
        ):
            # (Not paused in the common case: one commit per message would cost two
            # epoll_ctl calls, and the state machine already holds pipelined input.)
            self._flow()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        # the client drained our replies: progress, like a read (a slow reader of a
        # long pipelined batch is not timed out while it keeps reading)
        self._last_read = self._rt.clock.monotonic()
        self._write_paused = False
        self._flow()

    def _flow(self) -> None:
        """Schedule held-back input and pause or resume reading (module doc)."""
        server = self._server
        transport = self._transport
        if server is None or transport is None or self._closing:
            return
        if server.has_backlog and not self._write_paused and self._backlog_call is None:
            self._backlog_call = self._rt.loop.call_soon(self._proceed)
        hold = (
            self._write_paused
            or server.has_backlog
            or self._tls_starting
            or (server.phase is Phase.WAITING and server.buffered_bytes > _MAX_HELD_WAITING)
        )
        if self._eof:
            if not server.has_backlog and server.phase is not Phase.WAITING:
                self._close()
            return
        if hold and not self._paused:
            self._paused = True
            transport.pause_reading()
        elif not hold and self._paused:
            self._paused = False
            transport.resume_reading()

    def _proceed(self) -> None:
        """Interpret the next batch of input held back by the state machine."""
        self._backlog_call = None
        server = self._server
        transport = self._transport
        if server is None or transport is None or self._closing or self._write_paused:
            return
        events = server.proceed()
        out = server.data_to_send()
        if out:
            transport.write(out)
        if events:
            self._handle(events)
        self._flow()

    def eof_received(self) -> bool | None:
        server = self._server
        if (
            server is not None
            and not self._closing
            and (server.has_backlog or server.phase is Phase.WAITING)
        ):
            # a client may half-close after pipelining: answer what it sent first
            self._eof = True
            return True
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._backlog_call is not None:
            self._backlog_call.cancel()
            self._backlog_call = None
        server = self._server
        if server is not None:
            if server.phase is not Phase.CLOSED and exc is not None:
                self._errored = True
            self._handle(server.connection_lost())
        self._abort_body()
        self._transport = None
        if self._modules is not None and self._msession is not None:
            self._modules.session_closed_soon(self._msession)
            self._msession = None
        if self._counted:
            self._counted = False
            rt = self._rt
            rt.release(self._ip)
            if self._errored:
                rt.stats.sessions_errored += 1
            rt.sessions.discard(self)
            rt.session_gone()

    # --- events ---------------------------------------------------------------------

    def _handle(self, events: list[Event]) -> None:
        for ev in events:
            kind = type(ev)
            if kind is BodyChunk:
                assert isinstance(ev, BodyChunk)
                if self._writer is not None:
                    self._writer.write(ev.data)
            elif kind is BodyStart:
                assert isinstance(ev, BodyStart)
                self._begin_body(ev.transaction)
            elif kind is MessageComplete:
                assert isinstance(ev, MessageComplete)
                self._commit(ev.transaction)
            elif kind is BodyAbort:
                self._abort_body()
            elif kind is Check:
                assert isinstance(ev, Check)
                self._check(ev)
            elif kind is StartTls:
                # the ClientHello must not reach data_received before start_tls runs
                self._tls_starting = True
                self._flow()
                # Request-scoped, not supervised: owned by this session (pending_task, which
                # the listener's shutdown awaits) and bounded by the handshake timeout.
                self._commit_task = self._rt.loop.create_task(self._start_tls())
            elif kind is AuthCheck:
                assert isinstance(ev, AuthCheck)
                self._auth_check(ev)
            elif kind is Close:
                assert isinstance(ev, Close)
                if ev.error:
                    self._errored = True
                self._close()

    # --- modules (DESIGN §14; empath/modules) -----------------------------------------

    def _with_modules(self, host: ModuleHost, ip: str, port: int) -> SmtpServer:
        """A session of a listener with modules: their view of it, and a state machine
        that stops for a :class:`Check` at the stages they hook."""
        rt = self._rt
        self._modules = host
        self._msession = module_session(
            host, session_id=f"{rt.label}/{ip}:{port}/{id(self):x}", ip=ip, port=port,
            listener=rt.label, trusted=rt.trusts(ip),
        )  # fmt: skip
        return SmtpServer(
            rt.server_config,
            rt.relay_check(ip),
            tls_active=rt.spec.tls_implicit,
            checks=host.checks,
        )

    def _check(self, check: Check) -> None:
        """Ask the modules about ``check``: in a task, or — where every module asked
        answers without suspending (``host.now``) — here and now, and so on down a
        pipelined batch of checked commands (a loop, not a recursion: 1,000 pipelined
        RCPTs are a chain of 1,000 checks; at most MAX_COMMANDS_PER_TURN of them in
        one turn, like the state machine's own bound).  Replies wait for the next
        check and go out together, as in _resume."""
        host = self._modules
        ms = self._msession
        server = self._server
        assert host is not None and ms is not None and server is not None
        budget = MAX_COMMANDS_PER_TURN  # then a task: other sessions get their turn
        while check.stage in host.now and budget:
            budget -= 1
            reply = module_check_now(host, ms, server, check, self._peer)
            if reply is not None:
                log_refusal(check, reply, self._peer)
            events = server.check_done(reply)
            last = events[-1] if events else None
            if type(last) is not Check:  # (a Check is always the last event of a batch)
                transport = self._transport
                out = server.data_to_send()
                if out and transport is not None:
                    transport.write(out)
                self._handle(events)
                return
            assert isinstance(last, Check)
            if len(events) > 1:
                self._handle(events[:-1])
            check = last
        self._commit_task = self._rt.loop.create_task(self._run_check(check))

    async def _run_check(self, check: Check) -> None:
        host = self._modules
        ms = self._msession
        server = self._server
        assert host is not None and ms is not None and server is not None
        reply = await module_check(host, ms, server, check, self._peer)
        self._commit_task = None
        if self._transport is None or self._transport.is_closing():
            return
        if reply is not None:
            log_refusal(check, reply, self._peer)
        self._resume(server.check_done(reply))

    def _begin_body(self, txn: Transaction) -> None:
        self._abort_body()
        rt = self._rt
        writer: BodyWriter = rt.spool.begin()
        if rt.acceptance is not None:
            writer = HeldBody(writer, rt.acceptance)
        writer.write(
            received_header(
                txn,
                client_ip=self._ip,
                hostname=rt.spec.hostname,
                msg_id=writer.id,
                date=rfc5322_date(rt.clock.now()),
            )
        )
        self._writer = writer

    def _abort_body(self) -> None:
        writer = self._writer
        if writer is not None:
            self._writer = None
            writer.abort()

    def _commit(self, txn: Transaction) -> None:
        """Queue the message for the spool; ``_committed`` answers once it is durable.
        A future and a done-callback, not a Task: this runs once per accepted message."""
        writer = self._writer
        self._writer = None
        assert writer is not None
        if isinstance(writer, HeldBody):
            host = self._modules
            pipeline = writer.pipeline
            if pipeline.soon and (host is None or host.data_immediate):
                # every step answers without waiting, but perhaps the last, which hands
                # back a future (acceptance.py run_soon): no task either way
                message = accepted_message(txn, writer, self._facts(txn))
                answer = pipeline.run_soon(message)
                if isinstance(answer, Later):
                    self._commit_task = answer.future
                    answer.future.add_done_callback(
                        functools.partial(self._settled, txn, writer, message, answer)
                    )
                    return
                verdict = answer
                if verdict.spool:
                    self._accepted(txn, writer, message, verdict)
                else:  # answered from a task: no recursion down pipelined messages
                    self._commit_task = self._rt.loop.create_task(
                        self._answer(txn, writer, message, verdict)
                    )
                return
            self._commit_task = self._rt.loop.create_task(self._accept(txn, writer))
            return
        self._spool_commit(txn, writer, txn.sender, txn.recipients)

    def _settled(
        self,
        txn: Transaction,
        held: HeldBody,
        message: AcceptedMessage,
        later: Later,
        _fut: asyncio.Future[Any],
    ) -> None:
        """The last acceptance step's future is done (run_soon): spool or answer."""
        self._accepted(txn, held, message, held.pipeline.settle(message, later))

    def _spool_commit(
        self, txn: Transaction, writer: BodyWriter, sender: str, recipients: tuple[str, ...]
    ) -> asyncio.Future[MessageState]:
        rt = self._rt
        now = rt.clock.now()
        envelope = Envelope(
            sender=sender,
            recipients=recipients,
            received_at=now,
            peer=self._peer,
            helo=txn.helo,
            smtputf8=txn.smtputf8,
            body_8bit=txn.body_8bit,
            size=writer.size,
            listener=rt.label,
            auth_user=txn.auth_user,
        )
        try:
            fut = rt.spool.start_commit(writer, envelope, initial_units(recipients, now))
        except Exception as exc:
            fut = rt.loop.create_future()
            fut.set_exception(exc)
        self._commit_task = fut
        self._commit_txn = txn
        self._commit_body = writer
        fut.add_done_callback(self._committed)
        return fut

    def _facts(self, txn: Transaction) -> SessionFacts:
        rt = self._rt
        ip = self._ip
        return SessionFacts(
            peer_ip=ip, peer=self._peer, helo=txn.helo, trusted=rt.trusts(ip),
            auth_user=txn.auth_user, tls=txn.tls, listener=rt.label, esmtp=txn.esmtp,
            smtputf8=txn.smtputf8, module_session=self._msession,
        )  # fmt: skip

    async def _accept(self, txn: Transaction, held: HeldBody) -> None:
        """Slow path (acceptance steps configured): run them on the whole message,
        then spool what they left, or answer their refusal (acceptance.py)."""
        message, verdict = await run_acceptance(txn, held, self._facts(txn))
        fut = self._accepted(txn, held, message, verdict)
        if fut is not None:
            # shutdown awaits pending_task: keep this task alive until the commit is answered
            await asyncio.wait((fut,))

    async def _answer(
        self, txn: Transaction, held: HeldBody, message: AcceptedMessage, verdict: Verdict
    ) -> None:
        self._accepted(txn, held, message, verdict)

    def _accepted(
        self, txn: Transaction, held: HeldBody, message: AcceptedMessage, verdict: Verdict
    ) -> asyncio.Future[MessageState] | None:
        """The steps' verdict: spool what they left (the commit's future), or answer."""
        server = self._server
        if server is None or self._transport is None or self._transport.is_closing():
            held.abort()  # the client is gone: it will retry; do not spool a duplicate
            self._commit_task = None
            return None
        if verdict.reply is not None:
            held.abort()
            self._commit_task = None
            self._resume(server.message_failed(verdict.reply))
            return None
        writer = held.writer
        try:
            writer.write(message.to_bytes())
        except Exception as exc:  # the contract says write never raises; be safe
            log.error("Spool write failed, message refused", peer=self._peer, error=repr(exc))
            writer.abort()
            self._commit_task = None
            self._resume(server.message_failed(R_STEP_ERROR))
            return None
        self._commit_fields = message.log_fields or None
        return self._spool_commit(txn, writer, message.sender, tuple(message.recipients))

    def _committed(self, fut: asyncio.Future[MessageState]) -> None:
        rt = self._rt
        server = self._server
        txn = self._commit_txn
        writer = self._commit_body
        fields = self._commit_fields
        self._commit_task = self._commit_txn = self._commit_body = self._commit_fields = None
        assert server is not None and txn is not None and writer is not None
        exc: BaseException | None = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            writer.abort()
            if isinstance(exc, SpoolFullError):
                log.error("Spool full, message refused", peer=self._peer, error=str(exc),
                          smtp_code="452")  # fmt: skip
                events = server.message_failed(_R_SPOOL_FULL)
            elif isinstance(exc, SpoolError):
                log.error("Spool error, message refused", peer=self._peer, error=str(exc),
                          smtp_code="451")  # fmt: skip
                events = server.message_failed(_R_SPOOL_ERROR)
            else:  # a bug in a backend must not kill the session silently
                log.error("Unexpected spool failure", peer=self._peer, error=repr(exc))
                events = server.message_failed(_R_SPOOL_ERROR)
            self._resume(events)
            return
        state = fut.result()
        rt.stats.messages_received += 1
        if rt.audit:
            log.audit(
                "Message received",
                message_id=state.id,
                sender=rt.show_sender(state.envelope.sender),
                recipients=len(state.envelope.recipients),
                size=state.envelope.size,
                peer=self._peer,
                listener=rt.label,
                **(fields or _NO_FIELDS),
                **({"auth_user": txn.auth_user} if txn.auth_user is not None else _NO_FIELDS),
            )
        if rt.on_accepted is not None:
            try:
                rt.on_accepted(state)
            except Exception as cb_exc:
                log.exception("on_accepted callback failed", message_id=state.id,
                              error=repr(cb_exc))  # fmt: skip
        self._resume(server.message_committed(state.id))

    def _resume(self, events: list[Event]) -> None:
        transport = self._transport
        server = self._server
        if transport is None or server is None or transport.is_closing():
            return
        # With modules, replies to pipelined commands wait while the next command's
        # check runs and go out together (RFC 2920 lets a server batch them): one write
        # instead of one per checked command.
        if self._modules is None or not any(type(ev) is Check for ev in events):
            out = server.data_to_send()
            if out:
                transport.write(out)
        self._last_read = self._rt.clock.monotonic()
        if events:
            self._handle(events)
        if self._paused or server.has_backlog or self._eof:
            self._flow()

    def _auth_check(self, ev: AuthCheck) -> None:
        """A cached success or a blocked address is answered now; a password to hash
        goes to a task (request-scoped like the TLS handshake: owned by this session)."""
        auth = self._rt.auth
        assert auth is not None  # AUTH is offered only with one
        outcome = auth.quick(ev.credentials, self._ip_key, self._peer)
        if outcome is None:
            self._commit_task = self._rt.loop.create_task(self._authenticate(ev))
        else:
            self._auth_answered(outcome)

    def _auth_answered(self, outcome: AuthOutcome) -> None:
        server = self._server
        assert server is not None
        if outcome.grant is not None:
            self._resume(server.auth_succeeded(outcome.grant))
        else:
            assert outcome.reply is not None
            self._resume(server.auth_failed(outcome.reply))

    async def _authenticate(self, ev: AuthCheck) -> None:
        auth = self._rt.auth
        assert auth is not None  # AUTH is offered only where an Authenticator is set
        outcome = await authenticate(auth, ev, self._ip_key, self._peer)
        self._commit_task = None
        if self._server is None or self._transport is None:
            return
        self._auth_answered(outcome)

    async def _start_tls(self) -> None:
        rt = self._rt
        transport = self._transport
        server = self._server
        ctx = rt.ssl_context
        assert transport is not None and server is not None and ctx is not None
        try:
            new = await rt.loop.start_tls(
                transport, self, ctx, server_side=True,
                ssl_handshake_timeout=rt.spec.command_timeout_s,
            )  # fmt: skip
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("TLS handshake failed", peer=self._peer, error=str(exc))
            self._errored = True
            self._tls_starting = False
            self._commit_task = None
            if self._transport is not None:
                self._transport.abort()
            return
        self._commit_task = None
        if new is None:  # pragma: no cover - the connection went away meanwhile
            return
        self._transport = new
        self._tls_starting = False
        self._paused = False  # start_tls resumed the raw transport; the TLS one is fresh
        self._write_paused = False
        self._resume(server.tls_started())

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        rt = self._rt
        # a reply the client never reads must not keep the slot: see check_timeout
        self._close_deadline = rt.clock.monotonic() + rt.spec.command_timeout_s
        if self._transport is not None:
            self._transport.close()  # flushes the reply first

    # --- timers and shutdown -------------------------------------------------------

    def check_timeout(self, now: float) -> None:
        """Called by the listener's sweeper every tick (one timer per listener, not one
        per session: creating and cancelling a timer per connection costs more)."""
        server = self._server
        transport = self._transport
        if server is None or transport is None:
            return
        rt = self._rt
        if self._closing:
            if now >= self._close_deadline:
                log.info("Session aborted: closing reply not read", peer=self._peer,
                         listener=rt.label)  # fmt: skip
                transport.abort()
            return
        spec = rt.spec
        phase = server.phase
        if phase is Phase.WAITING:
            limit = None  # our own commit / handshake has its own limits
        elif phase in (Phase.DATA, Phase.BDAT, Phase.SKIP):
            limit = (
                spec.data_init_timeout_s
                if server.awaiting_first_data
                else spec.data_block_timeout_s
            )
        else:
            limit = spec.command_timeout_s
        if now >= self._conn_deadline or (limit is not None and now - self._last_read >= limit):
            log.info("Session timed out", peer=self._peer, listener=rt.label,
                     phase=phase.value)  # fmt: skip
            self._errored = True
            if transport.get_write_buffer_size() > 0:
                # DESIGN §3: output still unsent - the client is not reading; close()
                # would wait for it forever.  Abort frees the slot now.
                log.info("Session aborted: replies not read", peer=self._peer,
                         listener=rt.label,
                         unsent=transport.get_write_buffer_size())  # fmt: skip
                self._closing = True
                transport.abort()
                return
            events = server.timed_out()
            out = server.data_to_send()
            if out:
                transport.write(out)
            self._handle(events)

    def relay_changed(self) -> None:
        """The relay policy was reloaded: the next RCPT of this session is judged by it
        (an operator revoking a network must not wait for open sessions to end)."""
        if self._server is not None:
            self._server.set_relay(self._rt.relay_check(self._ip))

    def shutdown(self) -> None:
        """Graceful stop: 421 4.3.2 now if idle, else after the message in progress."""
        server = self._server
        if server is None or self._transport is None or self._closing:
            return
        events = server.shutdown()
        out = server.data_to_send()
        if out:
            self._transport.write(out)
        self._handle(events)

    def force_close(self) -> None:
        """Grace period over: tell the client and drop the connection."""
        if self._transport is None:
            return
        if (
            not self._closing
            and self._server is not None
            and self._server.phase is not Phase.WAITING
        ):
            self._transport.write(_R_SHUTDOWN_NOW)
        self._closing = True
        if self._transport.get_write_buffer_size() > 0:
            self._transport.abort()  # a client that does not read would hold us here
        else:
            self._transport.close()

    @property
    def pending_task(self) -> asyncio.Future[Any] | None:
        """The commit (or TLS handshake) in progress, if any."""
        return self._commit_task

    @property
    def in_message(self) -> bool:
        return self._server is not None and self._server.in_message

    @property
    def held_bytes(self) -> int:
        """Memory this session holds for its client: unread input plus unsent replies."""
        held = self._server.buffered_bytes if self._server is not None else 0
        if self._transport is not None:
            held += self._transport.get_write_buffer_size()
        return held
