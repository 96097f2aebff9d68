"""The server side of SMTP AUTH (RFC 4954, DESIGN §13) as a sans-I/O state machine.

Theory of operation
-------------------
A listener configured with ``auth`` gives each :class:`~empath.smtp.server.SmtpServer`
one :class:`ServerAuth` (on port 25 there is none, and the per-message path asks
nothing of it).  The server hands it the ``AUTH`` command's argument and each
response line; it answers with a :class:`Step`: either a ``334`` challenge to send
(the server then reads one more response line) or an :class:`AuthCheck` for the
transport, which verifies the credentials off the event loop and answers through
the server's ``auth_succeeded`` / ``auth_failed``.  Refusals are raised as
:class:`~empath.errors.SmtpProtocolError` with the RFC's reply, as the server's
command handlers do.

Once a :class:`~empath.smtp.sasl.UserGrant` is held (:meth:`ServerAuth.granted`),
the rules it brings are asked here too: MAIL FROM must be an address the user owns
and within its hourly quota, the user's own recipient limit, and relaying whatever
trusted_networks say.  STARTTLS forgets all of it (:meth:`ServerAuth.reset`).

The SASL mechanisms themselves (decoding PLAIN and LOGIN) are in smtp/sasl.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from empath.errors import SmtpProtocolError
from empath.smtp.events import AuthCheck
from empath.smtp.replies import Reply
from empath.smtp.sasl import MAX_RESPONSE_BYTES, Challenge, Credentials, SaslExchange, UserGrant

__all__ = ["MAX_RESPONSE_BYTES", "AuthOffer", "ServerAuth", "Step"]

R_AUTH_OK: Final = Reply.of(235, "2.7.0", "Authentication successful").to_bytes()
R_AUTH_LINE_TOO_LONG: Final = Reply.of(
    500, "5.5.6", "Authentication exchange line is too long"
).to_bytes()

# What one AUTH step asks of the server: bytes = a 334 challenge line to send (then
# read one response line); AuthCheck = wait for the transport's verdict.
Step = bytes | AuthCheck


@dataclass(frozen=True, slots=True)
class AuthOffer:
    """A submission listener's SMTP AUTH settings (listener ``auth:``)."""

    required: bool = True  # no MAIL before AUTH (530 5.7.0)
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")


class ServerAuth:
    """One session's AUTH state; see module doc."""

    __slots__ = ("_exchange", "grant", "offer")

    def __init__(self, offer: AuthOffer) -> None:
        self.offer = offer
        self.grant: UserGrant | None = None  # set by a successful AUTH
        self._exchange: SaslExchange | None = None  # the exchange in progress

    @property
    def user(self) -> str | None:
        grant = self.grant
        return grant.user if grant is not None else None

    # --- the exchange ---------------------------------------------------------------

    def begin(self, arg: str, *, esmtp: bool, tls_active: bool) -> Step:
        """The ``AUTH <mechanism> [initial-response]`` command."""
        if not esmtp:
            # after HELO: an unknown extension, as where AUTH is not offered at all
            raise SmtpProtocolError(503, "5.5.1", "AUTH not available")
        if self.grant is not None:
            # RFC 4954 §4: "After a successful AUTH command completes, a server MUST
            # reject any further AUTH commands with a 503 reply."
            raise SmtpProtocolError(503, "5.5.1", "Already authenticated")
        if not tls_active:
            # RFC 4954 §6: "538 5.7.11 Encryption required for requested
            # authentication mechanism"
            raise SmtpProtocolError(
                538, "5.7.11", "Encryption required for requested authentication mechanism"
            )
        word, _, initial = arg.partition(" ")
        exchange = SaslExchange(SaslExchange.mechanism_of(word, self.offer.mechanisms))
        return self._step(exchange, exchange.start(initial or None))

    def respond(self, line: bytes) -> Step:
        """One response line (its CRLF or LF already cut off); a refusal ends the
        exchange."""
        exchange = self._exchange
        assert exchange is not None
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            step = exchange.respond(line.decode("ascii", "replace").strip())
        except SmtpProtocolError:
            self._exchange = None
            raise
        return self._step(exchange, step)

    def line_too_long(self) -> bytes:
        """A response line over MAX_RESPONSE_BYTES: the exchange ends with this reply."""
        self._exchange = None
        return R_AUTH_LINE_TOO_LONG

    def granted(self, grant: UserGrant) -> bytes:
        """The transport verified the credentials: the 235 reply to send."""
        self.grant = grant
        self._exchange = None
        return R_AUTH_OK

    def refused(self) -> None:
        """The transport refused the credentials (the server sends its reply)."""
        self._exchange = None

    def reset(self) -> None:
        """STARTTLS: RFC 3207 §4.2, nothing learnt before TLS is kept."""
        self.grant = None
        self._exchange = None

    def _step(self, exchange: SaslExchange, step: Challenge | Credentials) -> Step:
        if isinstance(step, Challenge):
            self._exchange = exchange
            return f"334 {step.text}\r\n".encode("ascii")
        self._exchange = None
        return AuthCheck(step)

    # --- what a grant (or its absence) allows ---------------------------------------

    def before_mail(self) -> None:
        """MAIL before AUTH where AUTH is required."""
        if self.grant is None and self.offer.required:
            # RFC 4954 §6: "530 5.7.0 Authentication required"
            raise SmtpProtocolError(530, "5.7.0", "Authentication required")

    def admit_sender(self, sender: str) -> None:
        """DESIGN §13: the envelope sender must be one the user owns, within its quota."""
        grant = self.grant
        if grant is None:
            return
        if not grant.owns(sender):
            raise SmtpProtocolError(553, "5.7.1", f"Sender address not owned by {grant.user}")
        refusal = grant.admit_message()
        if refusal is not None:
            raise refusal

    def recipient_limit(self, limit: int) -> int:
        """The user's per-message recipient quota, when lower than the listener's."""
        grant = self.grant
        if grant is not None and 0 < grant.max_recipients < limit:
            return grant.max_recipients
        return limit
