"""The ESMTP dialogue's data, for the state machine in smtp/server.py.

What is here is read, never changed, by :class:`~empath.smtp.server.SmtpServer`: the
dialogue's states and input phases, in which states each verb is allowed (the
transition table), which replies count as the client's errors, the server's
settings, and the replies built once from them (greeting, EHLO keywords).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from empath.smtp.auth import AuthOffer
from empath.smtp.data import BodyError
from empath.smtp.parsing import Verb
from empath.smtp.replies import Reply

# RFC 5321 §4.5.3.1.4: "The maximum total length of a command line including the
# command word and the <CRLF> is 512 octets."
MAX_COMMAND_BYTES: Final = 512
MAX_BAD_COMMANDS: Final = 10
# Commands interpreted per receive_data()/proceed() call: enough for any honest pipelined
# transaction (RFC 2920 groups), small enough that one call's replies stay a few KiB.
MAX_COMMANDS_PER_TURN: Final = 100


class State(enum.Enum):
    FRESH = "fresh"  # connected (or TLS just started): no EHLO/HELO yet
    GREETED = "greeted"  # EHLO/HELO done, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    BDAT = "bdat"  # inside a BDAT transaction, between chunks
    REFUSED = "refused"  # a module refused the connection (554 greeting): only QUIT


class Phase(enum.Enum):
    COMMAND = "command"  # reading command lines
    DATA = "data"  # reading DATA content up to <CRLF>.<CRLF>
    BDAT = "bdat"  # reading the bytes of a BDAT chunk
    SKIP = "skip"  # draining the bytes of a refused BDAT chunk
    AUTH = "auth"  # reading a SASL response line (after a 334 challenge)
    WAITING = "waiting"  # waiting for the transport (commit, TLS handshake, AUTH check)
    CLOSED = "closed"


ANY: Final = frozenset(State) - {State.REFUSED}
IDLE: Final = frozenset({State.FRESH, State.GREETED})

# Transition table: the states in which each verb is accepted.
# RFC 5321 §4.1.4: "a client MUST issue HELO or EHLO before starting a mail
# transaction"; MAIL starts it, RCPT needs MAIL, DATA needs MAIL (and a recipient).
# RFC 3030 §2: BDAT is checked by its handler, since a refused chunk must still be
# read.  RFC 3207 §4: STARTTLS only outside a transaction.
ALLOWED: Final[dict[Verb, frozenset[State]]] = {
    Verb.HELO: ANY,
    Verb.EHLO: ANY,
    Verb.MAIL: frozenset({State.GREETED}),
    Verb.RCPT: frozenset({State.MAIL, State.RCPT}),
    Verb.DATA: frozenset({State.MAIL, State.RCPT}),
    Verb.BDAT: ANY,
    Verb.RSET: ANY,
    Verb.NOOP: ANY,
    Verb.QUIT: frozenset(State),
    Verb.VRFY: ANY,
    Verb.EXPN: ANY,
    Verb.HELP: ANY,
    Verb.STARTTLS: IDLE,
    # RFC 4954 §4: "The AUTH command is not permitted during a mail transaction."
    Verb.AUTH: frozenset({State.GREETED}),
}

# Replies that mean "the client speaks broken SMTP"; ten of them end the session.
# DESIGN §3: relay denials (554 5.7.1) count too, as Postfix's smtpd_hard_error_limit
# counts rejected RCPTs.  452 4.5.3 for a recipient past max_recipients does not: it
# tells a correct client to send the rest in a new transaction (RFC 5321
# §4.5.3.1.10), so counting it would turn a large mailing into a 421 and a lost
# transaction.  Only a session that keeps going past RECIPIENT_OVERSHOOT_LIMIT such
# recipients starts counting them (Postfix's smtpd_recipient_overshoot_limit).
BAD_COMMAND_CODES: Final = frozenset({500, 501, 502, 503, 504, 535, 553, 554, 555})
RECIPIENT_OVERSHOOT_LIMIT: Final = 1000


# --- settings -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str
    max_message_bytes: int
    max_recipients: int
    tls_available: bool  # a certificate is configured
    hop_limit: int  # more Received: fields than this → 554 5.4.6 (DESIGN §3)
    postmaster: str  # where RCPT TO:<postmaster> goes (the config's postmaster address)
    auth: AuthOffer | None = None  # SMTP AUTH offered (under TLS only); None on port 25


BODY_ERROR_REPLIES: Final[dict[BodyError, Reply]] = {
    # DESIGN §3: bare CR/LF (and NUL) → 550 5.6.0 after the real end of data.
    BodyError.BARE_LINE_ENDING: Reply.of(
        550, "5.6.0", "Message contains bare CR or LF (only CRLF line endings allowed)"
    ),
    BodyError.NUL: Reply.of(550, "5.6.0", "Message contains NUL characters"),
    # DESIGN §3: "Lines over 1000 octets ... get 500 5.5.2".
    BodyError.LINE_TOO_LONG: Reply.of(500, "5.5.2", "Line too long in message content"),
    BodyError.TOO_BIG: Reply.of(552, "5.3.4", "Message size exceeds fixed maximum message size"),
}


def reply_bytes(code: int, enhanced: str, text: str) -> bytes:
    return Reply.of(code, enhanced, text).to_bytes()


R_OK: Final = reply_bytes(250, "2.0.0", "Ok")
R_MAIL_OK: Final = reply_bytes(250, "2.1.0", "Ok")
R_RCPT_OK: Final = reply_bytes(250, "2.1.5", "Ok")
R_TOO_MANY_RCPTS: Final = reply_bytes(452, "4.5.3", "Too many recipients")
R_DATA_GO: Final = Reply(354, ("End data with <CR><LF>.<CR><LF>",)).to_bytes()
R_BYE: Final = reply_bytes(221, "2.0.0", "Bye")
R_LINE_TOO_LONG: Final = reply_bytes(500, "5.5.2", "Line too long")
R_TOO_MANY_ERRORS: Final = reply_bytes(421, "4.7.0", "Too many errors, closing connection")
R_TIMEOUT: Final = reply_bytes(421, "4.4.2", "Timeout exceeded, closing connection")
R_SHUTDOWN: Final = reply_bytes(421, "4.3.2", "Service shutting down, closing connection")
R_VRFY: Final = reply_bytes(
    252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"
)
R_HELP: Final = reply_bytes(
    214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT"
)
R_TLS_GO: Final = reply_bytes(220, "2.0.0", "Ready to start TLS")
# DESIGN §3 (Postfix's wording): a message that went through too many MTAs is a loop.
R_TOO_MANY_HOPS: Final = reply_bytes(554, "5.4.6", "Too many hops")


@dataclass(frozen=True, slots=True)
class Canned:
    greeting: bytes
    helo: bytes
    ehlo: bytes
    ehlo_tls: bytes  # when TLS is already active: no STARTTLS


_CANNED: dict[ServerConfig, Canned] = {}


def canned(cfg: ServerConfig) -> Canned:
    found = _CANNED.get(cfg)
    if found is None:
        keywords = [
            "PIPELINING",
            f"SIZE {cfg.max_message_bytes}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]
        tls = ["STARTTLS"] if cfg.tls_available else []
        auth = ["AUTH " + " ".join(cfg.auth.mechanisms)] if cfg.auth is not None else []
        found = Canned(
            greeting=Reply(220, (f"{cfg.hostname} ESMTP Empath",)).to_bytes(),
            helo=Reply(250, (cfg.hostname,)).to_bytes(),
            ehlo=Reply(250, (cfg.hostname, *keywords, *tls)).to_bytes(),
            # DESIGN §13: AUTH is advertised only once TLS protects the password.
            ehlo_tls=Reply(250, (cfg.hostname, *keywords, *auth)).to_bytes(),
        )
        if len(_CANNED) < 64:
            _CANNED[cfg] = found
    return found
