"""DKIM test support: keys, their DNS records, and two independent verifiers.

* :func:`dkimpy_verify`: dkimpy's verifier, keys looked up with dnspython at the
  given DNS server (a test's dnsmasq);
* :func:`perl_verify`: Perl's Mail::DKIM (Debian ``libmail-dkim-perl``; the verifier
  behind SpamAssassin and Amavis), through ``tests/data/dkim_verify.pl``, resolving
  with Net::DNS at the same server.  Debian 12 ships Mail::DKIM 1.20230212, one
  release before Ed25519 support (1.20230630): it answers ``invalid (unsupported
  algorithm ed25519-sha256)`` for those, so Ed25519 gets its second verifier from
* :func:`opendkim_verify`: OpenDKIM's ``opendkim -t`` (libopendkim, C; Debian
  ``opendkim``), resolving through its libunbound with a forwarder to the same
  server (unbound serves ``test.`` itself unless told ``nodefault``).

All see the message as the relay's peer received it.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import dns.resolver

from empath.config.dkim import Algorithm
from empath.dkim import keys
from tests.helpers import require_tool

PERL_VERIFIER = Path(__file__).parent / "data" / "dkim_verify.pl"
DOMAIN = "example.test"


@dataclass(frozen=True)
class Selector:
    name: str
    algorithm: Algorithm
    path: Path
    txt: str

    def config(self) -> dict[str, Any]:
        return {"selector": self.name, "algorithm": self.algorithm, "key": str(self.path)}


def make_selector(directory: Path, name: str, algorithm: Algorithm, bits: int = 2048) -> Selector:
    private = keys.generate(algorithm, bits)
    path = directory / f"{name}.key"
    keys.write_key(path, private)
    return Selector(name, algorithm, path, keys.txt_value(private))


def txt_records(domain: str, *selectors: Selector) -> dict[str, list[str]]:
    return {f"{s.name}._domainkey.{domain}": [s.txt] for s in selectors}


def dkim_section(
    domain: str, selectors: list[Selector], canonicalization: str = "relaxed/relaxed", **kw: Any
) -> dict[str, Any]:
    entry = {"selectors": [s.config() for s in selectors], "canonicalization": canonicalization}
    return {"domains": {domain: {**entry, **kw}}}


def _resolver(nameserver: str) -> dns.resolver.Resolver:
    host, _, port = nameserver.rpartition(":")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = int(port)
    resolver.lifetime = 5.0
    return resolver


def dkimpy_verify(message: bytes, nameserver: str) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of ``message``, top first."""
    resolver = _resolver(nameserver)

    def get_txt(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(rr.strings) for rr in answer)

    verifier = dkim.DKIM(message)
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    results = []
    for i in range(count):
        try:
            results.append(bool(verifier.verify(idx=i, dnsfunc=get_txt)))
        except dkim.DKIMException:  # e.g. "body hash mismatch" is raised, not returned
            results.append(False)
    return results


_PERL_LINE = re.compile(r"^(\w+) d=(\S*) s=(\S*) a=(\S*) ?(.*)$")


@dataclass(frozen=True)
class PerlResult:
    result: str  # pass | fail | invalid | none ...
    domain: str
    selector: str
    algorithm: str
    detail: str


def perl_verify(message: bytes, nameserver: str) -> list[PerlResult]:
    """Mail::DKIM's verdict on each signature (in the order it lists them)."""
    host, _, port = nameserver.rpartition(":")
    out = subprocess.run(
        [require_tool("perl"), str(PERL_VERIFIER), host, port],
        input=message,
        capture_output=True,
        check=True,
        timeout=60,
    )
    results = []
    for line in out.stdout.decode().splitlines():
        m = _PERL_LINE.match(line)
        if m is not None:
            results.append(PerlResult(*m.groups()))
    return results


def perl_passes(message: bytes, nameserver: str) -> dict[str, str]:
    """``selector → result`` from Mail::DKIM."""
    return {r.selector: r.result for r in perl_verify(message, nameserver)}


_AR_RESULT = re.compile(r"dkim=(\w+).*?header\.s=([^\s;]+)")


def opendkim_verify(message: bytes, nameserver: str, workdir: Path) -> dict[str, str]:
    """``selector → result`` (pass, fail, ...) from OpenDKIM's Authentication-Results."""
    host, _, port = nameserver.rpartition(":")
    workdir.mkdir(parents=True, exist_ok=True)
    unbound = workdir / "unbound.conf"
    unbound.write_text(
        'server:\n  do-not-query-localhost: no\n  local-zone: "test." nodefault\n'
        f'forward-zone:\n  name: "."\n  forward-addr: {host}@{port}\n'
    )
    conf = workdir / "opendkim.conf"
    conf.write_text(f"Mode v\nResolverConfiguration {unbound}\nSyslog no\nAlwaysAddARHeader yes\n")
    path = workdir / "message.eml"
    path.write_bytes(message)
    out = subprocess.run(
        [require_tool("opendkim"), "-x", str(conf), "-vvv", "-t", str(path)],
        capture_output=True, check=True, timeout=60, text=True,
    )  # fmt: skip
    ar = out.stdout.split("hvalue=", 1)[-1].replace("\n", " ")
    return {sel: result for result, sel in _AR_RESULT.findall(ar)}


def signature_selectors(message: bytes) -> list[str]:
    """The ``s=`` of each DKIM-Signature, top first."""
    head = message.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    out = []
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"dkim-signature:"):
            m = re.search(rb"\bs=([^;\s]+)", line)
            out.append(m.group(1).decode() if m else "")
    return out


# A stand-in DKIM key process for failure tests (dkim/keyproc.py's protocol): it
# answers every sign request with an error frame, as a child whose key cannot sign.
ERRING_KEY_PROCESS = r"""
import os, struct, sys
buf = b""
while True:
    data = os.read(0, 65536)
    if not data:
        break
    buf += data
    while len(buf) >= 5:
        kind, length = struct.unpack("!BI", buf[:5])
        if len(buf) < 5 + length:
            break
        body, buf = buf[5 : 5 + length], buf[5 + length :]
        if kind in (ord("S"), ord("M")):  # fields and body, or the message as received
            text = b"HSM unplugged"
            (request,) = struct.unpack("!Q", body[:8])
            os.write(1, struct.pack("!BIQ", ord("E"), 8 + len(text), request) + text)
"""
