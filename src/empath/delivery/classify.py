"""Reply → outcome: what a remote answer (or a network failure) means for a recipient.

Theory of operation
-------------------
Delivery has three outcomes per recipient (DESIGN §4): *delivered* (2xx),
*temporary* (4xx, and every network, timeout, TLS or DNS trouble: retried) and
*permanent* (5xx: never retried, bounced with a DSN).  This module is the one
place that decides which is which, so the runner, the circuit breaker and the
DSN writer agree.

RFC 5321 §4.2.1: "4yz Transient Negative Completion reply ... The command was
not accepted, and the requested action did not occur.  However, the error
condition is temporary, and the action may be requested again."  "5yz Permanent
Negative Completion reply ... The SMTP client SHOULD NOT repeat the exact
request (in the same sequence)."

The result of one attempt of a unit is an :class:`AttemptResult`: one
:class:`RecipientOutcome` per recipient, the MX (and address, TLS) that took
it, and a unit-level error when nothing was delivered -- routing failures
included (:meth:`AttemptResult.failed`).  It is the only result type the runner
and :mod:`empath.delivery.transition` see; the SMTP client's wire-level
``TransactionResult`` is turned into it in :mod:`empath.delivery.attempt`.
Like the rest of this module it is pure (no I/O), so the transition can use it.

Enhanced status codes (RFC 3463) are taken from the reply when the server sent
one whose class matches the reply code; otherwise a generic ``X.0.0`` of the
reply's class is used, so DSNs always have a ``Status:`` value.  RFC 3463 §2:
"the class sub-code of the enhanced status code ... MUST match the first digit
of the basic reply code" — a mismatching one is ignored.

Not frozen, against the house style: ``RecipientOutcome`` and ``AttemptResult`` (one of
each per delivery attempt). Why, and what stands in for frozen: DESIGN §15.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from empath.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from empath.smtp.replies import Reply


class OutcomeKind(enum.StrEnum):
    """What happened to one recipient in one attempt."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(slots=True, init=False, unsafe_hash=True)  # not frozen: see the module doc
class RecipientOutcome:
    """The result of one attempt for one recipient.

    ``code`` is the remote reply code, or None when no remote reply decided it
    (network error, timeout, a local decision such as SMTPUTF8 unsupported).
    ``enhanced`` is always set for non-delivered outcomes (``4.4.1``, ``5.1.1`` ...).
    ``mx`` is the host that answered (or failed), ``""`` when none was reached.
    ``at_rcpt`` is True when the reply to this recipient's own RCPT decided it: the
    mailbox's answer, which says nothing about the destination as a whole (DESIGN §4:
    a 4xx to one RCPT does not count for the circuit breaker).
    """

    address: str
    kind: OutcomeKind
    code: int | None
    enhanced: str
    text: str
    mx: str = ""
    at_rcpt: bool = False

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(
        self,
        address: str,
        kind: OutcomeKind,
        code: int | None,
        enhanced: str,
        text: str,
        mx: str = "",
        at_rcpt: bool = False,
    ) -> None:
        self.address = address
        self.kind = kind
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.mx = mx
        self.at_rcpt = at_rcpt

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


def outcome_from_reply(
    address: str, reply: Reply, mx: str = "", *, at_rcpt: bool = False
) -> RecipientOutcome:
    """Classify a remote reply that decided ``address`` (``at_rcpt``: its own RCPT's)."""
    return RecipientOutcome(
        address=address,
        kind=kind_of(reply.code),
        code=reply.code,
        enhanced=enhanced_of(reply),
        text=reply.text,
        mx=mx,
        at_rcpt=at_rcpt,
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


@dataclass(frozen=True, slots=True)
class HostFailure:
    """A host/address that did not take the transaction, and why."""

    mx: str  # "host[address]:port"
    error: DeliveryError


@dataclass(slots=True, init=False, unsafe_hash=True)  # not frozen: see the module doc
class AttemptResult:
    """The one result of a unit's attempt, routing failures included (see module doc).

    The SMTP client's wire-level ``TransactionResult`` is turned into this here and
    nowhere else; the runner and :mod:`empath.delivery.transition` see only this.
    """

    outcomes: tuple[RecipientOutcome, ...]  # one per recipient, in the given order
    mx: str  # MX host name that took the transaction ("" when none did)
    address: str = ""  # the address connected to
    port: int = 0
    error: DeliveryError | None = None  # set when no recipient was delivered
    tls: bool = False  # the transaction ran over TLS
    tls_version: str = ""  # e.g. "TLSv1.3" ("" in plaintext)
    tls_cipher: str = ""  # e.g. "TLS_AES_256_GCM_SHA384"
    reused: bool = False  # over a pooled connection
    failures: tuple[HostFailure, ...] = ()  # hosts tried before (or instead of) mx

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(
        self,
        outcomes: tuple[RecipientOutcome, ...],
        mx: str,
        address: str = "",
        port: int = 0,
        error: DeliveryError | None = None,
        tls: bool = False,
        tls_version: str = "",
        tls_cipher: str = "",
        reused: bool = False,
        failures: tuple[HostFailure, ...] = (),
    ) -> None:
        self.outcomes = outcomes
        self.mx = mx
        self.address = address
        self.port = port
        self.error = error
        self.tls = tls
        self.tls_version = tls_version
        self.tls_cipher = tls_cipher
        self.reused = reused
        self.failures = failures

    @classmethod
    def failed(cls, recipients: Sequence[str], error: DeliveryError) -> AttemptResult:
        """No host was tried or none took the transaction (routing, every MX down)."""
        return cls(
            outcomes=tuple(outcome_from_error(r, error) for r in recipients), mx="", error=error
        )

    @property
    def summary(self) -> tuple[str, int | None, str]:
        """(mx, code, text) for attempt history and logs: the unit-level error, else the
        first recipient that was not delivered, else the first one."""
        if self.error is not None:
            return self.mx or self.error.mx, self.error.code, self.error.text
        worst = next((o for o in self.outcomes if not o.delivered), None)
        if worst is None and self.outcomes:
            worst = self.outcomes[0]
        if worst is None:
            return self.mx, None, "no recipients"
        return self.mx, worst.code, worst.diagnostic

    @property
    def delivered(self) -> tuple[str, ...]:
        return tuple(o.address for o in self.outcomes if o.delivered)

    @property
    def temporary(self) -> tuple[str, ...]:
        return tuple(o.address for o in self.outcomes if o.temporary)

    @property
    def permanent(self) -> tuple[str, ...]:
        return tuple(o.address for o in self.outcomes if o.permanent)

    @property
    def mx_label(self) -> str:
        """``host`` or ``host:port`` (attempt history, logs)."""
        if not self.mx or self.port in (0, 25):
            return self.mx
        return f"{self.mx}:{self.port}"
