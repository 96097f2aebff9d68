"""The DKIM service's operations in virtual time, with DNS answers from a table:
`rotate --now`, `check` (published, missing, mismatched, revoked; DMARC/SPF warnings),
the state kept across a new service (a restart), and capped domain labels."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from empath.config.model import Config, SpoolConfig
from empath.dkim import keys
from empath.dkim.service import DkimService
from empath.dkim.signer import DkimStats
from empath.errors import ConfigError, DnsNameNotFoundError
from empath.stats import DomainLabels
from empath.testing.clock import FakeClock
from tests.unit.test_dkim_keys_policy import DAY
from tests.unit.test_dkim_keys_policy import config as dkim_config


class Txt:
    """TXT answers by name; a missing name is NXDOMAIN."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[str, ...]] = {}

    async def __call__(self, name: str) -> tuple[str, ...]:
        try:
            return self.records[name]
        except KeyError:
            raise DnsNameNotFoundError(f"{name}: NXDOMAIN") from None


def service(tmp_path: Path, clock: FakeClock, txt: Txt, cfg: Config | None = None) -> DkimService:
    cfg = cfg or memory_config(tmp_path)
    return DkimService(cfg, clock, DkimStats(DomainLabels(10)), txt)


def memory_config(tmp_path: Path) -> Config:
    spool = SpoolConfig(type="Memory", path=str(tmp_path / "spool"))
    return Config(spool=spool, dkim=dkim_config(tmp_path))


def publish(txt: Txt, svc: DkimService) -> None:
    for s in svc.table.all_selectors():
        txt.records[f"{s.selector}._domainkey.{s.domain}"] = (s.key.txt,)


def test_check_reports_each_selector_and_the_dmarc_and_spf_warnings(tmp_path: Path) -> None:
    clock, txt = FakeClock(), Txt()
    svc = service(tmp_path, clock, txt)
    publish(txt, svc)
    r_key = next(s for s in svc.table.all_selectors() if s.selector == "r")
    txt.records["e._domainkey.example.org"] = ("v=DKIM1; k=ed25519; p=",)
    txt.records["example.org"] = ("v=spf1 -all", "v=spf1 mx -all")
    result = asyncio.run(svc.check("Example.ORG."))
    by_sel = {r["selector"]: (r["ok"], r["detail"]) for r in result["selectors"]}
    assert (True, "r._domainkey.example.org: published, matches the private key") == by_sel["r"]
    assert (False, "e._domainkey.example.org: the key is revoked (empty p=)") == by_sel["e"]
    assert not result["ok"]
    assert (
        "DKIM d=example.org aligns with From: example.org in strict and relaxed mode"
        == result["alignment"]
    )
    assert [
        "_dmarc.example.org: no DMARC record; large receivers expect one "
        '(e.g. "v=DMARC1; p=none; rua=mailto:dmarc@example.org")',
        "example.org: 2 SPF records (RFC 7208 §3.2: permerror)",
    ] == result["warnings"]
    txt.records["r._domainkey.example.org"] = ("v=DKIM1; k=rsa; p=" + "A" * 20,)
    del txt.records["e._domainkey.example.org"]
    result = asyncio.run(svc.check("example.org"))
    assert {
        "r": "r._domainkey.example.org: p= does not match the private key",
        "e": "e._domainkey.example.org: no TXT record",
    } == {r["selector"]: r["detail"] for r in result["selectors"]}
    assert [("example.org", "r", "rsa-sha256", 0.0), ("example.org", "e", "ed25519-sha256",
            0.0)] == svc.published_gauges()  # fmt: skip
    assert r_key.key.txt.startswith("v=DKIM1; k=rsa; p=MII")
    svc.close()


def test_rotate_now_signs_at_once_and_retires_the_old_key_after_the_overlap(
    tmp_path: Path,
) -> None:
    clock, txt = FakeClock(), Txt()
    cfg = memory_config(tmp_path)
    svc = service(tmp_path, clock, txt, cfg)
    made = asyncio.run(svc.rotate("example.org", ["ed25519-sha256"], now_flag=True, bits=2048))
    (new,) = made["selectors"]
    assert new["zone"].startswith(f"{new['selector']}._domainkey.example.org. IN TXT ")
    states = {r["selector"]: r["state"] for r in svc.listing()}
    assert {"r": "active", "e": "retiring", new["selector"]: "active"} == states
    clock.advance(7 * DAY)
    assert "retired" == {r["selector"]: r["state"] for r in svc.listing()}["e"]
    svc.close()
    # a restart (a new service on the same files) keeps the rotation
    again = service(tmp_path, clock, txt, cfg)
    assert {"r": "active", "e": "retired", new["selector"]: "active"} == {
        r["selector"]: r["state"] for r in again.listing()
    }
    again.close()


def test_a_rotated_selector_waits_for_dns_then_the_check_starts_it(tmp_path: Path) -> None:
    clock, txt = FakeClock(), Txt()
    svc = service(tmp_path, clock, txt)
    publish(txt, svc)
    made = asyncio.run(svc.rotate("example.org", [], now_flag=False, bits=2048))
    names = [m["selector"] for m in made["selectors"]]
    assert 2 == len(names)  # both algorithms that sign now: RSA and Ed25519
    result = asyncio.run(svc.check("example.org"))
    assert (True, []) == (result["ok"], result["activated"])
    assert {"pending-dns"} == {r["state"] for r in svc.listing() if r["selector"] in names}
    publish(txt, svc)
    result = asyncio.run(svc.check("example.org"))
    assert sorted(names) == sorted(result["activated"])
    assert {"r": "retiring", "e": "retiring"} == {
        r["selector"]: r["state"] for r in svc.listing() if r["selector"] in ("r", "e")
    }
    svc.close()


def test_unknown_domains_are_refused(tmp_path: Path) -> None:
    svc = service(tmp_path, FakeClock(), Txt())
    with pytest.raises(ConfigError, match=r"other\.org is not a DKIM signing domain"):
        asyncio.run(svc.check("other.org"))
    svc.close()


def test_signature_counts_cap_domain_labels_like_every_domain_label() -> None:
    stats = DkimStats(DomainLabels(1))
    stats.count("a.org", "rsa-sha256", "ok", "s")
    stats.count("b.org", "rsa-sha256", "ok", "s")
    assert {("a.org", "rsa-sha256", "ok"): 1, ("other", "rsa-sha256", "ok"): 1} == stats.signatures
    assert {("a.org", "s"): 1, ("b.org", "s"): 1} == stats.by_selector


def test_a_key_written_by_rotate_is_private(tmp_path: Path) -> None:
    svc = service(tmp_path, FakeClock(), Txt())
    made = asyncio.run(svc.rotate("example.org", ["rsa-sha256"], now_flag=False, bits=1024))
    path = Path(made["selectors"][0]["key"])
    assert 0o600 == path.stat().st_mode & 0o777
    assert 1024 == keys.KeyCache().load(str(path), "rsa-sha256").bits
    svc.close()


def test_a_reload_keeps_the_old_keys_when_a_new_one_is_bad(tmp_path: Path) -> None:
    clock, txt = FakeClock(), Txt()
    svc = service(tmp_path, clock, txt)
    before = svc.table
    bad = Config(dkim=dkim_config(tmp_path / "b"), spool=SpoolConfig(path=str(tmp_path / "s")))
    key = next(iter(bad.dkim.domains.values())).selectors[0].key
    Path(key).chmod(0o644)
    with pytest.raises(ConfigError, match=key):
        svc.prepare(replace(bad))
    assert before is svc.table
    svc.close()
