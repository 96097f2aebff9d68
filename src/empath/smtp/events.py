"""What the sans-I/O server asks its transport to do, and the Received: trace line.

Events are slotted dataclasses returned by :class:`~empath.smtp.server.SmtpServer`
in the order they must be carried out (see that module's theory of operation).  The ones
made for every message (``Transaction``, ``BodyStart``, ``BodyChunk``,
``MessageComplete``, ``Close``, ``Check``) are not ``frozen``, against the house style: a
frozen dataclass sets each field through ``object.__setattr__``, which costs 0.9 µs per
``Transaction`` against 0.26 µs (compiled; issue 20).  Nothing changes an event once made:
treat every event as read-only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from empath.smtp.sasl import Credentials

# --- events --------------------------------------------------------------------


@dataclass(slots=True)
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


@dataclass(slots=True)
class BodyStart:
    """Open a spool body (and write the Received: header into it)."""

    transaction: Transaction


@dataclass(slots=True)
class BodyChunk:
    data: bytes


@dataclass(frozen=True, slots=True)
class BodyAbort:
    """Discard the open body (message refused, transaction reset, session ended)."""


@dataclass(slots=True)
class MessageComplete:
    """Commit the body; answer with message_committed() or message_failed()."""

    transaction: Transaction


@dataclass(frozen=True, slots=True)
class StartTls:
    """Upgrade the connection to TLS now, then call ``tls_started()`` (or close).  Both
    machines emit it: the server once its 220 to STARTTLS is written, the client
    (:mod:`empath.smtp.client`) once the server said 220."""


@dataclass(frozen=True, slots=True)
class AuthCheck:
    """Verify these credentials; answer with auth_succeeded() or auth_failed()."""

    credentials: Credentials


@dataclass(slots=True)
class Close:
    reason: str
    error: bool = False  # the session ended by error/timeout (for connection_error_rate)


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
