"""Listener ``tls:`` and ``auth:`` (DESIGN §13): the shipped example and the refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from empath.config.derive import listener_spec
from empath.config.load import loads_config
from empath.errors import ConfigError
from empath.transport.listener import ListenerAuthSpec

DEV_CONFIG = Path(__file__).resolve().parents[2] / "empath.config.ron"


def shipped_example() -> str:
    """The commented submission listeners of empath.config.ron, uncommented."""
    text = DEV_CONFIG.read_text()
    block = re.search(r"// BEGIN SUBMISSION EXAMPLE\n(.*?)// END SUBMISSION EXAMPLE", text, re.S)
    assert block is not None
    body = "\n".join(re.sub(r"^\s*// ?", "", line) for line in block.group(1).splitlines())
    return f"(smtp_controller: (listeners: [{body}]))"


def test_shipped_example_is_587_starttls_and_465_implicit() -> None:
    """The example in the shipped config loads: 587 STARTTLS + AUTH required, 465 implicit."""
    config = loads_config(shipped_example())
    l587, l465 = config.smtp_controller.listeners
    assert (587, "starttls", True) == (l587.port, l587.tls and l587.tls.mode,
                                       l587.auth and l587.auth.required)  # fmt: skip
    assert (465, "implicit") == (l465.port, l465.tls and l465.tls.mode)
    assert l465.auth is not None and 10 == l465.auth.limits.max_failures_per_ip
    spec = listener_spec(l465, "mx.test", hop_limit=50, postmaster="postmaster@mx.test")
    assert spec.tls_implicit and spec.tls_cert is not None
    assert spec.auth == ListenerAuthSpec(l465.auth.users_file, True, ("PLAIN", "LOGIN"))
    assert not listener_spec(l587, "mx.test", hop_limit=50, postmaster="p@mx.test").tls_implicit


@pytest.mark.parametrize(
    ("listeners", "message"),
    [
        ('(socket: "[::]:587", auth: (users_file: "/u"))', "auth: needs tls"),
        (
            '(socket: "[::]:587", tls: (certificate: "c", key: "k"), '
            'extensions: [{"starttls": {"certificate": "c", "key": "k"}}])',
            "tls: give the certificate either in tls or in extensions.starttls",
        ),
        ('(socket: "[::]:465", tls: (mode: "tls", certificate: "c", key: "k"))', "mode"),
        (
            '(socket: "[::]:587", tls: (certificate: "c", key: "k"), auth: (users_file: "/u")),'
            '(socket: "[::]:465", tls: (certificate: "c", key: "k"), '
            'auth: (users_file: "/u", limits: (max_failures_per_ip: 3)))',
            "must have the same auth limits",
        ),
        (
            '(socket: "[::]:587", tls: (certificate: "c", key: "k"), '
            'auth: (users_file: "/u", mechanisms: ["CRAM-MD5"]))',
            "mechanisms",
        ),
    ],
)
def test_bad_submission_listeners_are_refused(listeners: str, message: str) -> None:
    """AUTH without TLS, two certificates, an unknown mode or mechanism, and listeners
    sharing a users file with different limits are config errors."""
    with pytest.raises(ConfigError) as info:
        loads_config(f"(smtp_controller: (listeners: [{listeners}]))")
    assert message in str(info.value)
