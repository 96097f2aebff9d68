"""The one error tree.

Protocol errors carry the SMTP reply they imply; delivery outcomes are Temporary
or Permanent; foreign exceptions (OSError, ssl.SSLError, dns.exception.*) are
mapped to these at the boundary where they are caught.  Every Empath exception
class lives here - DNS, null-MX and TLS failures are delivery outcomes, a listener
that cannot bind is a startup error - so ``except`` clauses and the classifiers
read one tree.  (The scripted test peer keeps a private one for its own control
flow.)
"""

from __future__ import annotations


class EmpathError(Exception):
    """Root of every error Empath raises on purpose."""


# --- configuration -----------------------------------------------------------


class ConfigError(EmpathError):
    """A config file could not be read or is invalid.

    The message names file:line:column and the key path, e.g.
    ``empath.config.ron:12:20: delivery.domains."gmail.com".rate_limit: expected a number``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str = "<config>",
        line: int = 0,
        column: int = 0,
        path: str = "",
    ) -> None:
        self.file = file
        self.line = line
        self.column = column
        self.path = path
        self.detail = message
        where = f"{file}:{line}:{column}" if line else file
        text = f"{where}: {path}: {message}" if path else f"{where}: {message}"
        super().__init__(text)


# --- SMTP protocol -----------------------------------------------------------


class SmtpProtocolError(EmpathError):
    """A peer broke the protocol; ``code``/``enhanced``/``text`` is the reply it earns."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        self.code = code
        self.enhanced = enhanced
        self.text = text
        super().__init__(f"{code} {enhanced} {text}")


# --- spool -------------------------------------------------------------------


class SpoolError(EmpathError):
    """The spool could not make something durable (the caller answers 451 4.3.0)."""


class SpoolFullError(SpoolError):
    """No space left on the spool filesystem (the caller answers 452 4.3.1)."""


class UnknownMessageError(SpoolError):
    """No live message has this id."""


# --- delivery outcomes -------------------------------------------------------


class DeliveryError(EmpathError):
    """A delivery attempt did not succeed.

    ``code`` is the remote reply code when there was one (None for network/DNS
    errors), ``enhanced`` the RFC 3463 status (e.g. "4.4.1"), ``mx`` the host
    that answered or failed, if any.
    """

    permanent: bool = False

    def __init__(
        self,
        text: str,
        *,
        code: int | None = None,
        enhanced: str = "",
        mx: str = "",
    ) -> None:
        self.text = text
        self.code = code
        self.enhanced = enhanced
        self.mx = mx
        super().__init__(text)


class TemporaryDeliveryError(DeliveryError):
    """Worth retrying later: 4xx, connection refused/timeout, DNS SERVFAIL, TLS failure."""

    permanent = False


class PermanentDeliveryError(DeliveryError):
    """Never retried: 5xx, null MX, NXDOMAIN, SMTPUTF8 unsupported."""

    permanent = True


class DnsNameNotFoundError(PermanentDeliveryError):
    """The name does not exist (NXDOMAIN) or cannot exist (invalid syntax)."""


class DnsTemporaryError(TemporaryDeliveryError):
    """The DNS could not answer now (SERVFAIL, timeout, no usable nameserver)."""


class NullMxError(PermanentDeliveryError):
    """The domain publishes a null MX: it accepts no mail (RFC 7505)."""


class TlsHandshakeError(TemporaryDeliveryError):
    """STARTTLS was agreed but the handshake (or certificate check) failed."""


# --- listeners -----------------------------------------------------------------


class ListenerBindError(EmpathError):
    """A listener could not bind its address (port taken, permission, bad address)."""


# --- control -----------------------------------------------------------------


class ControlError(EmpathError):
    """Base of empathctl's errors (``empath.control.client``); ``exit_code`` is what
    `empathctl` exits with.  The daemon's side raises ``control.protocol.RequestError``
    (a request it cannot serve) and ``control.server.CommandError`` (a command failed)."""

    exit_code = 1


# --- DKIM --------------------------------------------------------------------


class DkimSigningError(EmpathError):
    """A message could not be signed at acceptance (the session answers 451 4.3.0)."""
