"""A milter behind Empath's module interface (DESIGN §14), speaking as Postfix does.

Per SMTP session one :class:`~empath.modules.milter.client.MilterConnection`,
opened at the session's first MAIL FROM: then OPTNEG, CONNECT and HELO (with their
macros) are sent, then MAIL.  Connecting at MAIL rather than at the TCP connect is
Postfix's ``smtpd_delay_reject`` in effect: a milter that is down or refuses the
connection answers the MAIL command (``on_error``), the SMTP session itself goes on
(the client may retry, RSET or QUIT).  A milter's refusal of CONNECT or HELO is
remembered and given to every MAIL of that session.

Per message: MAIL, each RCPT (a reject/tempfail refuses that recipient only), and at
end of data DATA, each header, EOH, the body in chunks of at most 65,535 octets
(stopped early on SMFIR_SKIP), then BODYEOB, whose reply may come after
modifications: add/insert/change header, add/delete recipient, replace body (and
change sender).  ``SMFIR_ACCEPT`` ends this milter's part in the message
(at CONNECT/HELO: in the whole session); ``SMFIR_DISCARD`` accepts the message and
throws it away; a message that ends without BODYEOB (RSET, all RCPTs refused) is
closed with ABORT before the next MAIL.

Timeouts: ``connect_secs`` for the TCP/Unix connect, ``command_secs`` for each
reply, ``end_of_message_secs`` for BODYEOB's.  Any failure breaks the connection
(it is not reused), counts ``empath_milter_errors_total{milter,kind}`` and raises,
so the host applies ``on_error``; the next MAIL opens a new connection.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

from empath.logs import get_logger
from empath.modules.api import (
    AddHeader,
    ChangeHeader,
    Changes,
    DeleteHeader,
    DeliveryEvent,
    HeaderChange,
    Message,
    OnError,
    Reply,
    Session,
)
from empath.modules.host import CONTINUE, CallTimeouts, Hook, ModuleStats, Verdict
from empath.modules.milter import codec
from empath.modules.milter.client import MilterConnection, MilterUnavailableError
from empath.modules.milter.codec import Cmd, Kind, Proto, Response

__all__ = ["MilterFilter"]

log = get_logger("modules", __name__)

_DEFAULT_TEXT = {
    Kind.REJECT: Reply(550, "5.7.1", "Command rejected"),
    Kind.TEMPFAIL: Reply(451, "4.7.1", "Service unavailable - try again later"),
}
_SHUTDOWN = Reply(421, "4.7.0", "Service unavailable - try again later")


@dataclass(slots=True)
class _State:
    conn: MilterConnection | None = None
    session_reply: Verdict | None = None  # CONNECT/HELO refused: every MAIL gets it
    session_done: bool = False  # accepted at CONNECT/HELO: nothing more this session
    message_done: bool = False  # accepted/discarded this message: skip the rest of it
    in_message: bool = False  # MAIL sent, no BODYEOB yet (ABORT before the next MAIL)
    extra: dict[str, Any] = field(default_factory=dict)


def _split_host(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


class MilterFilter:
    """See the module docstring."""

    kind: Literal["module", "milter"] = "milter"

    def __init__(
        self,
        label: str,
        address: str,
        timeouts: CallTimeouts,
        on_error: OnError,
        stats: ModuleStats,
        *,
        hostname: str,
    ) -> None:
        self.label = label
        self.address = address
        self.timeouts = timeouts
        self.on_error = on_error
        self.hooks = frozenset({Hook.MAIL, Hook.RCPT, Hook.DATA})
        self.immediate: frozenset[Hook] = frozenset()  # every call talks to the milter
        self._stats = stats
        self._hostname = hostname
        self.connected = 0  # sessions connected (for status)
        self._leadspc = False  # the last negotiation asked for SMFIP_HDR_LEADSPC
        self.last_error = ""

    def budget(self, hook: Hook) -> float:
        t = self.timeouts
        if hook is Hook.MAIL:  # connect, OPTNEG, CONNECT, HELO, MAIL
            return t.connect_secs + 4 * t.command_secs
        if hook is Hook.DATA:  # DATA, headers, EOH, body: per reply; then BODYEOB
            return t.end_of_message_secs + 4 * t.command_secs
        return t.command_secs

    # -- per-session state ----------------------------------------------------------

    def _state(self, session: Session) -> _State:
        st = session.private.get(id(self))
        if st is None:
            st = session.private[id(self)] = _State()
        assert isinstance(st, _State)
        return st

    def _fail(self, st: _State, exc: MilterUnavailableError) -> MilterUnavailableError:
        self._stats.milter_error(self.label, exc.kind)
        self.last_error = str(exc)
        if st.conn is not None:
            st.conn.abort()
        st.conn = None
        st.in_message = False
        return exc

    async def _open(self, session: Session, st: _State) -> MilterConnection:
        conn = MilterConnection()
        t = self.timeouts
        neg = await conn.open(self.address, t.connect_secs, t.command_secs)
        self._leadspc = bool(neg.protocol & Proto.HDR_LEADSPC)
        self.connected += 1
        st.conn = conn
        ip = session.peer_ip
        conn_macros = {
            "j": self._hostname,
            "_": f"unknown [{ip}]",
            "{daemon_name}": session.listener,
            "{daemon_addr}": "",
            "v": "Empath",
            "{client_addr}": ip,
            "{client_name}": "unknown",
            "{client_port}": str(session.peer_port),
        }
        if not neg.skips(Cmd.CONNECT):
            replies = await conn.step(
                codec.macros(Cmd.CONNECT, conn_macros)
                + codec.connect("unknown", ip, session.peer_port),
                Cmd.CONNECT,
                t.command_secs,
            )
            if self._session_level(st, replies):
                return conn
        if not neg.skips(Cmd.HELO) and session.helo:
            tls = {"{tls_version}": "TLS" if session.tls else ""}
            replies = await conn.step(
                codec.macros(Cmd.HELO, tls) + codec.helo(session.helo), Cmd.HELO, t.command_secs
            )
            self._session_level(st, replies)
        return conn

    def _session_level(self, st: _State, replies: list[Response]) -> bool:
        """CONNECT/HELO's answer: True when the milter is done with this session."""
        verdict, _ = self._verdict(replies)
        if verdict.reply is not None and verdict.reply.code >= 400:
            st.session_reply = verdict
            return True
        if verdict.accepted:
            st.session_done = True
            return True
        return False

    # -- hooks ----------------------------------------------------------------------

    async def stage(self, hook: Hook, session: Session, arg: str) -> Verdict:
        st = self._state(session)
        try:
            if hook is Hook.MAIL:
                return await self._mail(session, st, arg)
            if hook is Hook.RCPT:
                return await self._rcpt(session, st, arg)
        except MilterUnavailableError as exc:
            raise self._fail(st, exc) from None
        except codec.MilterProtocolError as exc:
            raise self._fail(st, MilterUnavailableError("protocol", str(exc))) from None
        except asyncio.CancelledError:  # the host's deadline: the conversation is lost
            self._fail(st, MilterUnavailableError("timeout", "call cancelled at its deadline"))
            raise
        return CONTINUE

    async def _mail(self, session: Session, st: _State, sender: str) -> Verdict:
        st.message_done = False
        if st.conn is not None and st.in_message:
            st.conn.send(codec.encode(Cmd.ABORT))  # no reply to ABORT
            st.in_message = False
        if st.conn is None and st.session_reply is None and not st.session_done:
            await self._open(session, st)
        if st.session_reply is not None:
            return st.session_reply
        conn = st.conn
        if st.session_done or conn is None:
            return CONTINUE
        assert conn.negotiated is not None
        st.in_message = True
        if conn.negotiated.skips(Cmd.MAIL):
            return CONTINUE
        mail_macros = {
            "{auth_authen}": session.auth_user or "",
            "{mail_addr}": sender,
            "{mail_host}": _split_host(sender),
            "{mail_mailer}": "smtp",
        }
        replies = await conn.step(
            codec.macros(Cmd.MAIL, mail_macros) + codec.mail(sender), Cmd.MAIL,
            self.timeouts.command_secs,
        )  # fmt: skip
        return self._message_level(st, replies)

    async def _rcpt(self, session: Session, st: _State, recipient: str) -> Verdict:
        conn = st.conn
        if conn is None or st.message_done or st.session_done:
            return CONTINUE
        assert conn.negotiated is not None
        if conn.negotiated.skips(Cmd.RCPT):
            return CONTINUE
        rcpt_macros = {
            "{rcpt_addr}": recipient,
            "{rcpt_host}": _split_host(recipient),
            "{rcpt_mailer}": "smtp",
        }
        replies = await conn.step(
            codec.macros(Cmd.RCPT, rcpt_macros) + codec.rcpt(recipient), Cmd.RCPT,
            self.timeouts.command_secs,
        )  # fmt: skip
        verdict, _ = self._verdict(replies)
        if verdict.accepted or verdict.discard:
            st.message_done = True
        return verdict

    def _message_level(self, st: _State, replies: list[Response]) -> Verdict:
        verdict, _ = self._verdict(replies)
        if verdict.accepted or verdict.discard:
            st.message_done = True
        return verdict

    async def data(self, session: Session, message: Message) -> Verdict:
        st = self._state(session)
        conn = st.conn
        if conn is None or st.message_done or st.session_done:
            return CONTINUE
        try:
            return await self._end_of_data(session, st, conn, message)
        except MilterUnavailableError as exc:
            raise self._fail(st, exc) from None
        except codec.MilterProtocolError as exc:
            raise self._fail(st, MilterUnavailableError("protocol", str(exc))) from None
        except asyncio.CancelledError:
            self._fail(st, MilterUnavailableError("timeout", "call cancelled at its deadline"))
            raise

    async def _end_of_data(
        self, session: Session, st: _State, conn: MilterConnection, message: Message
    ) -> Verdict:
        neg = conn.negotiated
        assert neg is not None
        t = self.timeouts.command_secs
        qid = {"i": str(session.notes.get("empath.queue_id", ""))}
        early = self._early(
            await conn.step(codec.macros(Cmd.DATA, qid) + codec.encode(Cmd.DATA), Cmd.DATA, t)
            if not neg.skips(Cmd.DATA)
            else []
        )
        if early is not None:
            return self._finish(st, early)
        if not neg.skips(Cmd.HEADER):
            leadspc = bool(neg.protocol & Proto.HDR_LEADSPC)
            for name, value in message.headers:
                # Postfix sends folded values with LF line breaks, as Sendmail does.
                sent = value.replace("\r\n", "\n")
                packet = codec.header(name, (" " + sent) if leadspc else sent)
                early = self._early(await conn.step(packet, Cmd.HEADER, t))
                if early is not None:
                    return self._finish(st, early)
        if not neg.skips(Cmd.EOH):
            early = self._early(
                await conn.step(codec.macros(Cmd.EOH, qid) + codec.encode(Cmd.EOH), Cmd.EOH, t)
            )
            if early is not None:
                return self._finish(st, early)
        if not neg.skips(Cmd.BODY):
            for chunk in codec.body_chunks(message.body):
                replies = await conn.step(chunk, Cmd.BODY, t)
                if replies and replies[-1].kind is Kind.SKIP:
                    break
                early = self._early(replies)
                if early is not None:
                    return self._finish(st, early)
        conn.send(codec.macros(Cmd.BODYEOB, qid) + codec.encode(Cmd.BODYEOB))
        replies = await conn.replies(self.timeouts.end_of_message_secs)
        st.in_message = False
        verdict, changes = self._verdict(replies)
        if changes and verdict.reply is None and not verdict.discard:
            return Verdict(changes=changes, accepted=verdict.accepted)
        return verdict

    def _early(self, replies: list[Response]) -> Verdict | None:
        """A reply before BODYEOB that ends the message (anything but continue/skip)."""
        if not replies or replies[-1].kind in (Kind.CONTINUE, Kind.SKIP):
            return None
        verdict, _ = self._verdict(replies)
        return verdict

    def _finish(self, st: _State, verdict: Verdict) -> Verdict:
        if st.conn is not None and st.in_message:
            st.conn.send(codec.encode(Cmd.ABORT))
        st.in_message = False
        st.message_done = True
        return verdict

    def _verdict(self, replies: list[Response]) -> tuple[Verdict, Changes | None]:
        """Final reply → Verdict; modifications before it → Changes."""
        headers: list[HeaderChange] = []
        add_rcpt: list[str] = []
        del_rcpt: list[str] = []
        body: list[bytes] = []
        for reply in replies[:-1] if replies else ():
            r = reply
            k = r.kind
            if self._leadspc and k in (Kind.ADDHEADER, Kind.INSHEADER, Kind.CHGHEADER):
                # SMFIP_HDR_LEADSPC: the value carries its own leading space, which
                # our "Name: value" rendering supplies
                value = r.args[1]
                r = Response(k, (r.args[0], value[1:] if value[:1] == " " else value), r.index)
            if k is Kind.ADDHEADER:
                headers.append(AddHeader(r.args[0], r.args[1].replace("\n", "\r\n")))
            elif k is Kind.INSHEADER:
                headers.append(AddHeader(r.args[0], r.args[1].replace("\n", "\r\n"), r.index))
            elif k is Kind.CHGHEADER:
                if r.args[1]:
                    value = r.args[1].replace("\n", "\r\n")
                    headers.append(ChangeHeader(r.args[0], value, max(1, r.index)))
                else:  # an empty value deletes the field
                    headers.append(DeleteHeader(r.args[0], max(1, r.index)))
            elif k in (Kind.ADDRCPT, Kind.ADDRCPT_PAR):
                add_rcpt.append(r.args[0].strip("<>"))
            elif k is Kind.DELRCPT:
                del_rcpt.append(r.args[0].strip("<>"))
            elif k is Kind.REPLBODY:
                body.append(r.data)
            else:  # CHGFROM, QUARANTINE, SETSYMLIST: not acted on, said so
                log.info("Milter request not supported, ignored", milter=self.label,
                         request=k.name)  # fmt: skip
        changes = Changes(tuple(headers), tuple(add_rcpt), tuple(del_rcpt),
                          b"".join(body) if body else None)  # fmt: skip
        if not replies:
            return CONTINUE, changes or None
        final = replies[-1]
        kind = final.kind
        if kind is Kind.REPLYCODE:
            code, enhanced, text = codec.parse_replycode(final.args[0])
            return Verdict(Reply(code, enhanced, text)), changes or None
        if kind in _DEFAULT_TEXT:
            return Verdict(_DEFAULT_TEXT[kind]), changes or None
        if kind is Kind.ACCEPT:
            return Verdict(accepted=True, changes=changes or None), changes or None
        if kind is Kind.DISCARD:
            return Verdict(discard=True), None
        if kind in (Kind.SHUTDOWN, Kind.CONN_FAIL):
            return Verdict(_SHUTDOWN), None
        return Verdict(changes=changes or None), changes or None

    async def delivery(self, event: DeliveryEvent) -> None:
        return None

    def now(self, hook: Hook, session: Session | None, arg: Any) -> Verdict:
        raise NotImplementedError("every milter call talks to the milter")  # immediate: none

    async def session_closed(self, session: Session) -> None:
        st = session.private.pop(id(self), None)
        if isinstance(st, _State) and st.conn is not None:
            await st.conn.close()

    async def close(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"address": self.address, "sessions": self.connected}
