"""Reply → outcome: what a remote answer (or a network failure) means for a recipient.

Theory of operation
-------------------
Delivery has three outcomes per recipient (SPEC §4): *delivered* (2xx),
*temporary* (4xx, and every network, timeout, TLS or DNS trouble: retried) and
*permanent* (5xx: never retried, bounced with a DSN).  This module is the one
place that decides which is which, so the runner, the circuit breaker and the
DSN writer agree.

RFC 5321 §4.2.1: "4yz Transient Negative Completion reply ... The command was
not accepted, and the requested action did not occur.  However, the error
condition is temporary, and the action may be requested again."  "5yz Permanent
Negative Completion reply ... The SMTP client SHOULD NOT repeat the exact
request (in the same sequence)."

Enhanced status codes (RFC 3463) are taken from the reply when the server sent
one whose class matches the reply code; otherwise a generic ``X.0.0`` of the
reply's class is used, so DSNs always have a ``Status:`` value.  RFC 3463 §2:
"the class sub-code of the enhanced status code ... MUST match the first digit
of the basic reply code" — a mismatching one is ignored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from empath.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from empath.smtp.replies import Reply


class OutcomeKind(enum.StrEnum):
    """What happened to one recipient in one attempt."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """The result of one attempt for one recipient.

    ``code`` is the remote reply code, or None when no remote reply decided it
    (network error, timeout, a local decision such as SMTPUTF8 unsupported).
    ``enhanced`` is always set for non-delivered outcomes (``4.4.1``, ``5.1.1`` ...).
    ``mx`` is the host that answered (or failed), ``""`` when none was reached.
    """

    address: str
    kind: OutcomeKind
    code: int | None
    enhanced: str
    text: str
    mx: str = ""

    @property
    def delivered(self) -> bool:
        return self.kind is OutcomeKind.DELIVERED

    @property
    def temporary(self) -> bool:
        return self.kind is OutcomeKind.TEMPORARY

    @property
    def permanent(self) -> bool:
        return self.kind is OutcomeKind.PERMANENT

    @property
    def diagnostic(self) -> str:
        """``"550 5.1.1 text"`` for remote replies, the bare text otherwise (logs, DSNs)."""
        if self.code is None:
            return self.text
        if self.enhanced and not self.text.startswith(self.enhanced):
            return f"{self.code} {self.enhanced} {self.text}"
        return f"{self.code} {self.text}"


def kind_of(code: int) -> OutcomeKind:
    """2xx → delivered, 4xx → temporary, 5xx (and anything unexpected) → permanent.

    A 3xx as a final answer is a protocol violation; it is treated as temporary,
    because another try (or another MX) may do better.
    """
    klass = code // 100
    if klass == 2:
        return OutcomeKind.DELIVERED
    if klass == 5:
        return OutcomeKind.PERMANENT
    return OutcomeKind.TEMPORARY


def enhanced_of(reply: Reply) -> str:
    """The reply's RFC 3463 status when it matches the reply class, else ``X.0.0``."""
    status = reply.enhanced
    klass = reply.code // 100
    if status and status[0] == str(klass):
        return status
    if klass in (2, 4, 5):
        return f"{klass}.0.0"
    return "4.0.0"


def reply_text(reply: Reply) -> str:
    """The reply text as stored in attempt history: ``"550 5.1.1 No such user"``."""
    return f"{reply.code} {reply.text}".rstrip()


def outcome_from_reply(address: str, reply: Reply, mx: str = "") -> RecipientOutcome:
    """Classify a remote reply that decided ``address``."""
    return RecipientOutcome(
        address=address,
        kind=kind_of(reply.code),
        code=reply.code,
        enhanced=enhanced_of(reply),
        text=reply.text,
        mx=mx,
    )


def outcome_from_error(address: str, error: DeliveryError) -> RecipientOutcome:
    """Every recipient of a unit gets the unit-level error's outcome."""
    return RecipientOutcome(
        address=address,
        kind=OutcomeKind.PERMANENT if error.permanent else OutcomeKind.TEMPORARY,
        code=error.code,
        enhanced=error.enhanced or ("5.0.0" if error.permanent else "4.0.0"),
        text=error.text,
        mx=error.mx,
    )


def error_from_reply(reply: Reply, mx: str = "", context: str = "") -> DeliveryError:
    """A unit-level error for a non-2xx reply (greeting, EHLO, MAIL ...).

    ``context`` prefixes the text, e.g. ``"mx1.test refused the greeting"``.
    """
    text = f"{context}: {reply_text(reply)}" if context else reply_text(reply)
    cls = PermanentDeliveryError if reply.code // 100 == 5 else TemporaryDeliveryError
    return cls(text, code=reply.code, enhanced=enhanced_of(reply), mx=mx)
