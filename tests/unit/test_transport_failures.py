"""Network, timeout and TLS exceptions become temporary delivery errors (transport/failures)."""

from __future__ import annotations

import ssl

import pytest

from empath.errors import PermanentDeliveryError, SmtpProtocolError, TemporaryDeliveryError
from empath.transport.failures import error_from_exception


@pytest.mark.parametrize(
    ("exc", "fragment", "enhanced"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "Connection refused", "4.4.1"),
        (TimeoutError(), "timed out", "4.4.2"),
        (ConnectionResetError(104, "Connection reset by peer"), "Connection reset", "4.4.2"),
        (ssl.SSLError(1, "wrong version number"), "TLS handshake failed", "4.7.5"),
        (SmtpProtocolError(421, "4.5.0", "malformed SMTP reply"), "protocol error", "4.5.0"),
    ],
)
def test_network_errors_become_temporary_with_no_code(
    exc: BaseException, fragment: str, enhanced: str
) -> None:
    err = error_from_exception(exc, "mx1.test")
    assert isinstance(err, TemporaryDeliveryError)
    assert err.code is None
    assert enhanced == err.enhanced
    assert fragment in err.text
    assert "mx1.test" == err.mx


def test_certificate_failure_names_the_reason() -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "Hostname mismatch, certificate is not valid for 'mx1.test'."
    err = error_from_exception(exc, "mx1.test")
    assert err.text.startswith("certificate verify failed: Hostname mismatch")


def test_delivery_errors_pass_through_unchanged() -> None:
    err = PermanentDeliveryError("null MX", enhanced="5.1.10")
    assert err is error_from_exception(err)
