"""The DKIM acceptance step in a live listener (in-process, real loopback sessions),
and its decisions in virtual time: who is signed, what a signing error answers, how
a rotation's overlap ends."""

from __future__ import annotations

import asyncio
import smtplib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from empath.dkim import keys, rotation
from empath.dkim.keyproc import KeyProcess
from empath.dkim.policy import build_table, plan
from empath.dkim.sign import Unsigned
from empath.dkim.signer import INLINE_BODY_BYTES, DkimSigner, DkimStats, Where, where
from empath.smtp.server import RelayPolicy
from empath.stats import DomainLabels
from empath.testing.clock import FakeClock
from empath.transport.acceptance import AcceptancePipeline, AcceptedMessage, SessionFacts
from empath.transport.listener import ListenerSpec
from tests.dkim_support import ERRING_KEY_PROCESS, signature_selectors
from tests.integration.test_inbound_smtp import ServerThread, serving, spec
from tests.unit.test_dkim_keys_policy import DAY, config

MSG = b"From: Alice <alice@example.org>\r\nTo: b@y.example\r\nSubject: hi\r\n\r\nbody\r\n"


_MADE: list[DkimSigner] = []


@pytest.fixture(autouse=True)
def _close_signers() -> Iterator[None]:
    """Every signer a test made is closed after it (its key process ends)."""
    yield
    while _MADE:
        _MADE.pop().close()


def signer_for(tmp_path: Path, clock: FakeClock | None = None, **kw: object) -> DkimSigner:
    table = build_table(config(tmp_path), rotation.RotationState(), keys.KeyCache())
    stats = DkimStats(DomainLabels(10))
    signer = DkimSigner(clock or FakeClock(), stats, table=table, **kw)  # type: ignore[arg-type]
    _MADE.append(signer)
    return signer


def install(srv: ServerThread, signer: DkimSigner) -> None:
    pipeline = AcceptancePipeline((signer,))

    def pipeline_for(_spec: ListenerSpec) -> AcceptancePipeline:
        return pipeline

    srv.group.set_acceptance(pipeline_for)


@pytest.fixture
def srv() -> Iterator[ServerThread]:
    relay = RelayPolicy(trusted_networks=("127.0.0.1/32",), accepted_domains=("y.example",))
    with serving([spec()], relay) as s:
        yield s


@pytest.mark.parametrize("place", [None, *Where])
def test_a_signing_error_answers_451_and_spools_nothing(
    tmp_path: Path, srv: ServerThread, place: Where | None
) -> None:
    """A failure inside the signer (here: the key operation raises), whichever way the
    work is split, is a 451 4.3.0 the client retries; nothing is spooled; the error is
    counted.  ``None``: the default, the message as received to the key process."""

    def broken(pending: Unsigned) -> bytes:
        raise ValueError("HSM unplugged")

    # the key process (KEY_PROCESS, None) answers an error; in-process key operations raise
    decide: dict[str, object] = {} if place is None else {"decide": lambda specs, n: place}
    signer = signer_for(tmp_path, None, key_op_fn=broken, **decide,
                        keys=KeyProcess([sys.executable, "-c", ERRING_KEY_PROCESS]))  # fmt: skip
    install(srv, signer)
    with srv.smtp() as c, pytest.raises(smtplib.SMTPDataError) as err:
        c.sendmail("alice@example.org", ["b@y.example"], MSG)
    assert (451, b"4.3.0 DKIM signing failed, try again later") == (
        err.value.smtp_code, err.value.smtp_error
    )  # fmt: skip
    assert [] == srv.stored()
    assert {
        ("example.org", "rsa-sha256", "error"): 1,
        ("example.org", "ed25519-sha256", "error"): 1,
    } == signer.stats.signatures


def test_trusted_clients_get_both_signatures_untrusted_ones_none(tmp_path: Path) -> None:
    """From 127.0.0.1 (trusted) the message is signed twice; from 127.0.0.2 (only
    allowed to relay to an accepted domain) it is spooled unsigned."""
    relay = RelayPolicy(trusted_networks=("127.0.0.1/32",), accepted_domains=("y.example",))
    with serving([spec(host="0.0.0.0")], relay) as srv:
        install(srv, signer_for(tmp_path))
        for source in ("127.0.0.1", "127.0.0.2"):
            with smtplib.SMTP("127.0.0.1", srv.port, source_address=(source, 0)) as c:
                c.sendmail("alice@example.org", ["b@y.example"], MSG)
        stored = sorted((m.envelope.peer, body) for m, body in srv.stored())
    assert [["r", "e"], []] == [signature_selectors(body) for _, body in stored]


def facts(trusted: bool, auth_user: str | None) -> SessionFacts:
    return SessionFacts("192.0.2.9", "192.0.2.9:1", "c", trusted, auth_user, True, "submission")


def test_an_authenticated_client_is_signed_even_from_an_untrusted_network(
    tmp_path: Path,
) -> None:
    signer = signer_for(tmp_path)

    async def run(f: SessionFacts) -> list[str]:
        m = AcceptedMessage("01X", MSG, sender="alice@example.org", recipients=["b@y"], facts=f)
        assert await signer.run(m) is None
        return signature_selectors(m.to_bytes())

    assert (["r", "e"], []) == (
        asyncio.run(run(facts(False, "alice"))), asyncio.run(run(facts(False, None)))
    )  # fmt: skip
    signer.close()


def test_after_a_rotation_both_selectors_sign_until_the_overlap_ends(tmp_path: Path) -> None:
    """Virtual time: a rotated RSA selector published at T signs from T; the old RSA
    selector signs until T + overlap and not after; the Ed25519 one is untouched."""
    clock = FakeClock()
    cfg = config(tmp_path)
    new_key = tmp_path / "r2.key"
    keys.write_key(new_key, keys.generate("rsa-sha256"))
    cache = keys.KeyCache()
    state = rotation.rotate(
        rotation.RotationState(),
        rotation.RotatedSelector("example.org", "r2", "rsa-sha256", str(new_key), clock.now()),
    )
    signer = DkimSigner(clock, DkimStats(DomainLabels(10)), table=build_table(cfg, state, cache))
    _MADE.append(signer)

    def selectors() -> list[str]:
        m = AcceptedMessage("01X", MSG, sender="a@example.org", recipients=["b@y"],
                            facts=facts(True, None))  # fmt: skip
        assert asyncio.run(signer.run(m)) is None
        return signature_selectors(m.to_bytes())

    assert ["r", "e"] == selectors()  # r2 pending its DNS record
    active = [rotation.Active("example.org", s.selector, s.algorithm, s.start, s.end)
              for s in signer.table.all_selectors() if not s.pending]  # fmt: skip
    state = rotation.published(state, "example.org", "r2", clock.now(), 7 * DAY, active)
    signer.install(build_table(cfg, state, cache))
    assert ["r", "e", "r2"] == selectors()
    clock.advance(7 * DAY - 1)
    assert ["r", "e", "r2"] == selectors()
    clock.advance(1)
    assert ["e", "r2"] == selectors()
    signer.close()


def test_small_bodies_are_canonicalised_on_the_loop_big_ones_in_the_pool(
    tmp_path: Path,
) -> None:
    """The key operations (RSA and Ed25519 alike) go to the key process; a big body
    goes to the pool whole."""
    signer = signer_for(tmp_path)
    specs = plan(signer.table, ["a@example.org"], [], 0.0)
    signer.close()
    assert specs is not None
    dual = specs.specs
    ed = [s for s in dual if s.algorithm == "ed25519-sha256"]
    assert {"rsa-sha256", "ed25519-sha256"} == {s.algorithm for s in dual}
    assert (Where.KEY_PROCESS, Where.KEY_PROCESS, Where.ALL_IN_POOL) == (
        where(dual, 1000), where(dual, INLINE_BODY_BYTES), where(dual, INLINE_BODY_BYTES + 1)
    )  # fmt: skip
    assert (Where.KEY_PROCESS, Where.KEY_PROCESS, Where.ALL_IN_POOL) == (
        where(ed, 1000), where(ed, INLINE_BODY_BYTES), where(ed, INLINE_BODY_BYTES + 1)
    )  # fmt: skip


def test_a_plain_message_is_signed_unsplit_and_a_split_one_the_same(tmp_path: Path) -> None:
    """A message no step has split goes to the key process as received and stays
    unsplit (the signatures are put in front of its bytes); one an earlier step split
    goes as fields and body: the same spooled bytes either way, and both counted."""
    signer = signer_for(tmp_path)

    async def run(split: bool) -> AcceptedMessage:
        m = AcceptedMessage("01X", MSG, sender="alice@example.org", recipients=["b@y"],
                            facts=facts(True, None))  # fmt: skip
        if split:
            assert 3 == len(m.headers)  # an earlier step read the fields
        assert await signer.run(m) is None
        return m

    plain, split = asyncio.run(run(False)), asyncio.run(run(True))
    assert (MSG, None) == (plain.raw and plain.raw[-len(MSG) :], split.raw)
    assert plain.to_bytes() == split.to_bytes()
    assert ["r", "e"] == signature_selectors(plain.to_bytes())
    assert {("example.org", "rsa-sha256", "ok"): 2, ("example.org", "ed25519-sha256", "ok"): 2
            } == signer.stats.signatures  # fmt: skip
    assert {("example.org", "r"): 2, ("example.org", "e"): 2} == signer.stats.by_selector
