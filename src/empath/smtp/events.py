"""What the sans-I/O server asks its transport to do, and the Received: trace line.

Events are slotted dataclasses returned by :class:`~empath.smtp.server.SmtpServer`
in the order they must be carried out (see that module's theory of operation).  The ones
made for every message (``Transaction``, ``BodyStart``, ``BodyChunk``,
``MessageComplete``, ``Close``, ``Check``) are not ``frozen``, against the house style: a
frozen dataclass sets each field through ``object.__setattr__``, which costs 0.9 µs per
``Transaction`` against 0.26 µs (compiled; issue 20).  Nothing changes an event once made:
treat every event as read-only.
The hottest also write their ``__init__`` out (``init=False``): mypyc runs a hand-
written one natively, ~60 ns, but builds any dataclass through the interpreted one
``dataclasses`` generates, ~190 ns (tests/unit/test_dataclass_inits.py checks each
against its fields).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from empath.smtp.sasl import Credentials

# --- events --------------------------------------------------------------------


@dataclass(slots=True, init=False)
class Transaction:
    """The envelope of the message being received."""

    sender: str
    recipients: tuple[str, ...]
    helo: str
    smtputf8: bool
    body_8bit: bool
    esmtp: bool  # EHLO (not HELO) was used
    tls: bool
    auth_user: str | None = None  # the SMTP AUTH user (DESIGN §13), None when anonymous

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(
        self,
        sender: str,
        recipients: tuple[str, ...],
        helo: str,
        smtputf8: bool,
        body_8bit: bool,
        esmtp: bool,
        tls: bool,
        auth_user: str | None = None,
    ) -> None:
        self.sender = sender
        self.recipients = recipients
        self.helo = helo
        self.smtputf8 = smtputf8
        self.body_8bit = body_8bit
        self.esmtp = esmtp
        self.tls = tls
        self.auth_user = auth_user

    @property
    def protocol(self) -> str:
        """RFC 3848 / RFC 6531 "with" keyword for the Received: header: ESMTP, then
        "S" for TLS and "A" for SMTP AUTH (ESMTPS, ESMTPA, ESMTPSA, UTF8SMTPSA)."""
        base = "UTF8SMTP" if self.smtputf8 else ("ESMTP" if self.esmtp else "SMTP")
        if self.tls:
            base += "S"
        if self.auth_user is not None:
            base += "A"
        return base


@dataclass(slots=True, init=False)
class BodyStart:
    """Open a spool body (and write the Received: header into it)."""

    transaction: Transaction

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(self, transaction: Transaction) -> None:
        self.transaction = transaction


@dataclass(slots=True, init=False)
class BodyChunk:
    data: bytes

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(frozen=True, slots=True)
class BodyAbort:
    """Discard the open body (message refused, transaction reset, session ended)."""


@dataclass(slots=True, init=False)
class MessageComplete:
    """Commit the body; answer with message_committed() or message_failed()."""

    transaction: Transaction

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(self, transaction: Transaction) -> None:
        self.transaction = transaction


@dataclass(frozen=True, slots=True)
class StartTls:
    """Upgrade the connection to TLS now, then call ``tls_started()`` (or close).  Both
    machines emit it: the server once its 220 to STARTTLS is written, the client
    (:mod:`empath.smtp.client`) once the server said 220."""


@dataclass(frozen=True, slots=True)
class AuthCheck:
    """Verify these credentials; answer with auth_succeeded() or auth_failed()."""

    credentials: Credentials


@dataclass(slots=True, init=False)
class Close:
    reason: str
    error: bool = False  # the session ended by error/timeout (for connection_error_rate)

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(self, reason: str, error: bool = False) -> None:
        self.reason = reason
        self.error = error


class CheckStage(enum.Enum):
    """The dialogue points where configured modules are asked (DESIGN §14)."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"


@dataclass(slots=True)
class Check:
    """Ask the modules about ``value`` (the HELO name, sender or recipient; "" at
    connect); answer with ``check_done(reply or None)``.  Only for the stages the
    server was built with."""

    stage: CheckStage
    value: str


Event = BodyStart | BodyChunk | BodyAbort | MessageComplete | StartTls | AuthCheck | Close | Check


def received_header(
    transaction: Transaction, *, client_ip: str, hostname: str, msg_id: str, date: str
) -> bytes:
    """RFC 5321 §4.4 trace line, folded one clause per line (each well under 998 octets).

    ``date`` is an RFC 5322 date-time supplied by the caller (this module reads no clock).
    """
    lit = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    helo = transaction.helo or "unknown"
    rcpt = transaction.recipients
    tail = f"\r\n\tfor <{rcpt[0]}>;" if len(rcpt) == 1 else ";"
    return (
        f"Received: from {helo} ([{lit}])\r\n"
        f"\tby {hostname} (Empath) with {transaction.protocol} id {msg_id}{tail}\r\n"
        f"\t{date}\r\n"
    ).encode("utf-8", "replace")
