"""The users file of SMTP AUTH (DESIGN §13): argon2id hashes and owned sender patterns.

Theory of operation
-------------------
The file is RON, read with the config reader (so every error names file:line:column
and the key path) and written by ``empathctl user`` only::

    // Empath users (DESIGN §13): managed with `empathctl user`; mode 0600
    Users (
      users: {
        "alice": ( password: "$argon2id$v=19$m=65536,t=3,p=4$...", senders: ["alice@example.org"] ),
        "app": ( password: "$argon2id$...", senders: ["*@example.org"], null_sender: true,
                 messages_per_hour: 5000, recipients_per_message: 500 ),
      },
    )

Writes are atomic: a temporary file in the same directory, created mode 0600,
fsync'd, renamed over the old one, the directory fsync'd.  The daemon notices a new
file by its (inode, size, mtime) and re-reads it; a file that does not load is
refused with its file:line and the previous users stay in force.

Hashes are argon2id (argon2-cffi's defaults: 64 MiB, 3 passes, ~0.1 s per check by
design).  Verifying is CPU-bound and releases the GIL, so the daemon runs it in a
thread (see ``empath.submission.authenticator``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import argon2

from empath.config.checks import non_negative, rule
from empath.config.load import bind, read_text
from empath.config.ron import parse
from empath.config.ron_write import MapValue, dumps

__all__ = [
    "FileStamp",
    "UserEntry",
    "UsersFile",
    "hash_password",
    "load_users",
    "render_users",
    "stamp_of",
    "verify_password",
    "write_users",
]

_HEADER: Final = "// Empath users (DESIGN §13): managed with `empathctl user`; keep it mode 0600\n"
_HASHER: Final = argon2.PasswordHasher()  # argon2id, the library's RFC 9106 defaults


def _argon2id(value: str) -> str | None:
    return None if value.startswith("$argon2id$") else "must be an argon2id hash ($argon2id$...)"


def _pattern(value: str) -> str | None:
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or "*" in domain or ("*" in local and local != "*"):
        return "must be an address (alice@example.org) or *@domain"
    return None


@dataclass(frozen=True, slots=True)
class UserEntry:
    password: str = field(metadata={"check": _argon2id}, repr=False)
    senders: tuple[str, ...] = rule((), check_each=_pattern)
    null_sender: bool = False  # may use MAIL FROM:<> (its own DSNs)
    # None: the listener's auth.quotas default; 0: unlimited
    messages_per_hour: int | None = rule(None, check=non_negative)
    recipients_per_message: int | None = rule(None, check=non_negative)


@dataclass(frozen=True, slots=True)
class UsersFile:
    users: Mapping[str, UserEntry] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What tells a rewritten file from the one loaded (rename gives a new inode)."""

    inode: int
    size: int
    mtime_ns: int


def stamp_of(path: str) -> FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileStamp(st.st_ino, st.st_size, st.st_mtime_ns)


def load_users(path: str) -> UsersFile:
    """Read and check the users file; ConfigError (file:line:column) when it is bad."""
    text = read_text(path, "users file")
    if not text.strip():
        return UsersFile()
    return bind(parse(text, file=path), UsersFile, file=path)


def render_users(users: UsersFile) -> str:
    """The file's text (users sorted by name; unset optional fields left out)."""
    out: dict[str, object] = {}
    for name in sorted(users.users):
        entry = users.users[name]
        item: dict[str, object] = {"password": entry.password, "senders": list(entry.senders)}
        if entry.null_sender:
            item["null_sender"] = True
        if entry.messages_per_hour is not None:
            item["messages_per_hour"] = entry.messages_per_hour
        if entry.recipients_per_message is not None:
            item["recipients_per_message"] = entry.recipients_per_message
        out[name] = item
    return _HEADER + dumps({"users": MapValue(out)}, name="Users") + "\n"


def write_users(path: str, users: UsersFile) -> None:
    """Replace the file atomically, mode 0600 (see module doc)."""
    text = render_users(users).encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".users.", dir=directory)  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(hashed: str, password: str) -> bool:
    """Blocking (~0.1 s of CPU, GIL released): call from a worker thread."""
    try:
        return _HASHER.verify(hashed, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False
