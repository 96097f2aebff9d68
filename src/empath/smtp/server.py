"""The inbound ESMTP session as a sans-I/O state machine.

Why this module is longer than 600 lines: the input loop, the command handlers, the
body phases and the module check points read and write the same per-session state
(buffer, phase, transaction), so they stay one class; what the machine only reads (states,
verb table, settings, canned replies) is in smtp/dialogue.py and AUTH in smtp/auth.py.

Theory of operation
-------------------
One :class:`SmtpServer` per connection.  The transport calls :meth:`receive_data` with
whatever bytes arrived; the server splits them into command lines (never per
network read: pipelined commands and commands split across packets both work),
or hands them to the DATA/BDAT decoder, and returns a list of :data:`Event`.
Reply bytes accumulate and are collected with :meth:`data_to_send`; the transport
writes them *before* acting on the events (so a 220 precedes the TLS handshake
and a 221/421 precedes the close).

Two orthogonal pieces of state:

* :class:`State` — where the SMTP dialogue is (RFC 5321 §4.1.4 ordering):
  FRESH → GREETED → MAIL → RCPT → (DATA or BDAT chunks) → GREETED.
  ``ALLOWED`` (smtp/dialogue.py) says in which states each verb may be used;
  anything else is ``503 5.5.1``.
* :class:`Phase` — what the next input bytes are: command lines, DATA content,
  BDAT chunk bytes (kept or skipped), or nothing because we WAIT for the
  transport (message commit, TLS handshake).

While WAITING the server buffers input but does not interpret it, so pipelined
commands after the end of data are answered only after the message's 250; the
transport resumes it with :meth:`message_committed`, :meth:`message_failed`,
:meth:`tls_started`, :meth:`auth_succeeded` or :meth:`auth_failed`.

SMTP AUTH (RFC 4954, DESIGN §13) is offered only on a listener configured with
``auth`` and only under TLS; its state machine is :class:`~empath.smtp.auth.ServerAuth`.
Its challenges put the server in the AUTH phase (one response line each); complete
credentials become an :class:`AuthCheck` event and the server WAITS for the
transport's verdict.

Input is one buffer and an offset into it: each command advances the offset, and
the unread rest is copied once per :meth:`receive_data` (not once per command, which made
87k pipelined NOOPs quadratic).  The work done per call is bounded: after
``MAX_COMMANDS_PER_TURN`` commands the server stops with :attr:`has_backlog` set
and the transport calls :meth:`proceed` on a later loop iteration, so one client
pipelining megabytes of commands cannot starve the other sessions (and produces
its replies no faster than the transport lets it write them).

The body is never buffered here: DATA/BDAT content is forwarded chunk by chunk
as :class:`BodyChunk` events.  A message found bad (bare CR/LF, NUL, line too
long, too big) is read to its real end, then refused; the transport discards
what it had written (:class:`BodyAbort`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from empath.errors import SmtpProtocolError
from empath.smtp.auth import MAX_RESPONSE_BYTES, AuthOffer, ServerAuth, Step
from empath.smtp.data import BdatDecoder, BodyError, DataDecoder, ReceivedCounter
from empath.smtp.dialogue import (
    ALLOWED,
    BAD_COMMAND_CODES,
    BODY_ERROR_REPLIES,
    MAX_BAD_COMMANDS,
    MAX_COMMAND_BYTES,
    MAX_COMMANDS_PER_TURN,
    R_BYE,
    R_DATA_GO,
    R_HELP,
    R_LINE_TOO_LONG,
    R_MAIL_OK,
    R_OK,
    R_RCPT_OK,
    R_SHUTDOWN,
    R_TIMEOUT,
    R_TLS_GO,
    R_TOO_MANY_ERRORS,
    R_TOO_MANY_HOPS,
    R_TOO_MANY_RCPTS,
    R_VRFY,
    RECIPIENT_OVERSHOOT_LIMIT,
    Phase,
    ServerConfig,
    State,
    canned,
    reply_bytes,
)
from empath.smtp.events import (
    AuthCheck,
    BodyAbort,
    BodyChunk,
    BodyStart,
    Check,
    CheckStage,
    Close,
    Event,
    MessageComplete,
    StartTls,
    Transaction,
    received_header,
)
from empath.smtp.parsing import (
    Body,
    MailFrom,
    Verb,
    domain_of,
    parse_bdat,
    parse_helo,
    parse_mail,
    parse_rcpt,
    split_command,
)
from empath.smtp.relay import RelayPolicy
from empath.smtp.replies import Reply
from empath.smtp.sasl import UserGrant

__all__ = [
    "MAX_BAD_COMMANDS",
    "MAX_COMMANDS_PER_TURN",
    "MAX_COMMAND_BYTES",
    "RECIPIENT_OVERSHOOT_LIMIT",
    "AuthCheck",
    "AuthOffer",
    "BodyAbort",
    "BodyChunk",
    "BodyStart",
    "Check",
    "CheckStage",
    "Close",
    "Event",
    "MessageComplete",
    "Phase",
    "RelayPolicy",
    "ServerConfig",
    "SmtpServer",
    "StartTls",
    "State",
    "Transaction",
    "received_header",
]


class SmtpServer:
    """One inbound session; see module doc."""

    __slots__ = (
        "_auth",
        "_backlog",
        "_bad_commands",
        "_bdat",
        "_body_open",
        "_buf",
        "_canned",
        "_cfg",
        "_check_arg",
        "_check_stage",
        "_checks",
        "_data",
        "_discarding",
        "_draining",
        "_esmtp",
        "_helo",
        "_hops",
        "_mail",
        "_out",
        "_overshoot",
        "_pos",
        "_rcpts",
        "_relay_allows",
        "_skip_bytes",
        "_skip_reply",
        "_txn",
        "phase",
        "state",
        "tls_active",
    )

    def __init__(
        self,
        config: ServerConfig,
        relay_allows: Callable[[str], bool],
        *,
        tls_active: bool = False,
        checks: frozenset[CheckStage] = frozenset(),
    ) -> None:
        self._cfg = config
        self._canned = canned(config)
        self._relay_allows = relay_allows
        self.tls_active = tls_active
        self.state = State.FRESH
        self.phase = Phase.COMMAND
        self._out: list[bytes] = [self._canned.greeting]
        self._buf = b""
        self._pos = 0  # interpreted up to here
        self._backlog = False  # stopped with complete commands left (see proceed)
        self._discarding = False  # dropping the rest of an over-long command line
        self._bad_commands = 0
        self._overshoot = 0  # RCPTs answered 452 4.5.3 in this session
        self._draining = False  # shutdown requested: close after the current message
        self._helo = ""
        self._esmtp = False
        self._mail: MailFrom | None = None
        self._txn: Transaction | None = None  # frozen at DATA/first BDAT
        self._rcpts: list[str] = []
        self._data: DataDecoder | None = None
        self._bdat: BdatDecoder | None = None
        self._hops: ReceivedCounter | None = None
        self._body_open = False
        self._skip_bytes = 0
        self._skip_reply = b""
        # Module checks (DESIGN §14): the stages asked about; empty = never asked, no cost.
        self._checks = checks
        self._check_stage: CheckStage | None = None  # a Check event awaits check_done
        self._check_arg: object = None  # what to carry out if the check accepts
        if CheckStage.CONNECT in checks:
            self._out = []  # the greeting waits for the connect check
            self._hold(CheckStage.CONNECT, None)
        # SMTP AUTH (smtp/auth.py): None where it is not offered (port 25)
        self._auth = ServerAuth(config.auth) if config.auth is not None else None

    def set_relay(self, relay_allows: Callable[[str], bool]) -> None:
        """A new relay check for the RCPTs still to come (config reload); recipients
        already accepted stay accepted."""
        self._relay_allows = relay_allows

    def __repr__(self) -> str:
        return (
            f"<SmtpServer {self._cfg.hostname} state={self.state.value} "
            f"phase={self.phase.value} helo={self._helo!r} recipients={len(self._rcpts)} "
            f"buffered={self.buffered_bytes} backlog={self._backlog} "
            f"bad_commands={self._bad_commands} tls={self.tls_active}>"
        )

    # --- transport-facing API ---------------------------------------------------

    def data_to_send(self) -> bytes:
        """Reply bytes produced since the last call (the greeting first)."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def in_message(self) -> bool:
        """Receiving or committing a message body (shutdown lets these finish)."""
        return self.phase in (Phase.DATA, Phase.BDAT, Phase.WAITING) or self.state is State.BDAT

    @property
    def buffered_bytes(self) -> int:
        """Input held but not yet interpreted (e.g. pipelined while WAITING)."""
        return len(self._buf) - self._pos

    @property
    def has_backlog(self) -> bool:
        """The last call stopped at its work bound with input left: call :meth:`proceed`."""
        return self._backlog

    @property
    def awaiting_first_data(self) -> bool:
        """DATA accepted (354 sent) but no content byte read yet."""
        return self.phase is Phase.DATA and self._data is not None and self._data.size == 0

    def receive_data(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if self.phase is Phase.CLOSED or not data:
            return events
        buf = self._buf
        pos = self._pos
        if pos < len(buf):
            self._buf = (buf[pos:] if pos else buf) + data
        else:
            self._buf = data
        self._pos = 0
        self._run(events)
        return events

    def proceed(self) -> list[Event]:
        """Interpret more of the input held back by the per-call work bound."""
        events: list[Event] = []
        if self.phase is not Phase.CLOSED:
            self._run(events)
        return events

    def message_committed(self, msg_id: str) -> list[Event]:
        """The spool made the message durable: 250, then continue with buffered input."""
        self._out.append(f"250 2.0.0 Ok: queued as {msg_id}\r\n".encode())
        return self._after_message()

    def message_failed(self, reply: Reply) -> list[Event]:
        """The spool refused the message (452 4.3.1 / 451 4.3.0)."""
        self._out.append(reply.to_bytes())
        return self._after_message()

    @property
    def pending_check(self) -> Check | None:
        """The connect check a new server starts with (no event carries it)."""
        if self._check_stage is CheckStage.CONNECT:
            return Check(CheckStage.CONNECT, "")
        return None

    def check_done(self, reply: Reply | None) -> list[Event]:
        """The modules' answer to the pending :class:`Check`: ``None`` (or 2xx) carries
        on as if nobody was asked; 4xx/5xx is the answer to the command (at connect: a
        4xx greeting becomes ``421`` and closes, a 5xx one ``554`` after which only
        QUIT is accepted, RFC 5321 §3.1); a ``421`` closes the session."""
        events: list[Event] = []
        stage = self._check_stage
        arg = self._check_arg
        self._check_stage = None
        self._check_arg = None
        if stage is None or self.phase is not Phase.WAITING:
            return events
        self.phase = Phase.COMMAND
        if reply is None or reply.code < 400:
            self._check_accepted(stage, arg, events)
        elif reply.code == 421 or (stage is CheckStage.CONNECT and reply.code < 500):
            self._close(events, Reply(421, reply.lines).to_bytes(), "refused by module")
            return events
        elif stage is CheckStage.CONNECT:
            self._out.append(Reply(554, reply.lines).to_bytes())
            self.state = State.REFUSED
        elif reply.code in BAD_COMMAND_CODES:
            self._bad(events, reply.to_bytes())
        else:
            self._out.append(reply.to_bytes())
        if self.phase is Phase.COMMAND:
            if self._draining and not self.in_message:
                self._clear_transaction(events)
                self._close(events, R_SHUTDOWN, "shutdown")
                return events
            self._run(events)
        return events

    def _hold(self, stage: CheckStage, arg: object) -> None:
        self._check_stage = stage
        self._check_arg = arg
        self.phase = Phase.WAITING

    def _check_accepted(self, stage: CheckStage, arg: object, events: list[Event]) -> None:
        if stage is CheckStage.CONNECT:
            self._out.append(self._canned.greeting)
        elif stage is CheckStage.HELO:
            assert isinstance(arg, tuple)
            self._greet_ok(arg[0], arg[1], events)
        elif stage is CheckStage.MAIL:
            assert isinstance(arg, MailFrom)
            self._mail_ok(arg)
        else:
            assert isinstance(arg, str)
            self._rcpt_ok(arg)

    @property
    def helo(self) -> str:
        return self._helo

    @property
    def sender(self) -> str | None:
        return self._mail.sender if self._mail is not None else None

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(self._rcpts)

    @property
    def auth_user(self) -> str | None:
        auth = self._auth
        return auth.user if auth is not None else None

    def auth_succeeded(self, grant: UserGrant) -> list[Event]:
        """The transport verified the credentials of the last :class:`AuthCheck`."""
        auth = self._auth
        assert auth is not None
        self._out.append(auth.granted(grant))
        return self._back_to_commands([])

    def auth_failed(self, reply: Reply) -> list[Event]:
        """Bad credentials (535 5.7.8) or blocked (454 4.7.0); counts as a bad command."""
        events: list[Event] = []
        auth = self._auth
        assert auth is not None
        auth.refused()
        self._bad(events, reply.to_bytes())
        if self.phase is Phase.CLOSED:
            return events
        return self._back_to_commands(events)

    def tls_started(self) -> list[Event]:
        """RFC 3207 §4.2: "the server MUST discard any knowledge obtained from the
        client ... which was not obtained from the TLS negotiation itself"."""
        self.tls_active = True
        self.state = State.FRESH
        self.phase = Phase.COMMAND
        self._drop_input()
        self._helo = ""
        self._esmtp = False
        if self._auth is not None:
            self._auth.reset()
        self._clear_transaction([])
        return []

    def timed_out(self) -> list[Event]:
        events: list[Event] = []
        self._clear_transaction(events)
        self._close(events, R_TIMEOUT, "timeout", error=True)
        return events

    def shutdown(self) -> list[Event]:
        """Stop: idle sessions get 421 4.3.2 now; one receiving a message may finish it."""
        events: list[Event] = []
        self._draining = True
        if self.phase is not Phase.CLOSED and not self.in_message:
            self._clear_transaction(events)
            self._close(events, R_SHUTDOWN, "shutdown")
        return events

    def connection_lost(self) -> list[Event]:
        events: list[Event] = []
        self._clear_transaction(events)
        self.phase = Phase.CLOSED
        return events

    # --- input loop -----------------------------------------------------------------

    def _drop_input(self) -> None:
        self._buf = b""
        self._pos = 0
        self._backlog = False

    def _rest(self) -> bytes:
        """The uninterpreted input as one bytes object (for the body decoders)."""
        pos = self._pos
        return self._buf[pos:] if pos else self._buf

    def _run(self, events: list[Event]) -> None:
        budget = MAX_COMMANDS_PER_TURN
        self._backlog = False
        while self._pos < len(self._buf):
            phase = self.phase
            if phase is Phase.COMMAND:
                if budget == 0:
                    self._backlog = True
                    return
                budget -= 1
                if not self._command_line(events):
                    return
            elif phase is Phase.DATA:
                self._data_bytes(events)
            elif phase is Phase.BDAT:
                self._bdat_bytes(events)
            elif phase is Phase.SKIP:
                self._skip(events)
            elif phase is Phase.AUTH:
                if not self._auth_line(events):
                    return
            else:  # WAITING or CLOSED: leave input buffered / ignored
                return

    def _command_line(self, events: list[Event]) -> bool:
        buf = self._buf
        pos = self._pos
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(buf) - pos >= MAX_COMMAND_BYTES:
                # bounded buffer: answer now, drop the rest of this line as it comes
                self._drop_input()
                if not self._discarding:
                    self._discarding = True
                    self._bad(events, R_LINE_TOO_LONG)
            return False
        self._pos = nl + 1
        if self._discarding:
            self._discarding = False
            return True
        if nl + 1 - pos > MAX_COMMAND_BYTES:
            self._bad(events, R_LINE_TOO_LONG)
            return True
        line = buf[pos : nl - 1] if nl > pos and buf[nl - 1] == 0x0D else buf[pos:nl]
        try:
            word, arg = split_command(line)
            entry = _DISPATCH.get(word)
            if entry is None:
                raise SmtpProtocolError(500, "5.5.1", "Command unrecognized")
            if self.state not in entry[0]:
                raise SmtpProtocolError(503, "5.5.1", "Bad sequence of commands")
            entry[1](self, arg, events)
        except SmtpProtocolError as exc:
            reply = Reply.of(exc.code, exc.enhanced, exc.text).to_bytes()
            if exc.code in BAD_COMMAND_CODES:
                self._bad(events, reply)
            else:
                self._out.append(reply)
        return True

    def _bad(self, events: list[Event], reply: bytes) -> None:
        self._bad_commands += 1
        if self._bad_commands >= MAX_BAD_COMMANDS:
            self._clear_transaction(events)
            self._close(events, R_TOO_MANY_ERRORS, "too many errors", error=True)
        else:
            self._out.append(reply)

    def _close(
        self, events: list[Event], reply: bytes, reason: str, *, error: bool = False
    ) -> None:
        self._out.append(reply)
        self.phase = Phase.CLOSED
        self._drop_input()
        events.append(Close(reason, error))

    # --- message content ---------------------------------------------------------------

    def _data_bytes(self, events: list[Event]) -> None:
        dec = self._data
        assert dec is not None
        body, done, rest = dec.feed(self._rest())
        self._buf = rest
        self._pos = 0
        if body:
            self._body(events, body)
        if done:
            self._data = None
            self._end_of_message(events, dec.error)

    def _bdat_bytes(self, events: list[Event]) -> None:
        dec = self._bdat
        assert dec is not None
        body, done, rest = dec.feed(self._rest())
        self._buf = rest
        self._pos = 0
        if body:
            self._body(events, body)
        if done:
            self._chunk_done(events)

    def _body(self, events: list[Event], body: bytes) -> None:
        hops = self._hops
        if hops is not None and not hops.done:
            hops.feed(body)
        events.append(BodyChunk(body))

    def _chunk_done(self, events: list[Event]) -> None:
        dec = self._bdat
        assert dec is not None
        if dec.error is not None or dec.finished:
            self._bdat = None
            self._end_of_message(events, dec.error)
        else:
            self.phase = Phase.COMMAND
            self._out.append(reply_bytes(250, "2.0.0", f"{dec.size} octets received"))

    def _skip(self, events: list[Event]) -> None:
        take = min(self._skip_bytes, len(self._buf) - self._pos)
        self._skip_bytes -= take
        self._pos += take
        if self._skip_bytes == 0:
            self.phase = Phase.COMMAND
            self._out.append(self._skip_reply)

    def _end_of_message(self, events: list[Event], error: BodyError | None) -> None:
        hops = self._hops
        self._hops = None
        if error is not None or (hops is not None and hops.count > self._cfg.hop_limit):
            self._out.append(
                BODY_ERROR_REPLIES[error].to_bytes() if error is not None else R_TOO_MANY_HOPS
            )
            self._clear_transaction(events)
            self.phase = Phase.COMMAND
            if self._draining:
                self._close(events, R_SHUTDOWN, "shutdown")
            return
        events.append(MessageComplete(self._txn or self._transaction()))
        self.phase = Phase.WAITING

    def _after_message(self) -> list[Event]:
        events: list[Event] = []
        self._body_open = False  # the transport committed or discarded it
        self._clear_transaction(events)
        return self._back_to_commands(events)

    def _back_to_commands(self, events: list[Event]) -> list[Event]:
        """The transport answered what the server waited for: read commands again (or
        close, when a shutdown came meanwhile)."""
        if self.phase is Phase.CLOSED:
            return events
        self.phase = Phase.COMMAND
        if self._draining:
            self._close(events, R_SHUTDOWN, "shutdown")
            return events
        self._run(events)
        return events

    def _transaction(self) -> Transaction:
        mail = self._mail
        assert mail is not None
        return Transaction(
            sender=mail.sender,
            recipients=tuple(self._rcpts),
            helo=self._helo,
            smtputf8=mail.smtputf8,
            body_8bit=mail.body is Body.EIGHT_BIT_MIME,
            esmtp=self._esmtp,
            tls=self.tls_active,
            auth_user=self.auth_user,
        )

    def _clear_transaction(self, events: list[Event]) -> None:
        if self._body_open:
            events.append(BodyAbort())
            self._body_open = False
        self._mail = None
        self._txn = None
        self._rcpts = []
        self._data = None
        self._bdat = None
        self._hops = None
        if self.state is not State.FRESH:
            self.state = State.GREETED

    # --- command handlers (dispatched through _HANDLERS) -------------------------------

    def _greet(self, arg: str, events: list[Event], *, esmtp: bool) -> None:
        helo = parse_helo(arg)
        if self._checks and CheckStage.HELO in self._checks:
            self._hold(CheckStage.HELO, (helo, esmtp))
            events.append(Check(CheckStage.HELO, helo))
            return
        self._greet_ok(helo, esmtp, events)

    def _greet_ok(self, helo: str, esmtp: bool, events: list[Event]) -> None:
        self._clear_transaction(events)
        self._helo = helo
        self._esmtp = esmtp
        self.state = State.GREETED
        if not esmtp:
            self._out.append(self._canned.helo)
        elif self.tls_active:
            self._out.append(self._canned.ehlo_tls)
        else:
            self._out.append(self._canned.ehlo)

    def _on_helo(self, arg: str, events: list[Event]) -> None:
        self._greet(arg, events, esmtp=False)

    def _on_ehlo(self, arg: str, events: list[Event]) -> None:
        self._greet(arg, events, esmtp=True)

    def _on_mail(self, arg: str, events: list[Event]) -> None:
        auth = self._auth
        if auth is not None:
            auth.before_mail()
        mail = parse_mail(arg)
        # RFC 1870 §6.2: a declared size over the limit is refused at MAIL.
        if mail.size is not None and mail.size > self._cfg.max_message_bytes:
            raise SmtpProtocolError(552, "5.3.4", "Message size exceeds fixed maximum message size")
        if auth is not None:
            auth.admit_sender(mail.sender)
        if self._checks and CheckStage.MAIL in self._checks:
            self._hold(CheckStage.MAIL, mail)
            events.append(Check(CheckStage.MAIL, mail.sender))
            return
        self._mail_ok(mail)

    def _mail_ok(self, mail: MailFrom) -> None:
        self._mail = mail
        self._rcpts = []
        self.state = State.MAIL
        self._out.append(R_MAIL_OK)

    def _on_rcpt(self, arg: str, events: list[Event]) -> None:
        mail = self._mail
        assert mail is not None
        rcpt = parse_rcpt(arg, smtputf8=mail.smtputf8).recipient
        # RFC 5321 §4.5.3.1.10: more than the limit → 452 ("too many recipients"),
        # not a bad command until the session overshoots by RECIPIENT_OVERSHOOT_LIMIT.
        auth = self._auth
        limit = self._cfg.max_recipients
        if auth is not None:
            limit = auth.recipient_limit(limit)  # the user's own quota (DESIGN §13)
        if len(self._rcpts) >= limit:
            self._overshoot += 1
            if self._overshoot > RECIPIENT_OVERSHOOT_LIMIT:
                self._bad(events, R_TOO_MANY_RCPTS)
            else:
                self._out.append(R_TOO_MANY_RCPTS)
            return
        if rcpt == "postmaster":
            # RFC 5321 §4.5.1: "Any system that includes an SMTP server supporting mail
            # relaying or delivery MUST support the reserved mailbox "postmaster" as a
            # case-insensitive local name."  Accepted from anyone, stored as the
            # dsn.postmaster address so delivery never sees a domain-less recipient.
            rcpt = self._cfg.postmaster
        elif (auth is None or auth.grant is None) and not self._relay_allows(domain_of(rcpt)):
            # DESIGN §13: an authenticated user may relay whatever trusted_networks says.
            raise SmtpProtocolError(554, "5.7.1", "Relay access denied")
        if self._checks and CheckStage.RCPT in self._checks:
            self._hold(CheckStage.RCPT, rcpt)
            events.append(Check(CheckStage.RCPT, rcpt))
            return
        self._rcpt_ok(rcpt)

    def _rcpt_ok(self, rcpt: str) -> None:
        if rcpt not in self._rcpts:
            self._rcpts.append(rcpt)
        self.state = State.RCPT
        self._out.append(R_RCPT_OK)

    def _on_data(self, arg: str, events: list[Event]) -> None:
        if arg:
            raise SmtpProtocolError(501, "5.5.4", "DATA takes no arguments")
        if self.state is not State.RCPT:
            # RFC 5321 §3.3: no (accepted) RCPT → 554 "no valid recipients".
            raise SmtpProtocolError(554, "5.5.1", "No valid recipients")
        self._data = DataDecoder(self._cfg.max_message_bytes)
        self._hops = ReceivedCounter()
        self.phase = Phase.DATA
        self._body_open = True
        self._txn = txn = self._transaction()
        events.append(BodyStart(txn))
        self._out.append(R_DATA_GO)

    def _on_bdat(self, arg: str, events: list[Event]) -> None:
        size, last = parse_bdat(arg)
        if self.state is State.RCPT:
            self._bdat = BdatDecoder(self._cfg.max_message_bytes)
            self._hops = ReceivedCounter()
            self._body_open = True
            self.state = State.BDAT
            self._txn = txn = self._transaction()
            events.append(BodyStart(txn))
        elif self.state is not State.BDAT:
            # RFC 3030 §2: the chunk follows the command whatever we answer, so
            # read (and drop) its bytes before replying.
            self._skip_bytes = size
            self._skip_reply = (
                reply_bytes(554, "5.5.1", "No valid recipients")
                if self.state is State.MAIL
                else reply_bytes(503, "5.5.1", "Bad sequence of commands")
            )
            self.phase = Phase.SKIP
            if size == 0:
                self._skip(events)
            return
        dec = self._bdat
        assert dec is not None
        dec.start_chunk(size, last)
        self.phase = Phase.BDAT
        if size == 0:
            self._chunk_done(events)

    def _on_rset(self, arg: str, events: list[Event]) -> None:
        self._clear_transaction(events)
        self._out.append(R_OK)

    def _on_noop(self, arg: str, events: list[Event]) -> None:
        self._out.append(R_OK)

    def _on_quit(self, arg: str, events: list[Event]) -> None:
        self._clear_transaction(events)
        self._close(events, R_BYE, "quit")

    def _on_vrfy(self, arg: str, events: list[Event]) -> None:
        self._out.append(R_VRFY)

    def _on_expn(self, arg: str, events: list[Event]) -> None:
        raise SmtpProtocolError(502, "5.5.1", "EXPN not available")

    def _on_help(self, arg: str, events: list[Event]) -> None:
        self._out.append(R_HELP)

    def _on_starttls(self, arg: str, events: list[Event]) -> None:
        if arg:
            raise SmtpProtocolError(501, "5.5.4", "STARTTLS takes no arguments")
        if self.tls_active:
            raise SmtpProtocolError(503, "5.5.1", "TLS already active")
        if not self._cfg.tls_available:
            raise SmtpProtocolError(454, "4.7.0", "TLS not available")
        self._out.append(R_TLS_GO)
        # Anything pipelined after STARTTLS was sent in clear: drop it (CVE-2011-0411).
        self._drop_input()
        self.phase = Phase.WAITING
        events.append(StartTls())

    def _on_auth(self, arg: str, events: list[Event]) -> None:
        auth = self._auth
        if auth is None:  # not offered here (port 25): an unknown extension
            raise SmtpProtocolError(503, "5.5.1", "AUTH not available")
        self._auth_step(events, auth.begin(arg, esmtp=self._esmtp, tls_active=self.tls_active))

    def _auth_step(self, events: list[Event], step: Step) -> None:
        if isinstance(step, bytes):  # a 334 challenge: read one response line
            self.phase = Phase.AUTH
            self._out.append(step)
        else:
            self.phase = Phase.WAITING
            events.append(step)

    def _auth_line(self, events: list[Event]) -> bool:
        """One SASL response line (Phase.AUTH)."""
        auth = self._auth
        assert auth is not None
        buf = self._buf
        pos = self._pos
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(buf) - pos > MAX_RESPONSE_BYTES:
                self._drop_input()
                self.phase = Phase.COMMAND
                self._discarding = True
                self._bad(events, auth.line_too_long())
            return False
        self._pos = nl + 1
        try:
            step = auth.respond(buf[pos:nl])
        except SmtpProtocolError as exc:
            self.phase = Phase.COMMAND
            self._bad(events, Reply.of(exc.code, exc.enhanced, exc.text).to_bytes())
            return self.phase is not Phase.CLOSED
        self._auth_step(events, step)
        return True


_Handler = Callable[[SmtpServer, str, list[Event]], None]

_HANDLERS: Final[dict[Verb, _Handler]] = {
    Verb.HELO: SmtpServer._on_helo,
    Verb.EHLO: SmtpServer._on_ehlo,
    Verb.MAIL: SmtpServer._on_mail,
    Verb.RCPT: SmtpServer._on_rcpt,
    Verb.DATA: SmtpServer._on_data,
    Verb.BDAT: SmtpServer._on_bdat,
    Verb.RSET: SmtpServer._on_rset,
    Verb.NOOP: SmtpServer._on_noop,
    Verb.QUIT: SmtpServer._on_quit,
    Verb.VRFY: SmtpServer._on_vrfy,
    Verb.EXPN: SmtpServer._on_expn,
    Verb.HELP: SmtpServer._on_help,
    Verb.STARTTLS: SmtpServer._on_starttls,
    Verb.AUTH: SmtpServer._on_auth,
}

# Verb word → (states allowed, handler): ALLOWED and _HANDLERS joined for one lookup
# per command (tuples: membership by identity, no Enum.__hash__ on the hot path).
_DISPATCH: Final[dict[str, tuple[tuple[State, ...], _Handler]]] = {
    verb.value: (tuple(ALLOWED[verb]), _HANDLERS[verb]) for verb in Verb
}
