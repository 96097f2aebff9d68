"""`empathctl` — steer a running Empath daemon over its control socket (DESIGN §5).

This module parses arguments and prints; the socket work is in
:mod:`empath.control.client` and the daemon-side commands in
:mod:`empath.control.commands`.  Every command is one :class:`CliCommand` in
:data:`COMMANDS` (group, name, arguments, what to send, how to print): adding one
(``cluster status``) is one entry.

Exit codes: 0 ok; 1 the command failed (unknown id, refused); 2 usage; 3 the
daemon cannot be reached (the message names the socket and how to set it);
4 authentication failed; 5 `config reload` applied what it could but some changes
wait for a restart.  With --json every error is one JSON object on stdout too.
Output to a closed pipe (``| head``) ends quietly with 0.
"""

from __future__ import annotations

import os
import sys
import time

from empath.cli import argv as cmdline
from empath.cli import dkimctl, ops, users
from empath.control import output
from empath.control.client import (
    ControlClient,
    SocketChoice,
    discover_socket,
)
from empath.control.wire import TOKEN_ENV_VAR
from empath.errors import ControlError
from empath.textsafe import json_text

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)

if TYPE_CHECKING:  # the CLI path imports neither typing nor argparse (start-up time)
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any, Final, NamedTuple

STATUSES: Final = ops.STATUSES
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Ctx:
    """What a command runs with: parsed options, the output mode and a lazy client."""

    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.json: bool = bool(getattr(ns, "json", False))
        self._client: ControlClient | None = None

    def client(self) -> ControlClient:
        if self._client is None:
            choice: SocketChoice = discover_socket(
                getattr(self.ns, "socket", None), getattr(self.ns, "config", None)
            )
            token = getattr(self.ns, "token", None) or os.environ.get(TOKEN_ENV_VAR) or None
            self._client = ControlClient(choice, token)
            self._client.connect()
        return self._client

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return self.client().call(cmd, args)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def fail(self, message: str, code: int = 1, kind: str = "failed") -> int:
        """Report an error (see :func:`report_error`) and return the exit code."""
        report_error(self.json, message, code, kind)
        return code

    def emit(self, data: Any, text: str) -> None:
        """Print ``data`` as JSON with --json, else ``text``."""
        if self.json:
            import json  # not on the plain-text path (start-up time)

            sys.stdout.write(json_text(json.dumps(data, indent=2, ensure_ascii=False)) + "\n")
        else:
            sys.stdout.write(text)


if TYPE_CHECKING:
    Runner = Callable[[Ctx, argparse.Namespace], int]


def report_error(as_json: bool, message: str, code: int, kind: str) -> None:
    """An error as the operator asked for output: with --json one JSON object on stdout
    (``{"ok": false, "error": {"kind", "message", "exit_code"}}``, so a script piping to
    jq reads it like any answer), else ``empathctl: message`` on stderr."""
    if as_json:
        import json

        error = {"kind": kind, "message": message, "exit_code": code}
        sys.stdout.write(json.dumps({"ok": False, "error": error}, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        print(f"empathctl: {message}", file=sys.stderr)


def _no_args(_p: Any) -> None:
    return None


if TYPE_CHECKING:

    class CliCommand(NamedTuple):
        """One `empathctl GROUP NAME` (a namedtuple, not a dataclass: start-up time)."""

        group: str
        name: str
        help: str
        run: Runner
        # an argparse parser, or the plain-line reader's Recorder (empath.cli.argv)
        configure: Callable[[Any], None] = _no_args

else:

    class CliCommand(tuple):  # namedtuple's shape without importing collections
        __slots__ = ()

        def __new__(cls, group, name, help, run, configure=_no_args):
            return tuple.__new__(cls, (group, name, help, run, configure))

        group = property(lambda self: self[0])
        name = property(lambda self: self[1])
        help = property(lambda self: self[2])
        run = property(lambda self: self[3])
        configure = property(lambda self: self[4])


# --- queue -------------------------------------------------------------------------


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--status",
        choices=STATUSES,
        help="only units with this status (delivered: delivered units of messages still "
        "queued for another domain; finished messages leave the queue)",
    )
    p.add_argument("--domain", metavar="D", help="only units for this recipient domain")
    p.add_argument("--limit", metavar="N", type=_positive_int, help="at most N lines (oldest)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ops.type_error(f"not a number: {text!r}") from None
    if value < 1:
        raise ops.type_error("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ops.type_error(f"not a number: {text!r}") from None
    if not value > 0:
        raise ops.type_error("must be more than 0")
    return value


def queue_list(ctx: Ctx, ns: argparse.Namespace) -> int:
    pairs = (("status", ns.status), ("domain", ns.domain), ("limit", ns.limit))
    args: dict[str, Any] = {k: v for k, v in pairs if v}
    if not ctx.json:
        args["format"] = "lines"  # rendered by the daemon: nothing to decode or format here
    write = sys.stdout.write
    for chunk in ctx.client().stream("queue.list", args):
        if ctx.json:
            import json

            dumps = json.dumps
            lines = (dumps(o, ensure_ascii=False) + "\n" for o in output.list_objects(chunk))
            write(json_text("".join(lines)))
        elif chunk and isinstance(chunk[0], str):
            write("".join(chunk))
        else:  # a daemon that sends rows only
            write(output.list_lines(chunk))
    return EXIT_OK


def _stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    p.add_argument(
        "--interval", metavar="S", type=_positive_float, default=2.0, help="seconds (default 2)"
    )


def queue_stats(ctx: Ctx, ns: argparse.Namespace) -> int:
    if not ns.watch:
        data = ctx.call("queue.stats")
        ctx.emit(data, output.stats_text(data))
        return EXIT_OK
    tty = sys.stdout.isatty()
    if tty:
        # The screen says "Ctrl-C to stop", so Ctrl-C must stop it even when empathctl was
        # started with SIGINT ignored (a background job of a non-interactive shell, `make`
        # under nohup): Python installs no KeyboardInterrupt handler in that case.
        import signal

        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            data = ctx.call("queue.stats")
            if ctx.json:
                import json

                sys.stdout.write(json_text(json.dumps(data, ensure_ascii=False)) + "\n")
            elif tty:
                stamp = time.strftime("%H:%M:%S")
                sys.stdout.write(
                    "\x1b[H\x1b[2J"
                    + output.stats_text(data)
                    + f"\n{stamp}  every {ns.interval:g}s, Ctrl-C to stop\n"
                )
            else:
                sys.stdout.write(output.stats_text(data) + "\n")
            sys.stdout.flush()
            time.sleep(ns.interval)
    except KeyboardInterrupt:
        if tty and not ctx.json:
            sys.stdout.write("\n")
        return EXIT_OK


def _id_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", metavar="ID", help="message id (ULID)")


def _view_args(p: argparse.ArgumentParser) -> None:
    _id_arg(p)
    p.add_argument("--body", action="store_true", help="the whole message as stored (escaped)")


def queue_view(ctx: Ctx, ns: argparse.Namespace) -> int:
    if getattr(ns, "body", False):
        return ops.print_body(ctx, ns.id)
    data = ctx.call("queue.view", {"id": ns.id})
    ctx.emit(data, output.view_text(data))
    return EXIT_OK


def _retry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", metavar="ID", nargs="?", help="message id (ULID)")
    p.add_argument("--status", choices=STATUSES, help="retry every unit with this status")
    p.add_argument("--domain", metavar="D", help="with --status: only this domain")


def queue_retry(ctx: Ctx, ns: argparse.Namespace) -> int:
    if (ns.id is None) == (ns.status is None) or (ns.domain and ns.status is None):
        return ctx.fail("queue retry takes an ID or --status S [--domain D]", EXIT_USAGE, "usage")
    args: dict[str, Any] = {"id": ns.id} if ns.id else {"status": ns.status, "domain": ns.domain}
    data = ctx.call("queue.retry", {k: v for k, v in args.items() if v})
    ctx.emit(data, _made_due(data))
    return EXIT_OK


_HELD_BY = {
    "breaker": "circuit breaker open",
    "rate_limit": "no rate-limit token yet",
    "connections": "the domain's max_connections in use",
    "max_concurrent_deliveries": "every delivery slot busy",
    "suspended": "domain suspended",
    "held": "on hold",
}


def _made_due(data: dict[str, Any]) -> str:
    """`queue retry` / `process-now`: how many units were made due, how many will really
    be attempted now, and how many stay held and by what - never "delivery now" for a
    unit an open breaker holds."""
    text = f"{data['units']} unit(s) made due"
    if "attempted_now" not in data:  # a daemon without the count
        return text + "\n"
    text += f": {data['attempted_now']} will be attempted now"
    waiting = data.get("waiting") or {}
    if waiting:
        why = ", ".join(f"{n} {_HELD_BY.get(k, k)}" for k, n in sorted(waiting.items()))
        text += f", {sum(waiting.values())} stay held ({why})"
    return text + "\n"


def _delete_args(p: argparse.ArgumentParser) -> None:
    ops._bulk_args(p)
    p.add_argument("--bounce", action="store_true", help="send the sender a DSN first")


def queue_delete(ctx: Ctx, ns: argparse.Namespace) -> int:
    selection = ops._selection(ns)
    if selection is None:
        return ops._usage("queue delete")
    if "id" not in selection:
        return ops.bulk_delete(ctx, ns, selection, bounce=ns.bounce)
    if not ns.yes and sys.stdin.isatty():
        what = "bounce and delete" if ns.bounce else "delete"
        try:
            answer = input(f"{what} message {ns.id}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            return ctx.fail("not deleted")
    data = ctx.call("queue.delete", {"id": ns.id, "bounce": ns.bounce})
    ctx.emit(data, ops.deleted_text(data))
    return EXIT_OK


def queue_process_now(ctx: Ctx, _ns: argparse.Namespace) -> int:
    data = ctx.call("queue.process-now")
    ctx.emit(data, _made_due(data))
    return EXIT_OK


# --- dns ---------------------------------------------------------------------------


def dns_list_cache(ctx: Ctx, _ns: argparse.Namespace) -> int:
    data = ctx.call("dns.list-cache")
    ctx.emit(data, "".join(line + "\n" for line in data["lines"]))
    return EXIT_OK


def dns_clear_cache(ctx: Ctx, _ns: argparse.Namespace) -> int:
    data = ctx.call("dns.clear-cache")
    ctx.emit(data, f"cleared {data['entries']} DNS cache entries\n")
    return EXIT_OK


def _domain_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN")


def dns_refresh(ctx: Ctx, ns: argparse.Namespace) -> int:
    data = ctx.call("dns.refresh", {"domain": ns.domain})
    ctx.emit(data, "".join(line + "\n" for line in data["lines"]))
    return EXIT_OK


# --- system ------------------------------------------------------------------------


def system_status(ctx: Ctx, _ns: argparse.Namespace) -> int:
    data = ctx.call("system.status")
    ctx.emit(data, output.status_text(data))
    return EXIT_OK


def cluster_status(ctx: Ctx, _ns: argparse.Namespace) -> int:
    data = ctx.call("cluster.status")
    ctx.emit(data, output.cluster_text(data))
    return EXIT_OK


def system_ping(ctx: Ctx, _ns: argparse.Namespace) -> int:
    started = time.monotonic()
    data = ctx.call("system.ping")
    ms = (time.monotonic() - started) * 1000
    ctx.emit(data, f"pong from pid {data['pid']} (Empath {data['version']}) in {ms:.1f} ms\n")
    return EXIT_OK


# --- config ------------------------------------------------------------------------


def config_reload(ctx: Ctx, _ns: argparse.Namespace) -> int:
    """Exit 0 when the daemon now runs the file as written; 5 when part of it waits for
    a restart (listeners, spool, ...): said on stderr too, so a script cannot miss it."""
    data = ctx.call("config.reload")
    changes = data["changes"]
    pending = data.get("pending_restart") or []
    text = f"reloaded {data['file']}: " + (
        f"{len(changes)} change(s) applied\n" + "".join(f"  {c}\n" for c in changes)
        if changes
        else "no change applied\n"
    )
    text += _pending_text(pending)
    ctx.emit(data, text)
    if pending:
        sys.stdout.flush()
        print(
            f"empathctl: WARNING: {len(pending)} change(s) are NOT applied until the daemon "
            "restarts (systemctl restart empath): "
            + ", ".join(line.split(":", 1)[0] for line in pending),
            file=sys.stderr,
        )
        return EXIT_FAILED  # DESIGN §5 keeps exit codes to 0-4: what waits was not applied
    return EXIT_OK


def _pending_text(pending: list[str]) -> str:
    if not pending:
        return ""
    return f"waiting for a restart: {len(pending)} change(s)\n" + "".join(
        f"  {line}\n" for line in pending
    )


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", nargs="?", help="check this file here (no daemon)")


def config_check(ctx: Ctx, ns: argparse.Namespace) -> int:
    """Without FILE: the daemon reads its file and compares it with what it runs: every
    difference is listed, those only a restart applies marked so."""
    if ns.file is None:
        data = ctx.call("config.check")
        changes = data.get("changes") or []
        text = f"{data['file']}: OK\n"
        if changes:
            restart = len(data.get("need_restart") or [])
            text += (
                f"differs from the running config in {len(changes)} setting(s)"
                + (f", {restart} of them applied only by a restart" if restart else "")
                + " (`empathctl config reload` applies the others):\n"
                + "".join(f"  {c}\n" for c in changes)
            )
        else:
            text += "the daemon runs this file as written\n"
        ctx.emit(data, text)
        return EXIT_OK
    from empath.config.load import load_config
    from empath.errors import ConfigError

    try:
        load_config(ns.file)
    except ConfigError as exc:
        return ctx.fail(str(exc))
    data = {"file": os.path.abspath(ns.file), "ok": True}
    ctx.emit(data, f"{data['file']}: OK\n")
    return EXIT_OK


COMMANDS: list[CliCommand] = [
    CliCommand("queue", "list", "one line per delivery unit, oldest first", queue_list, _list_args),
    CliCommand(
        "queue", "stats", "counts, top domains, oldest age, rates", queue_stats, _stats_args
    ),
    CliCommand("queue", "view", "one message in full", queue_view, _view_args),
    CliCommand(
        "queue", "retry", "make units due now (reopens failed ones)", queue_retry, _retry_args
    ),
    CliCommand(
        "queue", "delete", "delete a message (--bounce: DSN first)", queue_delete, _delete_args
    ),
    CliCommand("queue", "process-now", "every waiting unit due now", queue_process_now),
    CliCommand("dns", "list-cache", "one line per cached answer", dns_list_cache),
    CliCommand("dns", "clear-cache", "drop every cached answer", dns_clear_cache),
    CliCommand("dns", "refresh", "resolve a domain again now", dns_refresh, _domain_arg),
    CliCommand("system", "status", "version, uptime, listeners, queue, DNS, spool", system_status),
    CliCommand("system", "ping", "is the daemon answering?", system_ping),
    CliCommand("cluster", "status", "nodes, their queues and last heartbeats", cluster_status),
    CliCommand("config", "reload", "re-read the config (as SIGHUP)", config_reload),
    CliCommand("config", "check", "validate the config file", config_check, _check_args),
    CliCommand("dkim", "keygen", "make a DKIM key and print its DNS record (no daemon needed)",
               dkimctl.keygen, dkimctl.keygen_args),
    CliCommand("dkim", "list", "DKIM selectors: keys, windows, signatures, DNS state",
               dkimctl.list_run),
    CliCommand("dkim", "check", "are a domain's DKIM keys published? DMARC/SPF alignment",
               dkimctl.check_run, dkimctl.domain_arg),
    CliCommand("dkim", "rotate", "make the next selector's key and schedule the change",
               dkimctl.rotate_run, dkimctl.rotate_args),
    # DESIGN §13: SMTP AUTH users (the file is edited here; see empath.cli.users)
    CliCommand("user", "add", "add a user (password from tty or stdin)", users.user_add,
               users.add_args),
    CliCommand("user", "passwd", "set a user's password", users.user_passwd, users.name_args),
    CliCommand("user", "set", "change a user's senders or quotas", users.user_set,
               users.set_args),
    CliCommand("user", "delete", "remove a user", users.user_delete, users.name_args),
    CliCommand("user", "list", "users, last login, failures, blocks", users.user_list,
               users.users_file_arg),
    CliCommand("user", "unblock", "lift a block on an address or a login", users.user_unblock,
               users.unblock_args),
    *(CliCommand(*c) for c in ops.COMMANDS),
]  # fmt: skip


def _global_options(p: Any, top: bool) -> None:
    # On subcommands too (`empathctl queue list --json`); SUPPRESS keeps the top-level value.
    default = None if top else cmdline.suppress(p)
    p.add_argument("--socket", metavar="PATH", default=default, help="control socket")
    p.add_argument("--config", metavar="FILE", default=default, help="config to find the socket in")
    p.add_argument(
        "--token", metavar="T", default=default, help=f"auth token (or ${TOKEN_ENV_VAR})"
    )
    p.add_argument(
        "--json",
        action="store_true",
        default=False if top else cmdline.suppress(p),
        help="JSON output",
    )


def build_parser(commands: Sequence[CliCommand] = COMMANDS) -> argparse.ArgumentParser:
    """argparse's parser of ``commands``: help, usage errors and every line that
    :func:`empath.cli.argv.read` leaves to it (imports argparse: start-up time)."""
    return cmdline.full_parser(commands, _global_options, _groups(commands), _usage_error)


def _groups(commands: Sequence[CliCommand]) -> list[str]:
    return list(dict.fromkeys(c.group for c in commands))


_VALUE_OPTIONS = frozenset({"--socket", "--config", "--token"})


def named_command(argv: Sequence[str]) -> list[CliCommand]:
    """The one command ``argv`` names by its first two words, or every command (help,
    usage errors).  Start-up time: building the parsers of all commands costs more
    than the round trip of `queue stats` (argparse formats and translates each)."""
    if "-h" in argv or "--help" in argv:
        return COMMANDS
    words: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            words.append(arg)
            if len(words) == 2:
                break
    return [c for c in COMMANDS if [c.group, c.name] == words] or COMMANDS


_KINDS = {1: "failed", 2: "usage", 3: "unreachable", 4: "auth"}


def _error_kind(exc: ControlError) -> str:
    code = getattr(exc, "code", "")  # the daemon's error code (not_found, ...) if it sent one
    return str(code) if code else _KINDS.get(exc.exit_code, "failed")


def _usage_error(message: str) -> None:
    """With --json anywhere on the line a usage error is JSON too."""
    if _JSON_REQUESTED[0]:
        report_error(True, message, EXIT_USAGE, "usage")
        sys.exit(EXIT_USAGE)


_JSON_REQUESTED = [False]  # main() sets it from its argv (tests pass argv directly)


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    _JSON_REQUESTED[0] = "--json" in args
    commands = named_command(args)
    # A plain line is read without argparse (start-up time); anything else, help and
    # usage errors included, goes to argparse.
    ns: Any = cmdline.read(args, commands, _global_options)
    if ns is None:
        ns = build_parser(commands).parse_args(args)
    ctx = Ctx(ns)
    run: Runner = ns.run
    try:
        code = run(ctx, ns)
        sys.stdout.flush()
    except BrokenPipeError:
        # `empathctl queue list | head`: the reader is gone; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except ControlError as exc:
        report_error(ctx.json, str(exc), exc.exit_code, _error_kind(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
