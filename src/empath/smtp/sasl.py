"""SMTP AUTH exchanges (RFC 4954) for the PLAIN (RFC 4616) and LOGIN mechanisms, sans-I/O.

Theory of operation
-------------------
``AUTH <mechanism> [initial-response]`` starts one :class:`SaslExchange`.  Each step
returns either a :class:`Challenge` (the server sends ``334 <base64>`` and reads one
response line) or the :class:`Credentials` the client proved nothing about yet: the
server state machine hands those to its transport, which verifies them off the event
loop and answers with ``auth_succeeded`` / ``auth_failed``.

The steps are data (``_STEPS``): for each mechanism, the challenges to send in order
and which field each response fills.

* PLAIN, RFC 4616 §2: ``message = [authzid] UTF8NUL authcid UTF8NUL passwd``, in one
  response (the initial response, or the answer to an empty ``334 `` challenge).
* LOGIN (draft-murchison-sasl-login): the server asks ``Username:`` then
  ``Password:``; an initial response, when sent, is the user name.

We do not act for anyone else: an authorization identity other than the
authentication identity is refused like bad credentials (RFC 4616 §2: the server
"MUST verify that the authcid is allowed to act as the authzid"; nobody is).

:class:`UserGrant` is what a successful AUTH gives the session: the user, the sender
patterns it owns (DESIGN §13) and its per-message recipient quota.  Matching is pure.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from empath.errors import SmtpProtocolError
from empath.smtp.replies import Reply

__all__ = [
    "MAX_RESPONSE_BYTES",
    "AuthOutcome",
    "Challenge",
    "Credentials",
    "Mechanism",
    "SaslExchange",
    "UserGrant",
    "sender_matches",
]

# RFC 4954 §4 lets a server bound a SASL response line; 12288 octets is the size
# the RFC names for the longest line a server should accept for it.
MAX_RESPONSE_BYTES: Final = 12288


class Mechanism(enum.Enum):
    PLAIN = "PLAIN"
    LOGIN = "LOGIN"


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``334 <text>`` (``text`` already base64) and read one response line."""

    text: str


@dataclass(frozen=True, slots=True)
class Credentials:
    mechanism: Mechanism
    username: str
    password: str = field(repr=False)  # never in a log line or a repr


class _Field(enum.Enum):
    PLAIN_MESSAGE = "plain"  # authzid NUL authcid NUL passwd
    USERNAME = "username"
    PASSWORD = "password"  # noqa: S105 (a field name, not a secret)


# mechanism → the fields its responses fill, in order, each with the challenge that
# asks for it when no initial response supplied it.
_STEPS: Final[dict[Mechanism, tuple[tuple[_Field, str], ...]]] = {
    Mechanism.PLAIN: ((_Field.PLAIN_MESSAGE, ""),),
    Mechanism.LOGIN: (
        (_Field.USERNAME, base64.b64encode(b"Username:").decode()),
        (_Field.PASSWORD, base64.b64encode(b"Password:").decode()),
    ),
}


def _bad(code: int, enhanced: str, text: str) -> SmtpProtocolError:
    return SmtpProtocolError(code, enhanced, text)


def _decode(text: str) -> str:
    """RFC 4954 §4: a response that is not valid base64 → 501 5.5.2."""
    if text == "=":  # RFC 4954 §4: "=" is an empty initial response
        return ""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raise _bad(501, "5.5.2", "Cannot decode response") from None


def _invalid() -> SmtpProtocolError:
    # The same words as a wrong password: a malformed exchange tells nothing either.
    return _bad(535, "5.7.8", "Authentication credentials invalid")


class SaslExchange:
    """One AUTH exchange; see module doc."""

    __slots__ = ("_mechanism", "_step", "_values")

    def __init__(self, mechanism: Mechanism) -> None:
        self._mechanism = mechanism
        self._step = 0
        self._values: dict[_Field, str] = {}

    @staticmethod
    def mechanism_of(word: str, offered: tuple[str, ...]) -> Mechanism:
        name = word.upper()
        if name not in offered:
            # RFC 4954 §6: "504 5.5.4 Unrecognized authentication type"
            raise _bad(504, "5.5.4", "Unrecognized authentication type")
        return Mechanism(name)

    def start(self, initial: str | None) -> Challenge | Credentials:
        """The AUTH command itself; ``initial`` is its optional initial response."""
        if initial is None:
            return Challenge(_STEPS[self._mechanism][0][1])
        return self.respond(initial)

    def respond(self, line: str) -> Challenge | Credentials:
        """One client response line (base64, or ``*`` to cancel)."""
        if line == "*":
            # RFC 4954 §4: "If the client wishes to cancel the authentication exchange,
            # it issues a line with a single '*'.  If the server receives such a
            # response, it MUST reject the AUTH command by sending a 501 reply."
            raise _bad(501, "5.0.0", "Authentication cancelled")
        steps = _STEPS[self._mechanism]
        fld = steps[self._step][0]
        self._values[fld] = _decode(line)
        self._step += 1
        if self._step < len(steps):
            return Challenge(steps[self._step][1])
        return self._credentials()

    def _credentials(self) -> Credentials:
        if self._mechanism is Mechanism.PLAIN:
            parts = self._values[_Field.PLAIN_MESSAGE].split("\0")
            if len(parts) != 3:
                raise _invalid()
            authzid, user, password = parts
            # RFC 4616 §2: authcid and passwd are non-empty.
            if not user or not password or (authzid and authzid != user):
                raise _invalid()
            return Credentials(Mechanism.PLAIN, user, password)
        user = self._values[_Field.USERNAME]
        password = self._values[_Field.PASSWORD]
        if not user or not password:
            raise _invalid()
        return Credentials(Mechanism.LOGIN, user, password)


# --- what a successful AUTH grants -------------------------------------------------


def sender_matches(pattern: str, address: str) -> bool:
    """``alice@example.org`` matches itself; ``*@example.org`` any local part at that
    domain.  Compared case-insensitively (what people type in mail programs varies)."""
    p = pattern.lower()
    a = address.lower()
    if p.startswith("*@"):
        at = a.rfind("@")
        return at > 0 and a[at + 1 :] == p[2:]
    return p == a


def _no_quota() -> SmtpProtocolError | None:
    return None


@dataclass(frozen=True, slots=True)
class UserGrant:
    """What the session may do once ``user`` authenticated (DESIGN §13)."""

    user: str
    senders: tuple[str, ...]
    null_sender: bool = False  # may send with MAIL FROM:<> (DSNs of its own)
    max_recipients: int = 0  # per message; 0 = the listener's max_recipients
    # called at MAIL: an error (the hourly message quota is spent) or None
    admit_message: Callable[[], SmtpProtocolError | None] = field(
        default=_no_quota, compare=False, repr=False
    )

    def owns(self, address: str) -> bool:
        if not address:
            return self.null_sender
        return any(sender_matches(p, address) for p in self.senders)


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """The transport's verdict on :class:`Credentials`: a grant (235) or the reply to
    refuse with (535 5.7.8, 454 4.7.0)."""

    grant: UserGrant | None
    reply: Reply | None = None
