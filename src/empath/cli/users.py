"""`empathctl user add|passwd|set|delete|list|unblock`: the SMTP AUTH users (DESIGN §13).

``add``, ``passwd``, ``set`` and ``delete`` edit the users file directly (no daemon needed):
under an exclusive lock (``<file>.lock``), read it, change one entry, write it back
atomically with mode 0600 (``empath.submission.users.write_users``).  The daemon
notices the new file at the next AUTH.  ``list`` reads the file and, when the daemon
answers, adds what only it knows (last login, failures in the window, slowed down,
blocked addresses); ``unblock`` asks the daemon.

The users file is ``--users-file``, else the ``auth.users_file`` of the config's
submission listeners (``--config`` / the usual discovery; several different files
need ``--users-file``).  The password is read from the terminal without echo (twice)
or, when stdin is not a terminal, as one line from stdin (``printf '%s\\n' "$PW" |
empathctl user add ...``); it never appears on a command line.
"""

from __future__ import annotations

import os
import sys
import time

from empath.textsafe import terminal

TYPE_CHECKING = False  # typing's, without importing typing (empathctl start-up time)

if TYPE_CHECKING:
    import argparse
    from typing import Any

    from empath.cli.empathctl import Ctx
    from empath.submission.users import UserEntry, UsersFile

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UserCommandError(Exception):
    """A refusal to print as ``empathctl: <message>`` (exit 1)."""


def users_file_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users-file", metavar="FILE", help="default: auth.users_file of the config")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--senders",
        metavar="PATTERN[,PATTERN...]",
        required=True,
        help="addresses the user may send as (alice@example.org, *@example.org)",
    )
    p.add_argument("--null-sender", action="store_true", help="may send with MAIL FROM:<>")
    p.add_argument("--messages-per-hour", metavar="N", type=int, help="quota (0 unlimited)")
    p.add_argument("--recipients-per-message", metavar="N", type=int, help="quota (0 unlimited)")
    users_file_arg(p)


def set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("--senders", metavar="PATTERN[,PATTERN...]", help="replace the patterns")
    p.add_argument("--null-sender", dest="null_sender", action="store_true", default=None,
                   help="may send with MAIL FROM:<>")  # fmt: skip
    p.add_argument("--no-null-sender", dest="null_sender", action="store_false")
    p.add_argument("--messages-per-hour", metavar="N", type=int, help="quota (0 unlimited)")
    p.add_argument("--recipients-per-message", metavar="N", type=int, help="quota (0 unlimited)")
    users_file_arg(p)


def name_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    users_file_arg(p)


def unblock_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("key", metavar="NAME|IP", help="a login name or a client address")


def _users_file(ns: argparse.Namespace) -> str:
    if getattr(ns, "users_file", None):
        return str(ns.users_file)
    from empath.config.load import discover_config_path, load_config

    config = load_config(discover_config_path(getattr(ns, "config", None)))
    files = sorted(
        {lc.auth.users_file for lc in config.smtp_controller.listeners if lc.auth is not None}
    )
    if not files:
        raise UserCommandError(
            f"{config.source_path}: no listener has auth.users_file; give --users-file"
        )
    if len(files) > 1:
        raise UserCommandError(f"several users files ({', '.join(files)}); give --users-file")
    return files[0]


def _update(path: str, change: Any) -> None:
    """Read, change and write the file under an exclusive lock (``<file>.lock``), so two
    empathctl runs never lose each other's change.  ``change`` maps the users read
    (missing file: none) to the new ones, or raises UserCommandError."""
    import fcntl

    from empath.submission.users import UsersFile, write_users

    fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        users: dict[str, UserEntry] = dict(_load(path, missing_ok=True).users)
        write_users(path, UsersFile(change(users)))
    finally:
        os.close(fd)


def _load(path: str, *, missing_ok: bool) -> UsersFile:
    from empath.submission.users import UsersFile, load_users

    if missing_ok and not os.path.exists(path):
        return UsersFile()
    return load_users(path)


def _password(name: str) -> str:
    import getpass

    if sys.stdin.isatty():
        first = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("Again: ") != first:
            raise UserCommandError("the passwords differ; nothing changed")
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    if not first:
        raise UserCommandError("empty password; nothing changed")
    return first


def _run(fn: Any, ctx: Ctx, ns: argparse.Namespace) -> int:
    from empath.errors import ConfigError

    try:
        code: int = fn(ctx, ns)
    except (UserCommandError, ConfigError, OSError) as exc:
        print(f"empathctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return code


def user_add(ctx: Ctx, ns: argparse.Namespace) -> int:
    return _run(_add, ctx, ns)


def _senders(text: str) -> tuple[str, ...]:
    senders = tuple(p.strip() for p in text.split(",") if p.strip())
    for pattern in senders:
        local, at, domain = pattern.rpartition("@")
        if not at or not local or not domain or "*" in domain or ("*" in local and local != "*"):
            raise UserCommandError(f"bad sender pattern {pattern!r} (alice@example.org, *@domain)")
    return senders


def _check_quotas(ns: argparse.Namespace) -> None:
    for opt in ("messages_per_hour", "recipients_per_message"):
        if getattr(ns, opt) is not None and getattr(ns, opt) < 0:
            raise UserCommandError(f"--{opt.replace('_', '-')} must be 0 or more")


def _add(ctx: Ctx, ns: argparse.Namespace) -> int:
    from empath.submission.users import UserEntry, hash_password

    senders = _senders(ns.senders)
    _check_quotas(ns)
    path = _users_file(ns)
    users = _load(path, missing_ok=True)
    if ns.name in users.users:
        raise UserCommandError(f"user {ns.name} exists in {path} (use `user passwd`)")
    entry = UserEntry(
        password=hash_password(_password(ns.name)),
        senders=senders,
        null_sender=ns.null_sender,
        messages_per_hour=ns.messages_per_hour,
        recipients_per_message=ns.recipients_per_message,
    )

    def change(users: dict[str, UserEntry]) -> dict[str, UserEntry]:
        if ns.name in users:
            raise UserCommandError(f"user {ns.name} exists in {path} (use `user passwd`)")
        return {**users, ns.name: entry}

    _update(path, change)
    ctx.emit({"user": ns.name, "users_file": path, "added": True}, f"added {ns.name} to {path}\n")
    return EXIT_OK


def user_passwd(ctx: Ctx, ns: argparse.Namespace) -> int:
    return _run(_passwd, ctx, ns)


def _passwd(ctx: Ctx, ns: argparse.Namespace) -> int:
    from dataclasses import replace

    from empath.submission.users import hash_password

    path = _users_file(ns)
    if ns.name not in _load(path, missing_ok=False).users:
        raise UserCommandError(f"no user {ns.name} in {path}")
    hashed = hash_password(_password(ns.name))

    def change(users: dict[str, UserEntry]) -> dict[str, UserEntry]:
        entry = users.get(ns.name)
        if entry is None:
            raise UserCommandError(f"no user {ns.name} in {path}")
        return {**users, ns.name: replace(entry, password=hashed)}

    _update(path, change)
    ctx.emit({"user": ns.name, "users_file": path, "changed": True},
             f"changed the password of {ns.name}\n")  # fmt: skip
    return EXIT_OK


def user_set(ctx: Ctx, ns: argparse.Namespace) -> int:
    return _run(_set, ctx, ns)


def _set(ctx: Ctx, ns: argparse.Namespace) -> int:
    """Change a user's senders, null-sender right or quotas (the password stays)."""
    from dataclasses import replace

    changes: dict[str, object] = {}
    if ns.senders is not None:
        changes["senders"] = _senders(ns.senders)
    if ns.null_sender is not None:
        changes["null_sender"] = ns.null_sender
    _check_quotas(ns)
    for opt in ("messages_per_hour", "recipients_per_message"):
        if getattr(ns, opt) is not None:
            changes[opt] = getattr(ns, opt)
    if not changes:
        raise UserCommandError("nothing to change (--senders, --null-sender, quotas)")
    path = _users_file(ns)

    def change(users: dict[str, UserEntry]) -> dict[str, UserEntry]:
        entry = users.get(ns.name)
        if entry is None:
            raise UserCommandError(f"no user {ns.name} in {path}")
        return {**users, ns.name: replace(entry, **changes)}  # type: ignore[arg-type]

    _update(path, change)
    ctx.emit({"user": ns.name, "users_file": path, "changed": sorted(changes)},
             f"changed {', '.join(sorted(changes))} of {ns.name}\n")  # fmt: skip
    return EXIT_OK


def user_delete(ctx: Ctx, ns: argparse.Namespace) -> int:
    return _run(_delete, ctx, ns)


def _delete(ctx: Ctx, ns: argparse.Namespace) -> int:
    path = _users_file(ns)
    _load(path, missing_ok=False)  # a missing or broken file is an error here

    def change(users: dict[str, UserEntry]) -> dict[str, UserEntry]:
        if ns.name not in users:
            raise UserCommandError(f"no user {ns.name} in {path}")
        return {k: v for k, v in users.items() if k != ns.name}

    _update(path, change)
    ctx.emit({"user": ns.name, "users_file": path, "deleted": True},
             f"deleted {ns.name} from {path}\n")  # fmt: skip
    return EXIT_OK


def user_list(ctx: Ctx, ns: argparse.Namespace) -> int:
    return _run(_list, ctx, ns)


def _list(ctx: Ctx, ns: argparse.Namespace) -> int:
    from empath.errors import ControlError

    path = _users_file(ns)
    users = _load(path, missing_ok=False)
    live: dict[str, dict[str, Any]] = {}
    blocked_ips: dict[str, float] = {}
    daemon = True
    try:
        data = ctx.call("user.status")
        live = {str(u["user"]): u for u in data["users"]}
        blocked_ips = data["blocked_ips"]
    except ControlError:
        daemon = False  # the file alone still lists the users
    rows = []
    for name in sorted(users.users):
        entry = users.users[name]
        st = live.get(name, {})
        rows.append(
            {
                "user": name,
                "senders": list(entry.senders),
                "null_sender": entry.null_sender,
                "messages_per_hour": entry.messages_per_hour,
                "recipients_per_message": entry.recipients_per_message,
                "last_login": st.get("last_login"),
                "failures": st.get("failures") if daemon else None,
                "blocked": st.get("blocked") if daemon else None,
            }
        )
    out = {"users_file": path, "daemon": daemon, "users": rows, "blocked_ips": blocked_ips}
    ctx.emit(out, _list_text(out))
    return EXIT_OK


def _list_text(data: dict[str, Any]) -> str:
    lines = []
    for r in data["users"]:
        last = (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["last_login"]))
            if r["last_login"]
            else "never"
            if data["daemon"]
            else "-"
        )
        failures = "-" if r["failures"] is None else str(r["failures"])
        blocked = "-" if r["blocked"] is None else ("slowed" if r["blocked"] else "no")
        senders = ",".join(r["senders"])
        lines.append(
            f"user: {terminal(r['user'])}, senders: {terminal(senders)}, last_login: {last}, "
            f"failures: {failures}, blocked: {blocked}\n"
        )
    for ip, left in sorted(data["blocked_ips"].items()):
        lines.append(f"blocked address: {ip} ({left:.0f} s left)\n")
    if not data["daemon"]:
        lines.append("(daemon not reachable: last login, failures and blocks unknown)\n")
    return "".join(lines)


def user_unblock(ctx: Ctx, ns: argparse.Namespace) -> int:
    data = ctx.call("user.unblock", {"key": ns.key})
    ctx.emit(data, f"unblocked {terminal(ns.key)}\n")
    return EXIT_OK
