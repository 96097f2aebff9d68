"""Sans-I/O SMTP client: replies in, command bytes and events out.

Theory of operation
-------------------
:class:`SmtpClient` is the protocol half of one outbound connection.  It never
touches a socket or a clock.  The transport (``empath.transport.outbound``):

1. feeds every byte read from the network to :meth:`SmtpClient.receive_data`,
   which returns the :data:`ClientEvent` objects those bytes completed;
2. writes whatever :meth:`SmtpClient.data_to_send` returns;
3. calls :meth:`start_transaction`, :meth:`send_body`/:meth:`end_body`,
   :meth:`tls_started`, :meth:`quit` and :meth:`connection_lost` when the
   events (or the network) say so.

Every command sent pushes what it expects onto a FIFO of :class:`Cmd`; every
reply pops the oldest one.  That is all pipelining needs (RFC 2920 §3.1: "the
server MUST send the responses in the same order as the commands were
received"): the client writes RSET?/MAIL/RCPT.../DATA in one go when the server
offered PIPELINING, and one at a time otherwise, with the same reply handlers.

State table (``_TRANSITIONS`` maps *(state, command answered)* to a handler)::

    GREETING      220 → EHLO sent                          4xx/5xx → SessionFailed
    EHLO          2xx → STARTTLS sent | READY              500/502 → HELO sent
    HELO          2xx → READY                              other   → SessionFailed
    STARTTLS      220 → TLS_HANDSHAKE (event StartTls)     else READY, or SessionFailed if required
    TLS_HANDSHAKE tls_started() → EHLO sent again (RFC 3207 §4.2)
    READY         start_transaction() → TRANSACTION
    TRANSACTION   RSET/MAIL/RCPT replies → per-recipient verdicts;
                  DATA 354 → BODY (event SendBody); DATA other → TransactionDone
    BODY          end_body() → DATA_END
    DATA_END      final reply → READY (event TransactionDone)
    any           quit() → QUIT; 221 → CLOSED; 421 or connection_lost() → CLOSED

Per-recipient verdicts: a rejected MAIL decides every recipient; a non-2xx RCPT
decides its recipient; the DATA (or final ".") reply decides every recipient
whose RCPT was accepted.  When no RCPT was accepted the body is not sent and the
next transaction on the connection starts with RSET.  The result says which
recipients were refused by their own RCPT reply (``refused_at_rcpt``): one
mailbox's trouble, not the destination's (the circuit breaker ignores them).

The client's vocabulary (states, commands, transactions, verdicts, events) is in
``empath.smtp.client_types`` and re-exported here.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from empath.errors import SmtpProtocolError
from empath.smtp.client_types import (
    ClientEvent,
    ClientState,
    Cmd,
    Extensions,
    LocalVerdict,
    OutboundTransaction,
    SendBody,
    SessionClosed,
    SessionFailed,
    SessionReady,
    TlsPolicy,
    TransactionDone,
    TransactionResult,
    Verdict,
)
from empath.smtp.data import DotStuffer
from empath.smtp.events import StartTls
from empath.smtp.replies import Reply, ReplyParser

__all__ = [
    "ClientEvent",
    "ClientState",
    "Cmd",
    "Extensions",
    "LocalVerdict",
    "OutboundTransaction",
    "SendBody",
    "SessionClosed",
    "SessionFailed",
    "SessionReady",
    "SmtpClient",
    "StartTls",
    "TlsPolicy",
    "TransactionDone",
    "TransactionResult",
    "Verdict",
]


# RFC 5321 §4.1.4: "... if the EHLO command is not acceptable to the SMTP server,
# 501, 500, 502, or 550 failure replies MUST be returned as appropriate.  The
# SMTP client MUST be able to accommodate servers that reject EHLO ... by falling
# back to HELO."  500/502 mean "EHLO not understood"; 501/550 are refusals of us.
_EHLO_FALLBACK_CODES: Final = frozenset({500, 502})


@dataclass(slots=True)
class _Txn:
    spec: OutboundTransaction
    verdicts: list[Verdict | None]
    accepted: list[int] = field(default_factory=list)
    refused_at_rcpt: set[int] = field(default_factory=set)  # their own RCPT said non-2xx
    next_rcpt: int = 0  # non-pipelined: next recipient to send
    mail_ok: bool = False
    rset_failed: bool = False
    replied: bool = False


Handler = Callable[["SmtpClient", Reply, int], None]


class SmtpClient:
    """The client side of one SMTP connection (see module docstring)."""

    __slots__ = (
        "_events",
        "_expect",
        "_out",
        "_parser",
        "_stuffer",
        "_txn",
        "extensions",
        "hostname",
        "mx",
        "needs_rset",
        "replies_received",
        "state",
        "tls_active",
        "tls_policy",
        "used_helo",
    )

    def __init__(
        self,
        hostname: str,
        mx: str = "",
        tls_policy: TlsPolicy = TlsPolicy.OPPORTUNISTIC,
        tls_active: bool = False,
    ) -> None:
        self.hostname = hostname  # our name, sent in EHLO/HELO
        self.mx = mx  # the server's name, used in texts
        self.tls_policy = tls_policy
        self.tls_active = tls_active  # implicit TLS (not used by SMTP relay, kept for tests)
        self.state = ClientState.GREETING
        self.extensions = Extensions()
        self.needs_rset = False
        self.used_helo = False
        self._parser = ReplyParser()
        self.replies_received = 0  # progress marker: the transport's reply deadlines
        self._expect: collections.deque[tuple[Cmd, int]] = collections.deque([(Cmd.GREETING, 0)])
        self._out: list[bytes] = []
        self._events: list[ClientEvent] = []
        self._txn: _Txn | None = None
        self._stuffer: DotStuffer | None = None

    # --- queries ---------------------------------------------------------------

    @property
    def phase(self) -> Cmd | None:
        """The command whose reply (or body) we are waiting for: picks the timeout."""
        if self.state is ClientState.BODY:
            return Cmd.DATA
        if self.state is ClientState.TLS_HANDSHAKE:
            return Cmd.STARTTLS
        return self._expect[0][0] if self._expect else None

    @property
    def closed(self) -> bool:
        return self.state is ClientState.CLOSED

    @property
    def usable(self) -> bool:
        """True when a new transaction may start now (connection reuse)."""
        return self.state is ClientState.READY

    # --- input -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        """Feed network bytes; return the events they completed (often none)."""
        if self.state is ClientState.CLOSED:
            return []
        try:
            replies = self._parser.feed(data)
        except SmtpProtocolError as exc:
            self._abort(None, f"protocol error from {self.mx or 'server'}: {exc.text}")
            return self._take_events()
        for reply in replies:
            self.replies_received += 1
            self._on_reply(reply)
            if self.closed:
                break
        return self._take_events()

    def connection_lost(self, reason: str) -> list[ClientEvent]:
        """The network failed (EOF, reset, timeout): settle everything outstanding."""
        if self.state is not ClientState.CLOSED:
            self._abort(None, reason)
        return self._take_events()

    def data_to_send(self) -> bytes:
        """Bytes the transport must write now (b"" when none)."""
        if not self._out:
            return b""
        out = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        return out

    # --- actions ---------------------------------------------------------------

    def tls_started(self) -> None:
        """The transport finished the TLS handshake after our STARTTLS."""
        self._require(ClientState.TLS_HANDSHAKE, "tls_started")
        # RFC 3207 §4.2: "The client MUST discard any knowledge obtained from the
        # server, such as the list of SMTP service extensions, which was not
        # obtained from the TLS negotiation itself.  The client SHOULD send an
        # EHLO command as the first command after a successful TLS negotiation."
        self.tls_active = True
        self.extensions = Extensions()
        self._send(Cmd.EHLO, f"EHLO {self.hostname}\r\n".encode())
        self.state = ClientState.EHLO

    def start_transaction(self, txn: OutboundTransaction) -> list[ClientEvent]:
        """Begin sending a message.  May settle it at once (local refusal)."""
        self._require(ClientState.READY, "start_transaction")
        if not txn.recipients:
            raise ValueError("a transaction needs at least one recipient")
        ext = self.extensions
        refusal: LocalVerdict | None = None
        if txn.smtputf8 and not ext.smtputf8:
            # RFC 6531 §3.4: if the server does not offer SMTPUTF8 and the message
            # needs it, the client "MUST NOT transfer the message"; status 5.6.7.
            refusal = LocalVerdict(
                True, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {self.mx}"
            )
        elif ext.size_limit and txn.size > ext.size_limit:
            # RFC 1870 §6: the client should not send a message larger than the
            # server's declared fixed maximum; 5.3.4 "message too big for system".
            refusal = LocalVerdict(
                True,
                "5.3.4",
                f"message size {txn.size} exceeds size limit {ext.size_limit} of server {self.mx}",
            )
        if refusal is not None:
            result = TransactionResult(tuple((r, refusal) for r in txn.recipients), False)
            return [TransactionDone(result)]
        self._txn = _Txn(txn, [None] * len(txn.recipients))
        self.state = ClientState.TRANSACTION
        if ext.pipelining:
            # RFC 2920 §3.1: "RSET, MAIL FROM, SEND FROM, SOML FROM, SAML FROM,
            # and RCPT TO can all appear anywhere in a pipelined command group.
            # ... DATA ... can only appear as the last command in a group."
            if self.needs_rset:
                self._send(Cmd.RSET, b"RSET\r\n")
            self._send(Cmd.MAIL, self._mail_line(txn))
            for i, rcpt in enumerate(txn.recipients):
                self._send(Cmd.RCPT, _rcpt_line(rcpt), i)
            self._send(Cmd.DATA, b"DATA\r\n")
            self._txn.next_rcpt = len(txn.recipients)
        elif self.needs_rset:
            self._send(Cmd.RSET, b"RSET\r\n")
        else:
            self._send(Cmd.MAIL, self._mail_line(txn))
        self.needs_rset = False
        return []

    def send_body(self, chunk: bytes) -> bytes:
        """Dot-stuffed wire bytes for the next body chunk (stored form: CRLF lines)."""
        self._require(ClientState.BODY, "send_body")
        assert self._stuffer is not None
        return self._stuffer.feed(chunk)

    def end_body(self) -> bytes:
        """The last wire bytes of the body: a CRLF if missing, then ``.<CRLF>``."""
        self._require(ClientState.BODY, "end_body")
        assert self._stuffer is not None
        tail = self._stuffer.finish()
        self._stuffer = None
        self._expect.append((Cmd.DOT, 0))
        self.state = ClientState.DATA_END
        return tail

    def quit(self) -> bool:
        """Say goodbye (RFC 5321 §4.1.1.10) when idle; False when QUIT cannot be sent now.

        Only a session with nothing outstanding can QUIT politely; otherwise the
        transport just closes the connection.
        """
        if self.state is not ClientState.READY or self._expect:
            return False
        self._send(Cmd.QUIT, b"QUIT\r\n")
        self.state = ClientState.QUIT
        return True

    # --- reply dispatch ----------------------------------------------------------

    def _on_reply(self, reply: Reply) -> None:
        if not self._expect:
            # Unsolicited: typically "421 idle timeout" on a pooled connection.
            self._abort(reply, f"{self.mx or 'server'} closed the session: {reply}")
            return
        cmd, arg = self._expect.popleft()
        if reply.code == 421 and cmd is not Cmd.QUIT:
            # RFC 5321 §3.8: "the server ... MUST ... respond with a 421 ... and
            # close the transmission channel" — nothing more will be answered.
            self._abort(reply, f"{self.mx or 'server'} closed the session: {reply}")
            return
        handler = _TRANSITIONS.get((self.state, cmd))
        if handler is None:
            self._abort(None, f"internal: no transition for {self.state.name}/{cmd.name}")
            return
        handler(self, reply, arg)

    def _on_greeting(self, reply: Reply, _arg: int) -> None:
        if reply.code == 220:
            self._send(Cmd.EHLO, f"EHLO {self.hostname}\r\n".encode())
            self.state = ClientState.EHLO
        else:
            self._session_failed(reply, f"{self.mx} refused to talk to me: {reply}")

    def _on_ehlo(self, reply: Reply, _arg: int) -> None:
        if reply.code // 100 == 2:
            self.extensions = Extensions.parse(reply)
            self._after_hello()
        elif reply.code in _EHLO_FALLBACK_CODES:
            self.used_helo = True
            self._send(Cmd.HELO, f"HELO {self.hostname}\r\n".encode())
            self.state = ClientState.HELO
        else:
            self._session_failed(reply, f"{self.mx} refused EHLO: {reply}")

    def _on_helo(self, reply: Reply, _arg: int) -> None:
        if reply.code // 100 == 2:
            self.extensions = Extensions()
            self._after_hello()
        else:
            self._session_failed(reply, f"{self.mx} refused HELO: {reply}")

    def _after_hello(self) -> None:
        if (
            not self.tls_active
            and self.tls_policy is not TlsPolicy.DISABLED
            and self.extensions.starttls
        ):
            self._send(Cmd.STARTTLS, b"STARTTLS\r\n")
            self.state = ClientState.STARTTLS
            return
        if not self.tls_active and self.tls_policy is TlsPolicy.REQUIRED:
            self._session_failed(
                None, f"TLS required but not offered by {self.mx}", enhanced="4.7.4"
            )
            return
        self.state = ClientState.READY
        self._events.append(SessionReady(self.extensions, self.tls_active))

    def _on_starttls(self, reply: Reply, _arg: int) -> None:
        if reply.code == 220:
            self.state = ClientState.TLS_HANDSHAKE
            self._events.append(StartTls())
        elif self.tls_policy is TlsPolicy.REQUIRED:
            self._session_failed(
                reply, f"TLS required but STARTTLS refused by {self.mx}: {reply}", temporary=True
            )
        else:
            # RFC 3207 §4: after a 454 the client may go on without TLS.
            self.state = ClientState.READY
            self._events.append(SessionReady(self.extensions, self.tls_active))

    def _on_rset(self, reply: Reply, _arg: int) -> None:
        txn = self._txn_or_fail()
        txn.replied = True
        if reply.code // 100 != 2:
            txn.rset_failed = True
        if not self.extensions.pipelining:
            if txn.rset_failed:
                self._finish_with(LocalVerdict(False, "4.3.0", f"{self.mx} refused RSET: {reply}"))
                self.quit()
                return
            self._send(Cmd.MAIL, self._mail_line(txn.spec))

    def _on_mail(self, reply: Reply, _arg: int) -> None:
        txn = self._txn_or_fail()
        txn.replied = True
        if txn.rset_failed:
            return  # settled when the group ends (see _on_data)
        if reply.code // 100 == 2:
            txn.mail_ok = True
            if not self.extensions.pipelining:
                self._send(Cmd.RCPT, _rcpt_line(txn.spec.recipients[0]), 0)
                txn.next_rcpt = 1
            return
        # A rejected MAIL decides every recipient.
        txn.verdicts = [reply] * len(txn.verdicts)
        if not self.extensions.pipelining:
            self._end_transaction(needs_rset=True)

    def _on_rcpt(self, reply: Reply, index: int) -> None:
        txn = self._txn_or_fail()
        if txn.mail_ok and not txn.rset_failed:
            if reply.code // 100 == 2:
                txn.accepted.append(index)
            else:
                txn.verdicts[index] = reply
                txn.refused_at_rcpt.add(index)
        if self.extensions.pipelining:
            return
        if txn.next_rcpt < len(txn.spec.recipients):
            i = txn.next_rcpt
            self._send(Cmd.RCPT, _rcpt_line(txn.spec.recipients[i]), i)
            txn.next_rcpt = i + 1
        elif txn.accepted:
            self._send(Cmd.DATA, b"DATA\r\n")
        else:
            self._end_transaction(needs_rset=True)

    def _on_data(self, reply: Reply, _arg: int) -> None:
        txn = self._txn_or_fail()
        sendable = txn.mail_ok and not txn.rset_failed and txn.accepted
        if reply.code == 354 and not sendable:
            # RFC 2920 §3.1 makes a 354 without a valid recipient a server error;
            # end the (empty) content at once and ignore its reply, so nothing is
            # delivered and the session stays in step.
            self._send(Cmd.DOT, b".\r\n")
            return
        if txn.rset_failed:
            self._finish_with(LocalVerdict(False, "4.3.0", f"{self.mx} refused RSET"))
            self.quit()
            return
        if reply.code == 354:
            self._stuffer = DotStuffer()
            self.state = ClientState.BODY
            self._events.append(SendBody())
            return
        for i in txn.accepted:
            txn.verdicts[i] = reply
        self._end_transaction(needs_rset=True)

    def _on_dot(self, reply: Reply, _arg: int) -> None:
        txn = self._txn_or_fail()
        # RFC 5321 §4.1.1.4: the reply to the end of mail data decides every
        # recipient accepted in this transaction.
        for i in txn.accepted:
            txn.verdicts[i] = reply
        self._end_transaction(needs_rset=reply.code // 100 != 2)

    def _on_empty_dot(self, _reply: Reply, _arg: int) -> None:
        txn = self._txn_or_fail()
        if txn.rset_failed:
            self._finish_with(LocalVerdict(False, "4.3.0", f"{self.mx} refused RSET"))
            self.quit()
            return
        self._end_transaction(needs_rset=True)

    def _on_quit(self, reply: Reply, _arg: int) -> None:
        self.state = ClientState.CLOSED
        self._expect.clear()
        self._events.append(SessionClosed(reply, f"{self.mx} said goodbye: {reply}"))

    # --- helpers -----------------------------------------------------------------

    def _mail_line(self, txn: OutboundTransaction) -> bytes:
        ext = self.extensions
        params = ""
        if ext.size_limit is not None and txn.size > 0:
            params += f" SIZE={txn.size}"  # RFC 1870 §6
        if txn.body_8bit and ext.eightbitmime:
            params += " BODY=8BITMIME"  # RFC 6152 §3
        if txn.smtputf8:
            params += " SMTPUTF8"  # RFC 6531 §3.4
        return f"MAIL FROM:<{txn.sender}>{params}\r\n".encode()

    def _send(self, cmd: Cmd, line: bytes, arg: int = 0) -> None:
        self._out.append(line)
        self._expect.append((cmd, arg))

    def _require(self, state: ClientState, action: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"{action} in state {self.state.name}")

    def _txn_or_fail(self) -> _Txn:
        if self._txn is None:
            raise RuntimeError("transaction reply without a transaction")
        return self._txn

    def _take_events(self) -> list[ClientEvent]:
        events = self._events
        self._events = []
        return events

    def _end_transaction(self, *, needs_rset: bool) -> None:
        txn = self._txn_or_fail()
        self._txn = None
        self.needs_rset = needs_rset
        self.state = ClientState.READY
        verdicts = []
        for rcpt, verdict in zip(txn.spec.recipients, txn.verdicts, strict=True):
            # None is only possible if the server skipped a reply class.
            missing = LocalVerdict(False, "4.5.0", f"no reply from {self.mx} for {rcpt}")
            verdicts.append((rcpt, missing if verdict is None else verdict))
        result = TransactionResult(tuple(verdicts), txn.replied, frozenset(txn.refused_at_rcpt))
        self._events.append(TransactionDone(result))

    def _finish_with(self, verdict: LocalVerdict) -> None:
        txn = self._txn_or_fail()
        txn.verdicts = [verdict] * len(txn.verdicts)
        txn.refused_at_rcpt.clear()
        self._end_transaction(needs_rset=True)
        self._expect.clear()

    def _session_failed(
        self,
        reply: Reply | None,
        text: str,
        *,
        enhanced: str = "",
        temporary: bool = False,
    ) -> None:
        permanent = reply is not None and reply.code // 100 == 5 and not temporary
        status = enhanced or (reply.enhanced if reply is not None else "")
        if not status or status[0] != ("5" if permanent else "4"):
            status = "5.0.0" if permanent else "4.0.0"
        self._events.append(SessionFailed(reply, permanent, status, text))
        self._expect.clear()
        self.state = ClientState.READY  # so that quit() may be sent
        self.quit()

    def _abort(self, reply: Reply | None, text: str) -> None:
        """The session ends now: settle the open transaction and close."""
        txn = self._txn
        state = self.state
        self._expect.clear()
        self._stuffer = None
        if txn is not None:
            verdict: Verdict = reply if reply is not None else LocalVerdict(False, "4.4.2", text)
            for i, v in enumerate(txn.verdicts):
                if v is None:
                    txn.verdicts[i] = verdict
            txn.replied = txn.replied or reply is not None
            self._end_transaction(needs_rset=True)
        elif state in _SETUP_STATES:
            enhanced = (reply.enhanced if reply is not None else "") or "4.4.2"
            self._events.append(SessionFailed(reply, False, enhanced, text))
        self.state = ClientState.CLOSED
        self._events.append(SessionClosed(reply, text))


def _rcpt_line(rcpt: str) -> bytes:
    return f"RCPT TO:<{rcpt}>\r\n".encode()


_SETUP_STATES: Final = frozenset(
    {
        ClientState.GREETING,
        ClientState.EHLO,
        ClientState.HELO,
        ClientState.STARTTLS,
        ClientState.TLS_HANDSHAKE,
    }
)

_TRANSITIONS: Final[dict[tuple[ClientState, Cmd], Handler]] = {
    (ClientState.GREETING, Cmd.GREETING): SmtpClient._on_greeting,
    (ClientState.EHLO, Cmd.EHLO): SmtpClient._on_ehlo,
    (ClientState.HELO, Cmd.HELO): SmtpClient._on_helo,
    (ClientState.STARTTLS, Cmd.STARTTLS): SmtpClient._on_starttls,
    (ClientState.TRANSACTION, Cmd.RSET): SmtpClient._on_rset,
    (ClientState.TRANSACTION, Cmd.MAIL): SmtpClient._on_mail,
    (ClientState.TRANSACTION, Cmd.RCPT): SmtpClient._on_rcpt,
    (ClientState.TRANSACTION, Cmd.DATA): SmtpClient._on_data,
    (ClientState.TRANSACTION, Cmd.DOT): SmtpClient._on_empty_dot,
    (ClientState.DATA_END, Cmd.DOT): SmtpClient._on_dot,
    (ClientState.QUIT, Cmd.QUIT): SmtpClient._on_quit,
}
