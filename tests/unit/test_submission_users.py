"""The users file (argon2id hashes, sender patterns) and the Authenticator that checks
credentials against it: reload on change, the success cache, unknown users, blocks."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, TypeVar

import pytest

from empath.config.model import AuthLimits, ListenerAuth
from empath.errors import ConfigError
from empath.smtp.sasl import Credentials, Mechanism
from empath.submission.authenticator import Authenticator
from empath.submission.users import (
    UserEntry,
    UsersFile,
    hash_password,
    load_users,
    verify_password,
    write_users,
)
from empath.testing.clock import FakeClock

T = TypeVar("T")

HASH = hash_password("s3cret")  # one real argon2id hash for the module (~0.1 s)


def users_file(tmp_path: Path, **users: UserEntry) -> str:
    path = str(tmp_path / "users")
    write_users(path, UsersFile(users))
    return path


def alice(**changes: Any) -> UserEntry:
    return UserEntry(**{"password": HASH, "senders": ("alice@example.org",), **changes})


def test_written_file_reads_back_and_is_mode_0600(tmp_path: Path) -> None:
    """write_users then load_users gives the same users; the file is 0600."""
    entry = alice(null_sender=True, messages_per_hour=5)
    path = users_file(tmp_path, alice=entry)
    assert UsersFile({"alice": entry}) == load_users(path)
    assert 0o600 == stat.S_IMODE(os.stat(path).st_mode)
    assert verify_password(load_users(path).users["alice"].password, "s3cret")
    assert not verify_password(HASH, "wrong")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('Users ( users: { "a": ( password: "plain", senders: [] ) } )', ":1:"),
        ('Users (\n  users: { "a": ( password: "$argon2id$x", senders: ["nope"] ) },\n)', ":2:"),
        ('Users (\n  users: {\n    "a": ( passwd: "x" ),\n  },\n)', ":3:"),
        ("Users ( users: { ", ":1:"),
    ],
)
def test_malformed_file_names_file_and_line(tmp_path: Path, text: str, where: str) -> None:
    """Not argon2id, a bad sender pattern, an unknown key, broken syntax: file:line."""
    path = tmp_path / "users"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_users(str(path))
    assert f"{path}{where}" in str(info.value)


def auth_for(path: str, **changes: Any) -> ListenerAuth:
    return ListenerAuth(users_file=path, **changes)


async def test_unknown_user_and_wrong_password_get_the_same_reply(tmp_path: Path) -> None:
    """Both are 535 5.7.8 with the same text, and both were checked against a hash."""
    calls: list[str] = []

    def verify(hashed: str, password: str) -> bool:
        calls.append(hashed)
        return verify_password(hashed, password)

    auth = Authenticator(auth_for(users_file(tmp_path, alice=alice())), clock=FakeClock(),
                         verify=verify)  # fmt: skip
    wrong = await auth.authenticate(Credentials(Mechanism.PLAIN, "alice", "x"), "10.0.0.1", "p")
    unknown = await auth.authenticate(Credentials(Mechanism.PLAIN, "bob", "x"), "10.0.0.1", "p")
    assert wrong == unknown
    assert wrong.reply is not None and (535, "5.7.8") == (wrong.reply.code, wrong.reply.enhanced)
    assert 2 == len(calls) and all(h.startswith("$argon2id$") for h in calls)
    auth.close()


async def test_success_is_cached_and_a_changed_file_clears_the_cache(tmp_path: Path) -> None:
    """The second login with the same password skips argon2; a rewritten users file (new
    password) is picked up at the next AUTH and the old password stops working."""
    calls: list[str] = []

    def verify(hashed: str, password: str) -> bool:
        calls.append(password)
        return verify_password(hashed, password)

    path = users_file(tmp_path, alice=alice())
    auth = Authenticator(auth_for(path), clock=FakeClock(), verify=verify)
    good = Credentials(Mechanism.PLAIN, "alice", "s3cret")
    first = await auth.authenticate(good, "10.0.0.1", "p")
    second = await auth.authenticate(good, "10.0.0.1", "p")
    assert first.grant is not None and second.grant is not None
    assert ["s3cret"] == calls
    write_users(path, UsersFile({"alice": alice(password=hash_password("new"))}))
    assert (await auth.authenticate(good, "10.0.0.1", "p")).grant is None
    fresh = Credentials(Mechanism.PLAIN, "alice", "new")
    assert (await auth.authenticate(fresh, "10.0.0.1", "p")).grant is not None
    auth.close()


async def test_without_cache_every_login_is_verified(tmp_path: Path) -> None:
    """cache_secs 0: each AUTH runs argon2."""
    calls: list[str] = []

    def verify(hashed: str, password: str) -> bool:
        calls.append(password)
        return verify_password(hashed, password)

    auth = Authenticator(auth_for(users_file(tmp_path, alice=alice()), cache_secs=0.0),
                         clock=FakeClock(), verify=verify)  # fmt: skip
    good = Credentials(Mechanism.PLAIN, "alice", "s3cret")
    for _ in range(2):
        assert (await auth.authenticate(good, "10.0.0.1", "p")).grant is not None
    assert 2 == len(calls)
    auth.close()


def test_broken_rewrite_keeps_the_users_loaded_before(tmp_path: Path) -> None:
    """A users file rewritten with an error is refused; the previous users stay in force."""
    path = users_file(tmp_path, alice=alice())
    auth = Authenticator(auth_for(path), clock=FakeClock())
    Path(path).write_text("Users ( users: {")
    auth.refresh()
    assert ["alice"] == list(auth.users.users)
    with pytest.raises(ConfigError):
        auth.check()
    auth.close()


async def test_blocked_address_is_refused_without_checking(tmp_path: Path) -> None:
    """Past max_failures_per_ip the address gets 454 4.7.0 and no hash is computed."""
    calls: list[str] = []

    def verify(hashed: str, password: str) -> bool:
        calls.append(password)
        return False

    limits = AuthLimits(max_failures_per_ip=2, delay_secs=0.0)
    auth = Authenticator(auth_for(users_file(tmp_path, alice=alice()), limits=limits),
                         clock=FakeClock(), verify=verify)  # fmt: skip
    bad = Credentials(Mechanism.LOGIN, "alice", "x")
    replies = [(await auth.authenticate(bad, "10.0.0.1", "p")).reply for _ in range(3)]
    assert [535, 535, 454] == [r.code for r in replies if r is not None]
    assert 2 == len(calls)
    assert {("LOGIN", "failure"): 2, ("LOGIN", "blocked"): 1} == auth.stats.attempts
    assert 1 == auth.stats.blocked["ip"]
    good = Credentials(Mechanism.PLAIN, "alice", "s3cret")
    assert auth.unblock("10.0.0.1")
    calls.clear()
    assert (await auth.authenticate(good, "10.0.0.1", "p")).reply is not None  # verify says no
    assert ["s3cret"] == calls
    auth.close()


def test_grant_applies_the_user_quotas_over_the_defaults(tmp_path: Path) -> None:
    """A user's messages_per_hour overrides auth.quotas; the quota refuses with 451 4.7.1."""
    path = users_file(tmp_path, alice=alice(messages_per_hour=1, recipients_per_message=7))
    auth = Authenticator(auth_for(path), clock=FakeClock())
    grant = auth.grant("alice", auth.users.users["alice"])
    assert 7 == grant.max_recipients
    assert grant.admit_message() is None
    refusal = grant.admit_message()
    assert refusal is not None and (451, "4.7.1") == (refusal.code, refusal.enhanced)
    auth.close()
