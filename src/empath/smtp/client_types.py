"""The sans-I/O SMTP client's vocabulary: its states and commands, what a
transaction asks for, the verdicts and results it gives, and the events it emits.

:class:`~empath.smtp.client.SmtpClient` (and its transition table) produces
these; the transport and the delivery code consume them.  ``empath.smtp.client``
re-exports every name, so callers import them from there.

Not frozen, against the house style: ``OutboundTransaction``, ``LocalVerdict``,
``TransactionResult``, ``SendBody`` and ``TransactionDone`` (one of each per relayed
message). Why, and what stands in for frozen: DESIGN §15.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from empath.smtp.events import StartTls
from empath.smtp.replies import Reply


class ClientState(enum.Enum):
    # Members are singletons: identity hashing is correct and much cheaper than
    # Enum's name hashing (these key the transition table on every reply).
    __hash__ = object.__hash__

    GREETING = "greeting"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    TLS_HANDSHAKE = "tls_handshake"
    READY = "ready"
    TRANSACTION = "transaction"
    BODY = "body"
    DATA_END = "data_end"
    QUIT = "quit"
    CLOSED = "closed"


class Cmd(enum.Enum):
    """What an outstanding reply answers (also the phase for per-phase timeouts)."""

    __hash__ = object.__hash__  # see ClientState

    GREETING = "greeting"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    RSET = "rset"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    DOT = "dot"  # end of message content
    QUIT = "quit"


class TlsPolicy(enum.Enum):
    DISABLED = "disabled"  # never STARTTLS (used for the plaintext fallback)
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered; plaintext otherwise
    REQUIRED = "required"  # no STARTTLS → the session fails (temporarily)


@dataclass(frozen=True, slots=True)
class Extensions:
    """What the server's EHLO reply offered (RFC 5321 §4.1.1.1)."""

    pipelining: bool = False
    size_limit: int | None = None  # None: SIZE not offered; 0: offered without a limit
    eightbitmime: bool = False
    smtputf8: bool = False
    starttls: bool = False
    enhancedstatuscodes: bool = False
    chunking: bool = False
    keywords: tuple[str, ...] = ()  # every keyword line, upper-cased, as sent

    @classmethod
    def parse(cls, reply: Reply) -> Extensions:
        """Read the keyword lines (every line but the first, which names the server)."""
        flags: dict[str, bool] = {}
        size_limit: int | None = None
        keywords: list[str] = []
        for line in reply.lines[1:]:
            words = line.split()
            if not words:
                continue
            keyword = words[0].upper()
            keywords.append(" ".join([keyword, *words[1:]]))
            if keyword == "SIZE":
                # RFC 1870 §4: "size-param ::= [1*DIGIT]"; 0 or absent means no fixed limit.
                size_limit = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
            else:
                flags[keyword] = True
        return cls(
            pipelining=flags.get("PIPELINING", False),
            size_limit=size_limit,
            eightbitmime=flags.get("8BITMIME", False),
            smtputf8=flags.get("SMTPUTF8", False),
            starttls=flags.get("STARTTLS", False),
            enhancedstatuscodes=flags.get("ENHANCEDSTATUSCODES", False),
            chunking=flags.get("CHUNKING", False),
            keywords=tuple(keywords),
        )


@dataclass(slots=True, init=False, unsafe_hash=True)  # not frozen: see the module doc
class OutboundTransaction:
    """One message to send: envelope plus the facts that choose MAIL parameters."""

    sender: str  # "" is the null sender
    recipients: tuple[str, ...]
    size: int = 0  # body bytes (for SIZE=)
    body_8bit: bool = False
    smtputf8: bool = False

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(
        self,
        sender: str,
        recipients: tuple[str, ...],
        size: int = 0,
        body_8bit: bool = False,
        smtputf8: bool = False,
    ) -> None:
        self.sender = sender
        self.recipients = recipients
        self.size = size
        self.body_8bit = body_8bit
        self.smtputf8 = smtputf8


@dataclass(slots=True, init=False, unsafe_hash=True)  # not frozen: see the module doc
class LocalVerdict:
    """A recipient decided without a remote reply (network loss, SMTPUTF8 missing ...)."""

    permanent: bool
    enhanced: str
    text: str

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(self, permanent: bool, enhanced: str, text: str) -> None:
        self.permanent = permanent
        self.enhanced = enhanced
        self.text = text


Verdict = Reply | LocalVerdict


@dataclass(slots=True, init=False, unsafe_hash=True)  # not frozen: see the module doc
class TransactionResult:
    """Per-recipient verdicts, in the order the recipients were given."""

    verdicts: tuple[tuple[str, Verdict], ...]
    replied: bool  # the server answered at least one command of this transaction
    # Indexes (into ``verdicts``) of recipients refused by the reply to their own RCPT:
    # one mailbox's answer, which says nothing about the destination as a whole.
    refused_at_rcpt: frozenset[int] = frozenset()

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(
        self,
        verdicts: tuple[tuple[str, Verdict], ...],
        replied: bool,
        refused_at_rcpt: frozenset[int] = frozenset(),
    ) -> None:
        self.verdicts = verdicts
        self.replied = replied
        self.refused_at_rcpt = refused_at_rcpt

    def delivered(self) -> tuple[str, ...]:
        return tuple(a for a, v in self.verdicts if isinstance(v, Reply) and v.code // 100 == 2)


# --- events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionReady:
    """Greeting, EHLO (and STARTTLS) done: transactions may start."""

    extensions: Extensions
    tls_active: bool


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see the module doc
class SendBody:
    """354 received: stream the body through send_body() and end_body()."""


@dataclass(slots=True, init=False, unsafe_hash=True)  # not frozen: see the module doc
class TransactionDone:
    result: TransactionResult

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(self, result: TransactionResult) -> None:
        self.result = result


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """The session could not be set up; the connection is to be closed.

    ``reply`` is the remote reply that failed it (None for a local decision such
    as "TLS required but not offered").
    """

    reply: Reply | None
    permanent: bool
    enhanced: str
    text: str


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The connection is finished (QUIT answered, 421, or lost)."""

    reply: Reply | None
    text: str


ClientEvent = SessionReady | StartTls | SendBody | TransactionDone | SessionFailed | SessionClosed
