"""DKIM signing end to end: the daemon signs at acceptance, relays to real peers, and
two independent verifiers (dkimpy and Perl's Mail::DKIM) check every message
against keys served by a real DNS server (dnsmasq).

Peers: Postfix's smtp-sink for most messages; the project's scripted peer (which
offers SMTPUTF8, smtp-sink does not) for the SMTPUTF8 one.
"""

from __future__ import annotations

import contextlib
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest

from tests.daemon import Daemon, RawSmtp, ThreadedPeer
from tests.dkim_support import (
    DOMAIN,
    Selector,
    dkim_section,
    dkimpy_verify,
    make_selector,
    opendkim_verify,
    perl_passes,
    signature_selectors,
    txt_records,
)
from tests.dnsmasq import DnsmasqServer, DnsRecords, dnsmasq
from tests.helpers import require_tool, wait_for
from tests.sink import SmtpSink

FOREIGN = "other.test"
BIG_LINE = b"All work and no play makes Jack a dull boy, 0123456789 abcdefghij\r\n"


@dataclass
class Rig:
    daemon: Daemon
    dns: DnsmasqServer
    sink: SmtpSink
    peer: ThreadedPeer
    rsa: Selector
    ed: Selector
    foreign: Selector


@contextlib.contextmanager
def rig(tmp_path: Path, canonicalization: str) -> Iterator[Rig]:
    keydir = tmp_path / "keys"
    rsa = make_selector(keydir, "s2026r", "rsa-sha256")
    ed = make_selector(keydir, "s2026e", "ed25519-sha256")
    foreign = make_selector(keydir, "f1", "rsa-sha256")
    records = DnsRecords(
        txt={**txt_records(DOMAIN, rsa, ed), **txt_records(FOREIGN, foreign)},
        zones=("test",),
    )
    with contextlib.ExitStack() as stack:
        dns = stack.enter_context(dnsmasq(records, tmp_path / "dns"))
        sink = stack.enter_context(SmtpSink(dump=True))
        peer = stack.enter_context(ThreadedPeer())
        daemon = Daemon(
            tmp_path / "empath",
            overrides={
                "delivery": {
                    "dns": {"nameservers": [dns.nameserver]},
                    "domains": {
                        "sink.test": {"mx_override": f"127.0.0.1:{sink.port}"},
                        "utf8.test": {"mx_override": peer.address},
                    },
                },
                "dkim": dkim_section(DOMAIN, [rsa, ed], canonicalization),
            },
        )
        stack.enter_context(daemon)
        yield Rig(daemon, dns, sink, peer, rsa, ed, foreign)


def message(case: str, body: bytes, *, extra: bytes = b"", subject: bytes = b"test") -> bytes:
    return (
        extra + b"From: Alice Example <alice@" + DOMAIN.encode() + b">\r\n"
        b"To: Bob <bob@sink.test>\r\n"
        b"Subject: " + subject + b"\r\n"
        b"Date: Mon, 07 Dec 2026 03:00:00 +0000\r\n"
        b"Message-ID: <" + case.encode() + b"@example.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"X-Case: " + case.encode() + b"\r\n"
        b"\r\n" + body
    )


def foreign_signed(rig_: Rig, msg: bytes, selector: Selector, domain: str) -> bytes:
    """``msg`` signed by someone else before it reaches Empath (dkimpy's signer)."""
    sig = dkim.sign(
        msg, selector.name.encode(), domain.encode(), selector.path.read_bytes(),
        canonicalize=(b"relaxed", b"relaxed"), include_headers=[b"from", b"subject"],
    )  # fmt: skip
    return bytes(sig) + msg


def send(port: int, msg: bytes, rcpt: str = "bob@sink.test", options: tuple[str, ...] = ()) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.sendmail(f"alice@{DOMAIN}", [rcpt], msg, mail_options=list(options))


def send_bdat(port: int, msg: bytes) -> None:
    half = len(msg) // 2
    with RawSmtp("127.0.0.1", port) as r:
        assert 220 == r.reply()[0]
        r.send(b"EHLO client.test\r\n")
        assert 250 == r.reply()[0]
        r.send(f"MAIL FROM:<alice@{DOMAIN}>\r\nRCPT TO:<bob@sink.test>\r\n".encode())
        assert [250, 250] == r.codes(2)
        r.send(b"BDAT %d\r\n" % half + msg[:half])
        assert 250 == r.reply()[0]
        r.send(b"BDAT %d LAST\r\n" % (len(msg) - half) + msg[half:])
        assert 250 == r.reply()[0]


def delivered_by_case(rig_: Rig, n: int) -> dict[str, bytes]:
    rig_.sink.wait_messages(n, timeout=60)
    out = {}
    for m in rig_.sink.messages():
        case = m.body.split(b"X-Case: ", 1)[1].split(b"\r\n", 1)[0].decode()
        out[case] = m.body
    return out


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_every_relayed_message_verifies_with_dkimpy_and_mail_dkim(
    tmp_path: Path, canonicalization: str
) -> None:
    """Dual RSA-2048 + Ed25519 signatures made at acceptance verify with both
    verifiers on every awkward body and header shape, over DATA and BDAT; a foreign
    signature stays valid next to ours; a signature with our own d=/s= is not made
    twice."""
    require_tool("perl")
    with rig(tmp_path, canonicalization) as r:
        port = r.daemon.smtp_port
        cases: dict[str, bytes] = {
            "eightbit": message("eightbit", "Grüße, naïve café - ok\r\n".encode()),
            "dots": message("dots", b".hidden\r\n..two dots\r\n.\r\nlast\r\n"),
            "trailing": message("trailing", b"text  \r\n\r\n\r\n\r\n"),
            "folded": message(
                "folded",
                b"body\r\n",
                subject=b"a very long\r\n  folded\r\n\tsubject   line",
                extra=b"Cc: one <one@sink.test>,\r\n   two <two@sink.test>\r\n",
            ),
            "big": message("big", BIG_LINE * (5 * 1024 * 1024 // len(BIG_LINE) + 1)),
            "empty": message("empty", b""),
        }
        send(port, cases["eightbit"], options=("BODY=8BITMIME",))
        for case in ("dots", "trailing", "folded", "big", "empty"):
            send(port, cases[case])
        cases["bdat"] = message("bdat", b"chunked\r\nbody\r\n" * 100)
        send_bdat(port, cases["bdat"])
        cases["foreign"] = foreign_signed(
            r, message("foreign", b"signed before\r\n"), r.foreign, FOREIGN
        )
        send(port, cases["foreign"])
        cases["own"] = foreign_signed(r, message("own", b"already ours\r\n"), r.rsa, DOMAIN)
        send(port, cases["own"])
        utf8 = message("utf8", "Unicode body ✓\r\n".encode(), subject="Grüße ✓".encode())
        utf8 = utf8.replace(b"From: Alice Example <alice@", "From: Jörg <jörg@".encode())
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.sendmail(f"jörg@{DOMAIN}", ["bob@utf8.test"], utf8,
                       mail_options=["SMTPUTF8", "BODY=8BITMIME"])  # fmt: skip

        got = delivered_by_case(r, len(cases))
        (utf8_txn,) = r.peer.wait_delivered(1, timeout=60)
        got["utf8"] = utf8_txn.body
        ns = r.dns.nameserver
        both = [r.rsa.name, r.ed.name]
        for case, body in got.items():
            selectors = signature_selectors(body)
            expected = {
                "foreign": [*both, r.foreign.name],
                "own": [r.ed.name, r.rsa.name],  # Empath added only the Ed25519 one
            }.get(case, both)
            assert (case, expected) == (case, selectors)
            assert (case, [True] * len(selectors)) == (case, dkimpy_verify(body, ns))
            assert (case, dict.fromkeys(selectors, "pass")) == (
                case, opendkim_verify(body, ns, tmp_path / "odk")
            )  # fmt: skip
            assert (case, mail_dkim_expected(selectors, r)) == (case, perl_passes(body, ns))
            sent = cases.get(case, utf8)
            assert body.endswith(sent.split(b"\r\n\r\n", 1)[1]) or case == "trailing"


def mail_dkim_expected(selectors: list[str], r: Rig) -> dict[str, str]:
    """Mail::DKIM passes RSA; Debian 12's version predates Ed25519 (tests/dkim_support.py)."""
    return {s: "invalid" if s == r.ed.name else "pass" for s in selectors}


def tampered(body: bytes, old: bytes, new: bytes) -> bytes:
    assert old in body
    return body.replace(old, new, 1)


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_one_changed_body_byte_or_signed_header_fails_both_verifiers(
    tmp_path: Path, canonicalization: str
) -> None:
    """A peer that changes one body byte, or the Subject, or adds a second From:
    (over-signed) gets a message that neither verifier passes."""
    with rig(tmp_path, canonicalization) as r:
        send(r.daemon.smtp_port, message("t", b"pay 100 EUR to account 1234\r\n"))
        (body,) = delivered_by_case(r, 1).values()
        ns = r.dns.nameserver
        assert [True, True] == dkimpy_verify(body, ns)
        for bad in (
            tampered(body, b"pay 100", b"pay 900"),
            tampered(body, b"Subject: test", b"Subject: tesT"),
            tampered(body, b"X-Case:", b"From: mallory@evil.test\r\nX-Case:"),
        ):
            assert [False, False] == dkimpy_verify(bad, ns)
            assert {"fail"} == set(opendkim_verify(bad, ns, tmp_path / "odk").values())
            assert {"s2026r": "fail", "s2026e": "invalid"} == perl_passes(bad, ns)


def test_mail_from_other_domains_and_untrusted_clients_is_not_signed(tmp_path: Path) -> None:
    """Only a From: domain with keys is signed; a subdomain only with subdomains: true
    (and then with d= the parent)."""
    with rig(tmp_path, "relaxed/relaxed") as r:
        port = r.daemon.smtp_port
        send(port, message("other", b"x\r\n").replace(b"alice@example.test", b"a@else.test"))
        send(port, message("sub", b"x\r\n").replace(b"@example.test>", b"@mail.example.test>"))
        got = delivered_by_case(r, 2)
        assert ([], []) == (signature_selectors(got["other"]), signature_selectors(got["sub"]))


def test_message_received_log_names_the_signing_domain_and_selectors(tmp_path: Path) -> None:
    with rig(tmp_path, "relaxed/relaxed") as r:
        send(r.daemon.smtp_port, message("log", b"x\r\n"))
        (line,) = r.daemon.wait_log("Message received")
        fields = line["fields"]
        assert (DOMAIN, "s2026r,s2026e") == (fields["dkim_domain"], fields["dkim_selectors"])


def test_metrics_count_signatures_and_pass_promtool(tmp_path: Path) -> None:
    """A live scrape has the DKIM counters and histogram and passes promtool."""
    with rig(tmp_path, "relaxed/relaxed") as r:
        for i in range(3):
            send(r.daemon.smtp_port, message(f"m{i}", b"x\r\n"))
        delivered_by_case(r, 3)
        text = r.daemon.http_get("/metrics")
        for alg in ("rsa-sha256", "ed25519-sha256"):
            labels = f'domain="{DOMAIN}",algorithm="{alg}",result="ok"'
            assert f"empath_dkim_signatures_total{{{labels}}} 3.0" in text
        assert "empath_dkim_sign_duration_seconds_count 3.0" in text
        wait_for(lambda: "empath_dkim_key_published{" in r.daemon.http_get("/metrics"),
                 timeout=20, what="the first DNS check")  # fmt: skip
        text = r.daemon.http_get("/metrics")
        assert f'empath_dkim_key_published{{domain="{DOMAIN}",selector="s2026r",' in text
        check = subprocess.run(
            [require_tool("promtool"), "check", "metrics"], input=text.encode(),
            capture_output=True, check=False, timeout=60,
        )  # fmt: skip
        assert 0 == check.returncode, check.stdout + check.stderr
