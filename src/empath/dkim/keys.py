"""DKIM private keys: load and check them, generate them, and their DNS TXT records.

A key file is checked when the config is loaded, reloaded or checked
(``--check-config``), never first at signing time:

* it can be opened and read (a missing or unreadable file names the file);
* it is not readable by everyone (``o+r``): a signing key the whole machine can read
  lets anyone on it sign as the domain.  ``keygen`` and ``rotate`` write 0600;
* it is a PEM private key (PKCS#8 or the traditional PKCS#1 ``RSA PRIVATE KEY``)
  of the type the selector's ``algorithm`` names (RSA for ``rsa-sha256``, Ed25519
  for ``ed25519-sha256``);
* an RSA key has at least 1024 bits (RFC 8301 §3.2: verifiers MUST NOT accept
  shorter ones; 2048 is what keygen makes).

Parsed keys are cached by (path, inode, size, mtime): a reload that leaves a file
alone does not parse it again, a replaced file is parsed and checked afresh.

The TXT record published for a key (RFC 6376 §3.6.1; RFC 8463 §4.2 for Ed25519):
``v=DKIM1; k=rsa; p=<base64 DER SubjectPublicKeyInfo>`` or ``v=DKIM1; k=ed25519;
p=<base64 of the 32 raw public key bytes>``.  A zone file wants a long value cut
into quoted strings of at most 255 bytes (RFC 1035 §3.3), which
:func:`zone_line` does.
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from empath.config.dkim import Algorithm
from empath.errors import ConfigError

MIN_RSA_BITS: Final = 1024
DEFAULT_RSA_BITS: Final = 2048
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class LoadedKey:
    """A checked private key and what ``dkim list`` shows about it."""

    path: str
    algorithm: Algorithm
    private: PrivateKey
    bits: int  # RSA modulus size; 256 for Ed25519
    mtime: float  # the file's modification time (key age)

    @property
    def public_p(self) -> str:
        """The ``p=`` value of this key's DNS record."""
        return public_p(self.private)

    @property
    def txt(self) -> str:
        return txt_value(self.private)


def public_p(private: PrivateKey) -> str:
    pub = private.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return base64.b64encode(raw).decode("ascii")


def txt_value(private: PrivateKey) -> str:
    kind = "ed25519" if isinstance(private, ed25519.Ed25519PrivateKey) else "rsa"
    return f"v=DKIM1; k={kind}; p={public_p(private)}"


def zone_line(selector: str, domain: str, txt: str) -> str:
    """``S._domainkey.D. IN TXT ( "..." "..." )``: the value in <= 255-byte strings."""
    parts = [txt[i : i + 255] for i in range(0, len(txt), 255)] or [""]
    quoted = " ".join(f'"{p}"' for p in parts)
    return f"{selector}._domainkey.{domain}. IN TXT {quoted}"


class KeyCache:
    """Parsed keys by file identity (module doc); shared across reloads."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], tuple[tuple[int, int, int], LoadedKey]] = {}

    def load(self, path: str, algorithm: Algorithm, *, where: str = "") -> LoadedKey:
        """The checked key at ``path``; ConfigError naming the file otherwise."""
        label = f"{where}: " if where else ""
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                ident = (st.st_ino, st.st_size, st.st_mtime_ns)
                cached = self._keys.get((path, algorithm))
                if cached is not None and cached[0] == ident:
                    return cached[1]
                if not stat.S_ISREG(st.st_mode):
                    raise ConfigError(f"{label}DKIM key {path} is not a regular file")
                if st.st_mode & stat.S_IROTH:
                    raise ConfigError(
                        f"{label}DKIM key {path} is readable by every user (mode "
                        f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
                    )
                data = fh.read()
        except OSError as exc:
            raise ConfigError(
                f"{label}cannot read DKIM key {path}: {exc.strerror or exc}"
            ) from None
        key = parse_key(data, algorithm, path, label)
        loaded = LoadedKey(path, algorithm, key, key_bits(key), st.st_mtime)
        self._keys[(path, algorithm)] = (ident, loaded)
        return loaded


def key_bits(key: PrivateKey) -> int:
    return key.key_size if isinstance(key, rsa.RSAPrivateKey) else 256


def parse_key(data: bytes, algorithm: Algorithm, path: str, label: str = "") -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{label}DKIM key {path} is not a PEM private key without a passphrase ({exc})"
        ) from None
    want = ed25519.Ed25519PrivateKey if algorithm == "ed25519-sha256" else rsa.RSAPrivateKey
    if not isinstance(key, want):
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
        raise ConfigError(
            f"{label}DKIM key {path} is a {kind} key, but the selector's algorithm is "
            f"{algorithm} (it needs {'an Ed25519' if want is not rsa.RSAPrivateKey else 'an RSA'}"
            " key)"
        )
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        raise ConfigError(
            f"{label}DKIM key {path} has {key.key_size} bits; RSA keys need at least "
            f"{MIN_RSA_BITS} (RFC 8301), 2048 is usual"
        )
    return key


def generate(algorithm: Algorithm, bits: int = DEFAULT_RSA_BITS) -> PrivateKey:
    if algorithm == "ed25519-sha256":
        return ed25519.Ed25519PrivateKey.generate()
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_key(path: Path, key: PrivateKey) -> None:
    """Write ``key`` as PKCS#8 PEM, mode 0600 from the first byte, never over a file."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
