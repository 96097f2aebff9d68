"""The types a Python module sees (DESIGN §14); ``empath.modules`` re-exports them.

A module is any object with one or more of these coroutine methods (all optional):

* ``on_connect(session)`` — a client connected, before the greeting;
* ``on_helo(session, helo)`` — HELO/EHLO, before its 250;
* ``on_mail_from(session, sender)`` — MAIL FROM (``""`` is the null sender);
* ``on_rcpt_to(session, recipient)`` — each RCPT TO, before its 250;
* ``on_data(session, message)`` — the complete message, before the spool commit;
* ``on_delivery_event(event)`` — a delivery unit was delivered, deferred or failed.

A stage hook returns ``None`` (carry on), a :class:`Reply` (2xx: accept this stage
now, later modules are not asked; 4xx: tempfail; 5xx: reject) or, from ``on_data``,
:class:`Changes` (carry on with these header edits).  What ``on_delivery_event``
returns is ignored.  docs/MODULES.md is the operator's and author's guide.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

OnError = Literal["tempfail", "accept", "reject"]
"""What a module's timeout, exception or an unreachable milter means (``on_error``)."""

__all__ = [
    "AddHeader",
    "ChangeHeader",
    "Changes",
    "DeleteHeader",
    "DeliveryEvent",
    "HeaderChange",
    "Message",
    "Reply",
    "Session",
]


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP answer: ``Reply(550, "5.7.1", "not this one")``.

    ``enhanced`` (RFC 3463) may be ``""``; when given its class must match the code's
    (``5.x.x`` with ``5yz``).  ``text`` may hold several lines separated by ``\\n``."""

    code: int
    enhanced: str = ""
    text: str = ""

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"Reply code {self.code} is not between 200 and 599")
        if self.enhanced:
            parts = self.enhanced.split(".")
            if (
                len(parts) != 3
                or not all(p.isdigit() for p in parts)
                or parts[0] != str(self.code)[0]
            ):
                raise ValueError(
                    f"enhanced status {self.enhanced!r} does not fit reply code {self.code}"
                )
        if "\r" in self.text:
            raise ValueError("Reply text must not contain CR")

    @property
    def is_accept(self) -> bool:
        return self.code < 400

    @property
    def is_tempfail(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_reject(self) -> bool:
        return self.code >= 500


@dataclass(frozen=True, slots=True)
class AddHeader:
    """Add ``name: value``.  ``index`` None appends after the last header field;
    ``0`` puts it first, ``n`` before the n-th field (0-based, as the milter's
    "insert header")."""

    name: str
    value: str
    index: int | None = None


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Replace the value of the ``occurrence``-th (1-based) field called ``name``
    (case-insensitive); if there is no such field, it is added at the end."""

    name: str
    value: str
    occurrence: int = 1


@dataclass(frozen=True, slots=True)
class DeleteHeader:
    """Delete the ``occurrence``-th (1-based) field called ``name``; ``0`` deletes
    every field of that name.  A missing field is not an error."""

    name: str
    occurrence: int = 0


HeaderChange = AddHeader | ChangeHeader | DeleteHeader


@dataclass(frozen=True, slots=True)
class Changes:
    """What ``on_data`` (or a milter) changes before the message is spooled.

    Python modules normally give ``headers`` only; the recipient and body changes are
    what milters may ask for, applied the same way."""

    headers: tuple[HeaderChange, ...] = ()
    add_recipients: tuple[str, ...] = ()
    delete_recipients: tuple[str, ...] = ()
    body: bytes | None = None  # the new body (CRLF line endings), replacing the old one
    sender: str | None = None  # a new envelope sender (a milter's "change from")

    def __bool__(self) -> bool:
        return bool(
            self.headers
            or self.add_recipients
            or self.delete_recipients
            or self.body is not None
            or self.sender is not None
        )


class Session:
    """What a module knows about one SMTP connection.  Empath updates the fields as
    the dialogue goes on; modules read them and must not assign them.  ``notes`` is
    the modules' own scratch space for this connection (key it by your module's name)."""

    __slots__ = (
        "auth_user",
        "helo",
        "id",
        "listener",
        "notes",
        "peer_ip",
        "peer_port",
        "private",
        "recipients",
        "sender",
        "tls",
        "trusted",
    )

    def __init__(
        self,
        *,
        id: str,
        peer_ip: str,
        peer_port: int,
        listener: str,
        trusted: bool = False,
    ) -> None:
        self.id = id  # a per-connection id, in the logs as session_id
        self.peer_ip = peer_ip
        self.peer_port = peer_port
        self.listener = listener  # the listener's label (name or host:port)
        self.trusted = trusted  # the client is in relay.trusted_networks
        self.helo = ""  # the HELO/EHLO argument, "" before it
        self.tls = False  # TLS is active on the connection
        self.auth_user: str | None = None  # the authenticated user (SMTP AUTH), if any
        self.sender: str | None = None  # MAIL FROM of the transaction in progress ("" = <>)
        self.recipients: tuple[str, ...] = ()  # recipients accepted so far
        self.notes: dict[str, Any] = {}
        self.private: dict[object, Any] = {}  # Empath's own per-module state (milter connections)

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.peer_ip}:{self.peer_port} helo={self.helo!r}>"


@dataclass(frozen=True, slots=True)
class Message:
    """The complete message at end of data, as it will be spooled, Empath's own
    ``Received:`` field first.  ``headers`` are ``(name, value)`` in order; a value
    keeps its folding (CRLF + white space) but not the final CRLF."""

    sender: str
    recipients: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first field called ``name`` (case-insensitive), or None."""
        low = name.lower()
        for key, value in self.headers:
            if key.lower() == low:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        low = name.lower()
        return [value for key, value in self.headers if key.lower() == low]

    def stream(self) -> BinaryIO:
        """The body as a binary stream (for parsers that read files)."""
        return io.BytesIO(self.body)


DeliveryKind = Literal["delivered", "deferred", "failed"]


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    """One delivery unit's outcome (a message's recipients at one domain)."""

    kind: DeliveryKind
    message_id: str
    domain: str
    sender: str
    recipients: tuple[str, ...]
    attempt: int
    detail: str = ""  # the remote reply or the error, as in `queue view`
    extra: dict[str, Any] = field(default_factory=dict)
