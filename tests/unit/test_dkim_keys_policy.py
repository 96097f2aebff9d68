"""DKIM keys (checks, records), the per-message plan and the rotation decisions."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import dkim
import pytest

from empath.config.dkim import (
    DEFAULT_HEADERS,
    DEFAULT_OVERSIGN,
    DkimConfig,
    DkimDomainConfig,
    DkimSelectorConfig,
)
from empath.dkim import keys, rotation
from empath.dkim.policy import build_table, existing_signatures, from_domain, plan
from empath.dkim.sign import SignSpec, header_list, name_counts, parse_fields, sign
from empath.errors import ConfigError
from tests.helpers import require_tool

DAY = 86400.0


def key_file(tmp_path: Path, name: str, algorithm: str = "rsa-sha256") -> Path:
    path = tmp_path / f"{name}.key"
    keys.write_key(path, keys.generate("ed25519-sha256" if "ed" in algorithm else "rsa-sha256"))
    return path


# --- key checks --------------------------------------------------------------------


def test_a_missing_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read DKIM key {tmp_path}/nope.key"):
        keys.KeyCache().load(str(tmp_path / "nope.key"), "rsa-sha256")


def test_a_directory_is_not_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"DKIM key {tmp_path}"):
        keys.KeyCache().load(str(tmp_path), "rsa-sha256")


def test_a_world_readable_key_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = key_file(tmp_path, "r")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by every user \(mode 0644\); run: chmod 600"):
        keys.KeyCache().load(str(path), "rsa-sha256")


def test_a_key_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    path = key_file(tmp_path, "e", "ed25519-sha256")
    with pytest.raises(ConfigError, match="is a Ed25519 key, but the selector's algorithm is rsa"):
        keys.KeyCache().load(str(path), "rsa-sha256")


def test_an_rsa_key_under_1024_bits_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    subprocess.run(
        [require_tool("openssl"), "genpkey", "-algorithm", "RSA", "-pkeyopt",
         "rsa_keygen_bits:768", "-out", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="has 768 bits; RSA keys need at least 1024"):
        keys.KeyCache().load(str(path), "rsa-sha256")


def test_garbage_is_not_a_pem_key(tmp_path: Path) -> None:
    path = tmp_path / "junk.key"
    path.write_bytes(b"not a key\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="is not a PEM private key"):
        keys.KeyCache().load(str(path), "rsa-sha256")


def test_a_traditional_pkcs1_rsa_key_loads(tmp_path: Path) -> None:
    """Keys made by opendkim-genkey/openssl genrsa (BEGIN RSA PRIVATE KEY) are accepted."""
    path = tmp_path / "pkcs1.key"
    subprocess.run(
        [require_tool("openssl"), "genrsa", "-traditional", "-out", str(path), "2048"],
        check=True, capture_output=True,
    )  # fmt: skip
    path.chmod(0o600)
    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert 2048 == keys.KeyCache().load(str(path), "rsa-sha256").bits


def test_the_cache_parses_a_file_again_only_when_it_changed(tmp_path: Path) -> None:
    cache = keys.KeyCache()
    path = key_file(tmp_path, "r")
    first = cache.load(str(path), "rsa-sha256")
    assert first is cache.load(str(path), "rsa-sha256")
    path.unlink()
    keys.write_key(path, keys.generate("rsa-sha256"))
    assert first.public_p != cache.load(str(path), "rsa-sha256").public_p


def test_zone_lines_cut_long_records_into_255_byte_strings() -> None:
    txt = "v=DKIM1; k=rsa; p=" + "A" * 400
    line = keys.zone_line("s1", "example.org", txt)
    strings = line.split(" IN TXT ", 1)[1].split('" "')
    assert line.startswith("s1._domainkey.example.org. IN TXT ")
    assert [255, len(txt) - 255] == [len(s.strip('"')) for s in strings]


# --- headers signed, the plan ---------------------------------------------------------


def test_h_lists_each_present_field_per_occurrence_plus_one_when_oversigned() -> None:
    headers = parse_fields([b"From: a@x\r\n", b"Received: r\r\n", b"To: b\r\n", b"To: c\r\n",
                            b"X-Other: 1\r\n"])  # fmt: skip
    names = ("from", "to", "subject", "reply-to")
    key = keys.generate("ed25519-sha256")
    spec = SignSpec("x", "s", "rsa-sha256", key, "relaxed/relaxed", names, frozenset(names[::3]))
    assert ["from", "from", "to", "to", "reply-to"] == header_list(name_counts(headers), spec)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["Alice <alice@Example.ORG>"], "example.org"),
        (["alice@example.org"], "example.org"),
        (["<alice@example.org>"], "example.org"),
        (["alice@example.org>"], None),
        (['"Doe, John" <j@example.org>'], "example.org"),
        (["alice@example.org, bob@example.org"], "example.org"),
        (["alice@example.org, bob@other.org"], None),
        (["a@example.org", "b@example.org"], None),  # two From: fields
        ([], None),
        (["undisclosed"], None),
        (["Jörg <jörg@bücher.example>"], "xn--bcher-kva.example"),
    ],
)
def test_the_signing_domain_comes_from_one_from_domain(
    values: list[str], expected: str | None
) -> None:
    assert expected == from_domain(values)


def test_existing_signatures_are_read_by_d_and_s() -> None:
    values = ["v=1; a=rsa-sha256; d=Example.org; s=sel; b=abc", "garbage without tags"]
    assert {("example.org", "sel")} == existing_signatures(values)


def config(tmp_path: Path, subdomains: bool = False, **sel: str | None) -> DkimConfig:
    rsa = key_file(tmp_path, "r")
    ed = key_file(tmp_path, "e", "ed25519-sha256")
    return DkimConfig(
        domains={
            "example.org": DkimDomainConfig(
                selectors=(
                    DkimSelectorConfig(selector="r", key=str(rsa), **sel),  # type: ignore[arg-type]
                    DkimSelectorConfig(selector="e", key=str(ed), algorithm="ed25519-sha256"),
                ),
                subdomains=subdomains,
            )
        }
    )


def test_subdomains_are_signed_by_the_parent_only_when_allowed(tmp_path: Path) -> None:
    cache = keys.KeyCache()
    closed = build_table(config(tmp_path), rotation.RotationState(), cache)
    opened = build_table(config(tmp_path / "b", subdomains=True), rotation.RotationState(), cache)
    frm = ["a@mail.example.org"]
    assert plan(closed, frm, [], 0.0) is None
    what = plan(opened, frm, [], 0.0)
    assert what is not None
    assert ("example.org", ["r", "e"]) == (what.domain, [s.selector for s in what.specs])


def test_a_selector_that_already_signed_is_skipped_and_the_other_signs(tmp_path: Path) -> None:
    table = build_table(config(tmp_path), rotation.RotationState(), keys.KeyCache())
    what = plan(table, ["a@example.org"], ["v=1; d=example.org; s=r; b=x"], 0.0)
    assert what is not None
    assert (["e"], ["r"]) == ([s.selector for s in what.specs], [s.selector for s in what.skipped])


def test_every_message_gets_the_tables_own_specs_until_the_table_is_rebuilt(
    tmp_path: Path,
) -> None:
    """plan() hands out the SignSpec objects made with the table (the key process
    learns each once, by identity), with the domain's h=, over-signing and c=; a
    rebuilt table (a reload) has new ones."""
    cache = keys.KeyCache()
    cfg = config(tmp_path)
    table = build_table(cfg, rotation.RotationState(), cache)
    one, two = plan(table, ["a@example.org"], [], 0.0), plan(table, ["b@example.org"], [], 0.0)
    again = plan(build_table(cfg, rotation.RotationState(), cache), ["a@example.org"], [], 0.0)
    assert one is not None and two is not None and again is not None
    assert all(a is b for a, b in zip(one.specs, two.specs, strict=True))
    assert not any(a is b for a, b in zip(one.specs, again.specs, strict=True))
    keys_of = table.domains["example.org"]
    assert [(keys_of.headers, keys_of.oversign, keys_of.canonicalization)] * 2 == [
        (s.headers, s.oversign, s.canonicalization) for s in one.specs
    ]


def test_not_before_and_not_after_bound_a_selector(tmp_path: Path) -> None:
    cfg = config(tmp_path, not_before="2026-12-01", not_after="2026-12-31T12:00:00Z")
    table = build_table(cfg, rotation.RotationState(), keys.KeyCache())
    start, end = cfg.domains["example.org"].selectors[0].window
    assert start is not None and end is not None

    def selectors(now: float) -> list[str]:
        what = plan(table, ["a@example.org"], [], now)
        return [] if what is None else [s.selector for s in what.specs]

    assert (["e"], ["r", "e"], ["r", "e"], ["e"]) == (
        selectors(start - 1), selectors(start), selectors(end - 1), selectors(end)
    )  # fmt: skip


def test_defaults_sign_the_rfc_set_and_oversign_the_usual_fields() -> None:
    assert {"from", "subject", "date", "to", "cc", "reply-to", "message-id"} <= {
        h.lower() for h in DEFAULT_HEADERS
    }
    assert set(DEFAULT_OVERSIGN) <= set(DEFAULT_HEADERS)


def test_signatures_verify_with_dkimpy_for_both_algorithms(tmp_path: Path) -> None:
    """The pure signer's output verifies (dkimpy, keys from a dict) - the daemon tests
    do the same through DNS with three verifiers."""
    cfg = config(tmp_path)
    table = build_table(cfg, rotation.RotationState(), keys.KeyCache())
    msg = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    what = plan(table, ["a@example.org"], [], 0.0)
    assert what is not None
    fields = [b"From: a@example.org\r\n", b"Subject: hi\r\n"]
    signed = b"".join(sign(fields, b"body\r\n", what.specs, int(time.time()))) + msg
    records = {
        f"{s.selector}._domainkey.example.org.".encode(): s.key.txt.encode()
        for s in table.all_selectors()
    }
    d = dkim.DKIM(signed)
    assert [True, True] == [
        d.verify(idx=i, dnsfunc=lambda name, timeout=5: records.get(name)) for i in range(2)
    ]


# --- rotation ---------------------------------------------------------------------


def test_rotation_pending_then_published_retires_the_old_selector_after_the_overlap() -> None:
    state = rotation.rotate(
        rotation.RotationState(),
        rotation.RotatedSelector("example.org", "s2", "rsa-sha256", "/k/s2.key", 0.0),
    )
    assert rotation.window(state, "example.org", "s2", None, None) is None  # pending
    active = [
        rotation.Active("example.org", "s1", "rsa-sha256", None, None),
        rotation.Active("example.org", "e1", "ed25519-sha256", None, None),
    ]
    now = 1000.0
    state = rotation.published(state, "example.org", "s2", now, 7 * DAY, active)
    assert (now, None) == rotation.window(state, "example.org", "s2", None, None)
    assert (None, now + 7 * DAY) == rotation.window(state, "example.org", "s1", None, None)
    assert (None, None) == rotation.window(state, "example.org", "e1", None, None)
    assert state == rotation.published(state, "example.org", "s2", now + 5, 7 * DAY, active)


def test_rotation_state_survives_a_save_and_load(tmp_path: Path) -> None:
    state = rotation.published(
        rotation.rotate(
            rotation.RotationState(),
            rotation.RotatedSelector("example.org", "s2", "ed25519-sha256", "/k", 5.0),
        ),
        "example.org", "s2", 10.0, DAY,
        [rotation.Active("example.org", "s1", "ed25519-sha256", None, None)],
    )  # fmt: skip
    state = rotation.checked(state, "example.org", "s2", rotation.DnsCheck(11.0, True, "ok"))
    path = tmp_path / "state.json"
    rotation.save(path, state)
    assert 0o600 == os.stat(path).st_mode & 0o777
    assert state == rotation.load(path)


def test_a_damaged_rotation_state_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"version": 99}')
    with pytest.raises(ConfigError, match="is damaged: unsupported version 99"):
        rotation.load(path)


@pytest.mark.parametrize(
    ("template", "taken", "expected"),
    [
        ("s{YYYYMM}{r|e}", set(), "s202612r"),
        ("s{YYYYMM}{r|e}", {"s202612r"}, "s202612r2"),
        ("k{YYYY}-{MM}-{DD}", set(), "k2026-12-07"),
    ],
)
def test_new_selector_names_follow_the_template(
    template: str, taken: set[str], expected: str
) -> None:
    at = 1796612400.0  # 2026-12-07 UTC
    assert expected == rotation.next_selector(template, "rsa-sha256", at, taken)
