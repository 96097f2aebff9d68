"""DKIM keys and rotation in the running daemon, driven as an operator would:
`empath`, SIGHUP, `empathctl config reload` and `empathctl dkim keygen|check|rotate|list`,
with the public keys in a real DNS server (dnsmasq) and every relayed message checked
by dkimpy and OpenDKIM."""

from __future__ import annotations

import contextlib
import json
import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ctl import ctl, ctl_env
from tests.daemon import Daemon
from tests.dkim_support import (
    DOMAIN,
    Selector,
    dkim_section,
    dkimpy_verify,
    make_selector,
    opendkim_verify,
    signature_selectors,
    txt_records,
)
from tests.dnsmasq import DnsmasqServer, DnsRecords, dnsmasq
from tests.helpers import wait_for
from tests.integration.test_dkim_signing import message, send
from tests.sink import SmtpSink


def overrides(dns: DnsmasqServer, sink: SmtpSink, dkim: dict[str, Any]) -> dict[str, Any]:
    return {
        "delivery": {
            "dns": {"nameservers": [dns.nameserver]},
            "domains": {"sink.test": {"mx_override": f"127.0.0.1:{sink.port}"}},
        },
        "dkim": dkim,
    }


def start_fails(daemon: Daemon) -> subprocess.CompletedProcess[str]:
    daemon.write_config()
    return subprocess.run(
        [sys.executable, "-m", "empath", "--config", str(daemon.config_path)],
        capture_output=True, text=True, timeout=60, check=False, cwd=daemon.workdir,
    )  # fmt: skip


@pytest.mark.parametrize("problem", ["missing", "directory", "world-readable", "wrong-type"])
def test_start_fails_naming_the_bad_key(tmp_path: Path, problem: str) -> None:
    """A key that is missing, not a file, readable by everyone or of the wrong type
    stops start-up (exit 1) with a message naming the file; --check-config says the
    same."""
    good = make_selector(tmp_path / "keys", "ok", "rsa-sha256")
    bad_path = tmp_path / "keys" / "bad.key"
    if problem == "directory":
        bad_path.mkdir()
    elif problem == "world-readable":
        make_selector(tmp_path / "keys", "bad", "rsa-sha256").path.chmod(0o644)
    elif problem == "wrong-type":
        make_selector(tmp_path / "keys", "bad", "ed25519-sha256")
    bad = Selector("bad", "rsa-sha256", bad_path, "")
    daemon = Daemon(tmp_path / "empath", overrides={"dkim": dkim_section(DOMAIN, [good, bad])})
    result = start_fails(daemon)
    assert 1 == result.returncode
    assert str(bad_path) in result.stderr
    check = subprocess.run(
        [sys.executable, "-m", "empath", "--check-config", str(daemon.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (1, True) == (check.returncode, str(bad_path) in check.stderr)


@contextlib.contextmanager
def running(tmp_path: Path, selectors: list[Selector], **dkim: Any) -> Iterator[
    tuple[Daemon, DnsmasqServer, SmtpSink]
]:  # fmt: skip
    with contextlib.ExitStack() as stack:
        dns = stack.enter_context(
            dnsmasq(DnsRecords(txt=txt_records(DOMAIN, *selectors)), tmp_path / "dns")
        )
        sink = stack.enter_context(SmtpSink(dump=True))
        daemon = Daemon(
            tmp_path / "empath",
            overrides=overrides(dns, sink, {**dkim_section(DOMAIN, selectors), **dkim}),
        )
        stack.enter_context(daemon)
        yield daemon, dns, sink


def delivered(sink: SmtpSink, n: int, case: str) -> bytes:
    """The body of the message sent as ``message(case, ...)``, once ``n`` arrived."""
    sink.wait_messages(n, timeout=30)
    (body,) = [m.body for m in sink.messages() if f"X-Case: {case}\r\n".encode() in m.body]
    return body


def verified_selectors(body: bytes, dns: DnsmasqServer, work: Path) -> list[str]:
    """The message's selectors, after checking both verifiers pass every signature."""
    selectors = signature_selectors(body)
    assert [True] * len(selectors) == dkimpy_verify(body, dns.nameserver)
    assert dict.fromkeys(selectors, "pass") == opendkim_verify(body, dns.nameserver, work)
    return selectors


def test_a_reload_with_a_bad_key_is_refused_and_the_old_keys_keep_signing(
    tmp_path: Path,
) -> None:
    """`config reload` and SIGHUP with a world-readable key in the new config fail
    naming it; the running keys keep signing; a good new key is then applied by
    SIGHUP without a restart."""
    keydir = tmp_path / "keys"
    old = make_selector(keydir, "old", "rsa-sha256")
    new = make_selector(keydir, "new", "ed25519-sha256")
    with running(tmp_path, [old]) as (daemon, dns, sink):
        new.path.chmod(0o644)
        daemon.config["dkim"] = dkim_section(DOMAIN, [old, new])
        daemon.write_config()
        result = ctl(daemon, "config", "reload")
        assert (1, True) == (result.returncode, str(new.path) in result.stderr), result.stderr
        daemon.signal(signal.SIGHUP)
        # one line for `config reload`, one for SIGHUP
        lines = daemon.wait_log("Config reload failed; keeping the old config", count=2)
        assert [True, True] == [str(new.path) in line["fields"]["error"] for line in lines]
        send(daemon.smtp_port, message("a", b"one\r\n"))
        assert ["old"] == verified_selectors(delivered(sink, 1, "a"), dns, tmp_path / "v")

        new.path.chmod(0o600)
        with dnsmasq(DnsRecords(txt=txt_records(DOMAIN, old, new)), tmp_path / "dns2") as dns2:
            daemon.config["delivery"]["dns"]["nameservers"] = [dns2.nameserver]
            daemon.write_config()
            daemon.signal(signal.SIGHUP)
            daemon.wait_log("Config reloaded")
            send(daemon.smtp_port, message("b", b"two\r\n"))
            body = delivered(sink, 2, "b")
            assert ["old", "new"] == verified_selectors(body, dns2, tmp_path / "v")


def ctl_json(daemon: Daemon, *args: str) -> Any:
    result = ctl(daemon, *args, "--json")
    assert 0 == result.returncode, result.stderr
    return json.loads(result.stdout)


def test_rotation_end_to_end(tmp_path: Path) -> None:
    """keygen → publish → check → rotate → (publish, check) → both sign in the overlap →
    the rotation survives a restart → after the overlap only the new key signs; every
    message verifies throughout."""
    keydir = tmp_path / "keys"
    keydir.mkdir()
    gen = subprocess.run(
        ["empathctl", "dkim", "keygen", DOMAIN, "--selector", "s1", "--out",
         str(keydir / "s1.key")],
        capture_output=True, text=True, env=ctl_env(), check=False, timeout=60,
    )  # fmt: skip
    assert 0 == gen.returncode, gen.stderr
    zone = gen.stdout.splitlines()[-1]
    assert zone.startswith(f"s1._domainkey.{DOMAIN}. IN TXT ")
    txt = "".join(part.strip('"') for part in zone.split(" IN TXT ", 1)[1].split('" "'))
    s1 = Selector("s1", "rsa-sha256", keydir / "s1.key", txt)
    overlap_s = 20.0
    dkim = {**dkim_section(DOMAIN, [s1]), "rotation": {"overlap_days": overlap_s / 86400}}
    with contextlib.ExitStack() as stack:
        dns_stack = stack.enter_context(contextlib.ExitStack())
        dns = dns_stack.enter_context(
            dnsmasq(DnsRecords(txt=txt_records(DOMAIN, s1)), tmp_path / "dns")
        )
        sink = stack.enter_context(SmtpSink(dump=True))
        daemon = Daemon(tmp_path / "empath", overrides=overrides(dns, sink, dkim))
        stack.enter_context(daemon)
        sent = 0

        def signed_by() -> list[str]:
            nonlocal sent
            sent += 1
            send(daemon.smtp_port, message(f"m{sent}", b"hello\r\n"))
            body = delivered(sink, sent, f"m{sent}")
            return verified_selectors(body, dns, tmp_path / "v")

        check = ctl(daemon, "dkim", "check", DOMAIN)
        assert 0 == check.returncode, check.stdout + check.stderr
        assert f"ok: s1 (rsa-sha256): s1._domainkey.{DOMAIN}: published" in check.stdout
        assert "warning: _dmarc.example.test: no DMARC record" in check.stdout
        assert f"alignment: DKIM d={DOMAIN} aligns with From: {DOMAIN}" in check.stdout

        rotated = ctl_json(daemon, "dkim", "rotate", DOMAIN, "--algorithm", "rsa-sha256")
        (made,) = rotated["selectors"]
        s2 = Selector(made["selector"], "rsa-sha256", Path(made["key"]), made["txt"])
        assert (0o600, keydir) == (s2.path.stat().st_mode & 0o777, s2.path.parent)
        assert ["s1"] == signed_by()  # s2 waits for its DNS record
        waiting = ctl(daemon, "dkim", "check", DOMAIN)
        assert 0 == waiting.returncode
        assert f"waiting: {s2.name} (rsa-sha256)" in waiting.stdout

        # publish: the same DNS server address now also serves s2's record
        dns_stack.close()
        dns = stack.enter_context(
            dnsmasq(DnsRecords(txt=txt_records(DOMAIN, s1, s2)), tmp_path / "dns2", port=dns.port)
        )
        published = ctl(daemon, "dkim", "check", DOMAIN)
        assert 0 == published.returncode, published.stdout
        assert f"now signing with {s2.name}" in published.stdout
        assert ["s1", s2.name] == signed_by()
        rows = {r["selector"]: r for r in ctl_json(daemon, "dkim", "list")}
        assert ("retiring", "active", True) == (
            rows["s1"]["state"], rows[s2.name]["state"], rows[s2.name]["dns_ok"]
        )  # fmt: skip
        retire_at = rows["s1"]["not_after"]

        daemon.stop()
        daemon.start()
        rows = {r["selector"]: r for r in ctl_json(daemon, "dkim", "list")}
        assert ("retiring", retire_at, "active") == (
            rows["s1"]["state"], rows["s1"]["not_after"], rows[s2.name]["state"]
        )  # fmt: skip
        plain = ctl(daemon, "dkim", "list")
        assert f"domain: {DOMAIN}, selector: s1, algorithm: rsa-sha256, bits: 2048," in plain.stdout

        wait_for(lambda: signed_by() == [s2.name], timeout=overlap_s + 30, interval=1.0,
                 what="the overlap to end")  # fmt: skip
        rows = {r["selector"]: r for r in ctl_json(daemon, "dkim", "list")}
        assert "retired" == rows["s1"]["state"]


def test_mail_from_an_authenticated_client_is_signed_without_trusted_networks(
    tmp_path: Path,
) -> None:
    """With no trusted network at all, alice's authenticated submission (STARTTLS +
    AUTH) is signed for her From: domain and verifies; `auth_user` is what allows it."""
    from tests.submission import PASSWORD, make_submission

    key = make_selector(tmp_path / "keys", "sub1", "ed25519-sha256")
    with (
        dnsmasq(DnsRecords(txt=txt_records("example.org", key)), tmp_path / "dns") as dns,
        SmtpSink(dump=True) as sink,
    ):
        sub = make_submission(tmp_path / "sub", sink_port=sink.port)
        sub.daemon.config["dkim"] = dkim_section("example.org", [key])
        sub.daemon.config["delivery"]["dns"] = {"nameservers": [dns.nameserver]}
        with sub.daemon:
            with smtplib.SMTP("127.0.0.1", sub.starttls_port, timeout=30) as c:
                c.starttls(context=sub.client_context())
                c.login("alice", PASSWORD)
                c.sendmail("alice@example.org", ["bob@sink.test"],
                           b"From: Alice <alice@example.org>\r\nTo: bob@sink.test\r\n"
                           b"Subject: submitted\r\n\r\nsigned for alice\r\n")  # fmt: skip
            sink.wait_messages(1, timeout=30)
            (body,) = [m.body for m in sink.messages()]
            assert ["sub1"] == verified_selectors(body, dns, tmp_path / "v")
            (line,) = sub.daemon.wait_log("Message received", auth_user="alice")
            assert ("example.org", "sub1") == (
                line["fields"]["dkim_domain"], line["fields"]["dkim_selectors"]
            )  # fmt: skip
