"""Foreign exceptions at the outbound network boundary → delivery errors.

The transport catches what asyncio, the socket layer and ``ssl`` raise while it
talks to an MX and turns it into the one error tree of :mod:`empath.errors`, so
nothing above the transport sees an ``OSError`` or ``ssl.SSLError``.  Network,
timeout and TLS trouble is always temporary with no reply code (RFC 3463 4.4.x
"network and routing", 4.7.x security): another MX or a later try may do better.
"""

from __future__ import annotations

import asyncio
import ssl

from empath.errors import DeliveryError, SmtpProtocolError, TemporaryDeliveryError


def error_from_exception(exc: BaseException, mx: str = "", doing: str = "") -> DeliveryError:
    """Map a foreign exception caught at the network boundary to a delivery error.

    Network, timeout and TLS trouble is always temporary with ``code=None``
    (RFC 3463 4.4.x "network and routing" / 4.7.x security).  A malformed remote
    reply is temporary too (another MX or a later try may do better).  Delivery
    errors pass through unchanged.
    """
    if isinstance(exc, DeliveryError):
        return exc
    where = f" with {mx}" if mx else ""
    during = f" while {doing}" if doing else ""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return TemporaryDeliveryError(
            f"conversation{where} timed out{during}", enhanced="4.4.2", mx=mx
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        return TemporaryDeliveryError(
            f"certificate verify failed: {detail} ({mx or 'peer'})", enhanced="4.7.5", mx=mx
        )
    if isinstance(exc, ssl.SSLError):
        return TemporaryDeliveryError(
            f"TLS handshake failed{where}: {getattr(exc, 'reason', None) or exc}",
            enhanced="4.7.5",
            mx=mx,
        )
    if isinstance(exc, ConnectionRefusedError):
        return TemporaryDeliveryError(
            f"connect to {mx or 'peer'}: Connection refused", enhanced="4.4.1", mx=mx
        )
    if isinstance(exc, SmtpProtocolError):
        return TemporaryDeliveryError(
            f"protocol error{where}{during}: {exc.text}", enhanced="4.5.0", mx=mx
        )
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return TemporaryDeliveryError(
            f"lost connection{where}{during}: {reason}", enhanced="4.4.2", mx=mx
        )
    return TemporaryDeliveryError(
        f"delivery error{where}{during}: {exc!r}", enhanced="4.0.0", mx=mx
    )
