"""STARTTLS on outbound connections: opportunistic, required+verified, accept_invalid_certs."""

from __future__ import annotations

import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme

from empath.delivery.attempt import AttemptSettings, Target, attempt_delivery
from empath.delivery.classify import AttemptResult
from empath.errors import TemporaryDeliveryError
from empath.spool.model import Envelope
from empath.testing.scripted_peer import ScriptedPeer
from empath.testing.settings import attempt_settings, connection_pool
from empath.transport.pool import ConnectionPool

T = TypeVar("T")
BODY = b"Subject: tls\r\n\r\nsecret\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    return ctx


def attempt(
    peer: ScriptedPeer, settings: AttemptSettings, host: str = "mx1.test"
) -> Coroutine[Any, Any, tuple[AttemptResult, ConnectionPool]]:
    async def go() -> tuple[AttemptResult, ConnectionPool]:
        pool = connection_pool()
        env = Envelope("s@a.test", ("a@x.test",), 0.0, size=len(BODY))
        result = await attempt_delivery(
            [Target(host, peer.port, ("127.0.0.1",))],
            env,
            ("a@x.test",),
            BODY,
            settings=settings,
            pool=pool,
        )
        await pool.close_all()
        return result, pool

    return go()


async def test_require_tls_delivers_to_a_peer_with_a_certificate_for_the_mx_name(
    ca: trustme.CA, ca_file: str
) -> None:
    async def scenario() -> None:
        async with ScriptedPeer(ssl_context=server_context(ca, "mx1.test")) as peer:
            settings = attempt_settings(require_tls=True, tls_ca_file=ca_file)
            result, _ = await attempt(peer, settings)
            assert ("a@x.test",) == result.delivered
            assert result.tls
            assert peer.transactions[0].tls
            assert BODY == peer.transactions[0].body
            # EHLO again after the handshake (RFC 3207 §4.2).
            assert ["EHLO relay.test", "STARTTLS", "EHLO relay.test"] == peer.sessions[0].commands[
                :3
            ]

    await scenario()


async def test_require_tls_with_a_wrong_name_certificate_defers_with_the_reason(
    ca: trustme.CA, ca_file: str
) -> None:
    async def scenario() -> None:
        async with ScriptedPeer(ssl_context=server_context(ca, "other.test")) as peer:
            settings = attempt_settings(require_tls=True, tls_ca_file=ca_file)
            result, _ = await attempt(peer, settings)
            assert isinstance(result.error, TemporaryDeliveryError)
            assert ("a@x.test",) == result.temporary
            text = result.outcomes[0].text
            assert text.startswith("certificate verify failed: ")
            assert "mx1.test" in text
            assert [] == peer.transactions

    await scenario()


async def test_require_tls_with_an_untrusted_self_signed_certificate_defers(ca_file: str) -> None:
    other_ca = trustme.CA()  # not in ca_file: the peer's chain is not trusted

    async def scenario() -> None:
        async with ScriptedPeer(ssl_context=server_context(other_ca, "mx1.test")) as peer:
            settings = attempt_settings(require_tls=True, tls_ca_file=ca_file)
            result, _ = await attempt(peer, settings)
            assert ("a@x.test",) == result.temporary
            assert "certificate verify failed: " in result.outcomes[0].text
            assert [] == peer.transactions

    await scenario()


async def test_require_tls_when_starttls_is_not_offered_defers_with_the_reason() -> None:
    async def scenario() -> None:
        async with ScriptedPeer() as peer:  # no certificate: no STARTTLS offer
            result, _ = await attempt(peer, attempt_settings(require_tls=True))
            assert ("a@x.test",) == result.temporary
            assert "TLS required but not offered by mx1.test" == result.outcomes[0].text
            assert "4.7.4" == result.outcomes[0].enhanced
            assert [] == peer.transactions

    await scenario()


async def test_accept_invalid_certs_keeps_tls_mandatory_but_skips_verification(
    ca: trustme.CA,
) -> None:
    async def scenario() -> None:
        async with ScriptedPeer(ssl_context=server_context(ca, "other.test")) as peer:
            settings = attempt_settings(require_tls=True, accept_invalid_certs=True)
            result, _ = await attempt(peer, settings)
            assert ("a@x.test",) == result.delivered
            assert result.tls

    await scenario()


async def test_opportunistic_tls_is_used_when_offered_without_verifying(ca: trustme.CA) -> None:
    async def scenario() -> None:
        async with ScriptedPeer(ssl_context=server_context(ca, "whatever.test")) as peer:
            result, _ = await attempt(peer, attempt_settings())
            assert ("a@x.test",) == result.delivered
            assert result.tls
            assert peer.transactions[0].tls

    await scenario()


async def test_opportunistic_session_without_offer_stays_plaintext() -> None:
    async def scenario() -> None:
        async with ScriptedPeer() as peer:
            result, _ = await attempt(peer, attempt_settings())
            assert ("a@x.test",) == result.delivered
            assert not result.tls
            assert "STARTTLS" not in peer.sessions[0].commands

    await scenario()
