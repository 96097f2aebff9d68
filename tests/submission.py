"""A daemon with submission listeners (DESIGN §13) for tests and benchmarks.

Three listeners: ``plain`` (no AUTH, like port 25), ``starttls`` (587 style: STARTTLS,
AUTH required) and ``implicit`` (465 style, RFC 8314), a trustme certificate, a users
file with ``alice`` (password ``s3cret``, senders ``alice@example.org`` and
``*@alice.test``), an empty ``trusted_networks`` (so only AUTH lets a client relay)
and, optionally, an smtp-sink as the MX of ``sink.test``.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from empath.submission.users import UserEntry, UsersFile, hash_password, write_users
from tests.daemon import Daemon
from tests.helpers import free_port

PASSWORD = "s3cret"
ALICE = UserEntry(password=hash_password(PASSWORD), senders=("alice@example.org", "*@alice.test"))


@dataclass
class Submission:
    daemon: Daemon
    starttls_port: int
    implicit_port: int
    ca_path: Path
    users_path: Path
    ca: trustme.CA

    @property
    def plain_port(self) -> int:
        return self.daemon.smtp_port

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        ctx.check_hostname = False  # clients connect to 127.0.0.x
        return ctx


def plain_b64(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def make_submission(
    workdir: Path,
    *,
    sink_port: int | None = None,
    auth: dict[str, Any] | None = None,
    users: dict[str, UserEntry] | None = None,
    smtp_host: str = "127.0.0.1",
    key_type: str = "ecdsa",
) -> Submission:
    workdir.mkdir(parents=True, exist_ok=True)
    # ECDSA P-256 (what docs/TLS advice recommends: the server's handshake signature is
    # far cheaper than RSA-2048's); "rsa" for the bench's comparison
    kt = trustme.KeyType.RSA if key_type == "rsa" else trustme.KeyType.ECDSA
    ca = trustme.CA(key_type=kt)
    cert = ca.issue_cert("localhost", "127.0.0.1", "empath.test", key_type=kt)
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    ca_path = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    users_path = workdir / "users"
    write_users(str(users_path), UsersFile(users if users is not None else {"alice": ALICE}))
    starttls_port, implicit_port = free_port(smtp_host), free_port(smtp_host)
    tls = {"certificate": str(cert_path), "key": str(key_path)}
    auth_cfg = {"required": True, "users_file": str(users_path), **(auth or {})}
    overrides: dict[str, Any] = {
        "smtp_controller": {
            "relay": {"trusted_networks": [], "accepted_domains": []},
        },
    }
    if sink_port is not None:
        mx = {"mx_override": f"127.0.0.1:{sink_port}"}
        overrides["delivery"] = {"domains": {"sink.test": mx}}
    daemon = Daemon(workdir / "empath", overrides=overrides, smtp_host=smtp_host)
    first = daemon.config["smtp_controller"]["listeners"][0]
    daemon.config["smtp_controller"]["listeners"] = [
        first,
        {"socket": f"{smtp_host}:{starttls_port}", "tls": {**tls, "mode": "starttls"},
         "auth": auth_cfg},
        {"socket": f"{smtp_host}:{implicit_port}", "tls": {**tls, "mode": "implicit"},
         "auth": auth_cfg},
    ]  # fmt: skip
    return Submission(daemon, starttls_port, implicit_port, ca_path, users_path, ca)
