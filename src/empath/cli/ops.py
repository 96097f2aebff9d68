"""`empathctl` incident controls (issue 15): breakers, hold/release, suspend/resume,
bulk delete/bounce, `queue summary`, `message log`, `spool status|compact`.

Each command is a ``(group, name, help, run, configure)`` tuple in :data:`COMMANDS`,
which :mod:`empath.cli.empathctl` turns into its own command records; ``run`` gets
the same ``Ctx`` as every command (``ctx.call``, ``ctx.emit``, ``ctx.json``).  Plain
output is one line per item with ``key: value`` fields whose network-borne text is
escaped (:mod:`empath.textsafe`), so it survives grep and the terminal alike.

Bulk delete and bounce by filter first ask the daemon how many units match
(``dry_run``), then - on a terminal - ask for confirmation; ``--yes`` skips the
question; a filter without a terminal and without ``--yes`` is refused (exit 1),
so a script never deletes by accident.  Imports stay light (CLI start-up time).
"""

from __future__ import annotations

import sys

from empath.control import output
from empath.textsafe import list_field, terminal

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)

if TYPE_CHECKING:
    import argparse
    from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def type_error(message: str) -> Exception:
    """argparse's ArgumentTypeError (its message is shown as is); argparse is imported
    only now: a plain command line is read without it (empath.cli.argv)."""
    import argparse

    return argparse.ArgumentTypeError(message)


def duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d``, ``1h30m`` -> seconds (argparse type)."""
    total = 0.0
    num = ""
    for ch in text.strip().lower():
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in _UNITS and num:
            total += float(num) * _UNITS[ch]
            num = ""
        else:
            raise type_error(f"not a duration: {text!r} (e.g. 90s, 30m, 2h, 1d)")
    if num:
        total += float(num)
    if total <= 0:
        raise type_error(f"not a duration: {text!r} (must be more than 0)")
    return total


# --- filters -------------------------------------------------------------------------

STATUSES = ("pending", "in_progress", "retry", "held", "failed", "expired", "delivered")


def _filter_args(p: argparse.ArgumentParser, id_help: str = "message id (ULID)") -> None:
    p.add_argument("id", metavar="ID", nargs="?", help=id_help)
    p.add_argument("--domain", metavar="D", help="units for this recipient domain")
    p.add_argument("--sender", metavar="S", help="messages from S (@domain for a domain, <>)")
    p.add_argument("--status", choices=STATUSES, help="units with this status")
    p.add_argument(
        "--older-than", metavar="AGE", type=duration, help="messages older than AGE (2h, 3d)"
    )


def _release_args(p: argparse.ArgumentParser) -> None:
    _filter_args(p)
    p.add_argument(
        "--restart-expiry",
        action="store_true",
        help="give the units a new message_expiration_secs from now (postsuper -r); "
        "without it the first attempt is made, then expiry counts from acceptance",
    )


def _bulk_args(p: argparse.ArgumentParser) -> None:
    _filter_args(p)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def _selection(ns: argparse.Namespace) -> dict[str, Any] | None:
    """The request's id or filter; None when neither or both were given."""
    flt = {
        "domain": ns.domain,
        "sender": ns.sender,
        "status": ns.status,
        "older_than_s": ns.older_than,
    }
    flt = {k: v for k, v in flt.items() if v is not None}
    if (ns.id is None) == (not flt):
        return None
    return {"id": ns.id} if ns.id else flt


def _usage(what: str) -> int:
    print(
        f"empathctl: {what} takes an ID or a filter "
        "(--domain, --sender, --status, --older-than), not both",
        file=sys.stderr,
    )
    return EXIT_USAGE


def _bulk_text(data: dict[str, Any], verb: str) -> str:
    text = f"{data['units']} unit(s) of {data['messages']} message(s) {verb} ({data['filter']})"
    if data.get("dsns"):
        text += f", {data['dsns']} DSN(s) queued to the senders"
    return text + "\n"


def _hold_or_release(name: str, verb: str) -> Any:
    """`queue hold` / `queue release`: by ID or filter, no confirmation (both undo)."""

    def run(ctx: Any, ns: argparse.Namespace) -> int:
        args = _selection(ns)
        if args is None:
            return _usage(f"queue {name}")
        if getattr(ns, "restart_expiry", False):
            args["restart_expiry"] = True
        data = ctx.call(f"queue.{name}", args)
        ctx.emit(data, _bulk_text(data, verb))
        return EXIT_OK

    return run


queue_hold = _hold_or_release("hold", "held")
queue_release = _hold_or_release("release", "released, due now")


def bulk_delete(ctx: Any, ns: argparse.Namespace, args: dict[str, Any], bounce: bool) -> int:
    """Delete (or bounce) by filter: count, confirm on a terminal, act."""
    cmd = "queue.bounce" if bounce else "queue.delete"
    verb = "bounce (a DSN to each sender) and delete" if bounce else "delete"
    if not ns.yes:
        if not sys.stdin.isatty():
            print(
                f"empathctl: refusing to {verb} by filter without a terminal to confirm on; "
                "add --yes",
                file=sys.stderr,
            )
            return EXIT_FAILED
        count = ctx.call(cmd, {**args, "bounce": bounce, "dry_run": True})
        if count["units"] == 0:
            print(f"no unit matches ({count['filter']})")
            return EXIT_OK
        try:
            answer = input(
                f"{verb} {count['units']} unit(s) of {count['messages']} message(s) "
                f"({count['filter']})? [y/N] "
            )
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("empathctl: nothing deleted", file=sys.stderr)
            return EXIT_FAILED
    data = ctx.call(cmd, {**args, "bounce": bounce})
    ctx.emit(data, _bulk_text(data, "bounced and deleted" if bounce else "deleted"))
    return EXIT_OK


def deleted_text(data: dict[str, Any]) -> str:
    """What `queue delete|bounce ID` did, in words (an attempt in flight is waited for)."""
    msg_id = data["id"]
    if data.get("already_delivered"):
        return f"not deleted: {msg_id} was delivered by the attempt in flight\n"
    if data.get("pending"):
        return f"delete pending: {msg_id} is being delivered; deleted when the attempt ends\n"
    text = f"deleted {msg_id}"
    if data.get("delivered"):
        text += f" ({len(data['delivered'])} recipient(s) delivered by the attempt in flight first)"
    if data.get("dsn_id"):
        text += f" (DSN {data['dsn_id']} queued to {output.sender(data['dsn_to'])})"
    return text + "\n"


def queue_bounce(ctx: Any, ns: argparse.Namespace) -> int:
    args = _selection(ns)
    if args is None:
        return _usage("queue bounce")
    if "id" in args:
        data = ctx.call("queue.delete", {"id": args["id"], "bounce": True})
        ctx.emit(data, deleted_text(data))
        return EXIT_OK
    return bulk_delete(ctx, ns, args, bounce=True)


# --- suspend / resume ------------------------------------------------------------------


def _suspend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--for", dest="for_s", metavar="AGE", type=duration, help="e.g. 2h")
    p.add_argument("--reason", metavar="TEXT", default="", help="shown in stats and status")


def queue_suspend(ctx: Any, ns: argparse.Namespace) -> int:
    args: dict[str, Any] = {"domain": ns.domain, "reason": ns.reason}
    if ns.for_s is not None:
        args["for_s"] = ns.for_s
    data = ctx.call("queue.suspend", args)
    until = "until resumed" if data["until"] is None else f"until {output.timestamp(data['until'])}"
    where = " on every cluster node" if data.get("cluster") else ""
    ctx.emit(data, f"suspended {terminal(data['domain'])} {until}{where}\n")
    return EXIT_OK


def _domain_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN")


def queue_resume(ctx: Any, ns: argparse.Namespace) -> int:
    data = ctx.call("queue.resume", {"domain": ns.domain})
    if data["was_suspended"]:
        text = f"resumed {terminal(data['domain'])}: its units are due again\n"
    else:
        text = f"{terminal(data['domain'])} was not suspended\n"
    ctx.emit(data, text)
    return EXIT_OK


# --- breakers --------------------------------------------------------------------------


def breaker_lines(data: dict[str, Any]) -> str:
    lines = []
    memo: dict[int, str] = {}

    def stamp(at: float | None) -> str:  # thousands of breakers share a few seconds
        if not at:
            return "-"
        key = int(at)
        text = memo.get(key)
        if text is None:
            text = memo[key] = output.timestamp(key)
        return text

    for b in data["breakers"]:
        lines.append(
            f"domain: {list_field(b['domain'])}, state: {b['state']}, "
            f"since: {stamp(b['since'])}, reopens: {stamp(b['reopens_at'])}, "
            f"failures: {b['failures']}, trips: {b['trips_total']}"
            + (f", error: {output.short_error(b['last_error'])}" if b["last_error"] else "")
        )
    if not lines:
        lines.append("no circuit breaker is open, half-open or counting failures")
    more = data.get("count", len(data["breakers"])) - len(data["breakers"])
    if more > 0:
        lines.append(f"... and {more} more (--all, --limit N or --domain D)")
    return "\n".join(lines) + "\n"


BREAKER_LIMIT = 50  # rows shown by default (half-open and open first)


def _breaker_list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit",
        metavar="N",
        type=int,
        default=BREAKER_LIMIT,
        help=f"at most N breakers, half-open and open first (default {BREAKER_LIMIT})",
    )
    p.add_argument("--all", action="store_true", help="every breaker")
    p.add_argument("--domain", metavar="D", help="this domain's breaker only")


def breaker_list(ctx: Any, ns: argparse.Namespace) -> int:
    args: dict[str, Any] = {} if ns.all or not ns.limit else {"limit": ns.limit}
    if ns.domain:
        args["domain"] = ns.domain
    data = ctx.call("breaker.list", args)
    ctx.emit(data, breaker_lines(data))
    return EXIT_OK


def breaker_reset(ctx: Any, ns: argparse.Namespace) -> int:
    data = ctx.call("breaker.reset", {"domain": ns.domain})
    ctx.emit(data, f"circuit breaker of {terminal(data['domain'])} closed (was {data['was']})\n")
    return EXIT_OK


def breaker_probe(ctx: Any, ns: argparse.Namespace) -> int:
    data = ctx.call("breaker.probe", {"domain": ns.domain})
    if data["probing"]:
        text = f"circuit breaker of {terminal(data['domain'])} half-open: one attempt goes now\n"
    else:
        text = f"circuit breaker of {terminal(data['domain'])} is {data['was']}: nothing to probe\n"
    ctx.emit(data, text)
    return EXIT_OK


# --- views -----------------------------------------------------------------------------


SUMMARY_LIMIT = 50  # domains shown by default (the totals always count every domain)


def _summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit",
        metavar="N",
        type=int,
        default=SUMMARY_LIMIT,
        help=f"the N domains with most units (default {SUMMARY_LIMIT})",
    )
    p.add_argument("--all", action="store_true", help="every domain")


def summary_text(data: dict[str, Any]) -> str:
    labels = data["age_buckets"]
    head = f"{'domain':<32} {'total':>6} {'pend':>5} {'retry':>5} {'fly':>4} {'held':>5} "
    head += " ".join(f"{b:>5}" for b in labels)
    lines = [f"{data['units']} queued unit(s) over {data['domain_count']} domain(s)", head]
    total = data.get("total")
    if total is not None:  # qshape's TOTAL line: every domain, shown or not
        st = total["by_status"]
        ages = " ".join(f"{n:>5}" for n in total["ages"])
        lines.append(
            f"{'TOTAL':<32} {data['units']:>6} {st['pending']:>5} {st['retry']:>5} "
            f"{st['in_progress']:>4} {st['held']:>5} {ages}"
        )
    for r in data["domains"]:
        st = r["by_status"]
        ages = " ".join(f"{n:>5}" for n in r["ages"])
        lines.append(
            f"{terminal(r['domain']):<32} {r['total']:>6} {st['pending']:>5} {st['retry']:>5} "
            f"{st['in_progress']:>4} {st['held']:>5} {ages}"
        )
        rate = "unlimited"
        if r["rate_per_s"] is not None:
            rate = f"{r['rate_per_s']:g}/s burst {r['burst']}"
        flags = [
            f"rate {rate}",
            f"connections {r['connections']}/{r['max_connections']}",
            f"delivered {r['delivered_last_min']}/min",
            f"breaker {r['breaker']}",
        ]
        if r["throttled"]:
            flags.append("THROTTLED")
        if r["suspended"]:
            flags.append("SUSPENDED")
        lines.append("    " + ", ".join(flags))
        lines += [f"    waiting: {terminal(w)}" for w in r["waiting_for"]]
    more = data["domain_count"] - len(data["domains"])
    if more > 0:
        lines.append(f"... and {more} more domain(s) with fewer units (--all or --limit N)")
    return "\n".join(lines) + "\n"


def queue_summary(ctx: Any, ns: argparse.Namespace) -> int:
    data = ctx.call("queue.summary", {} if ns.all or not ns.limit else {"limit": ns.limit})
    ctx.emit(data, summary_text(data))
    return EXIT_OK


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", metavar="ID", help="message id (ULID)")


def message_log(ctx: Any, ns: argparse.Namespace) -> int:
    data = ctx.call("message.log", {"id": ns.id})
    lines = [f"Message {data['id']}: {terminal(data['status'])}"]
    lines += [f"  {output.timestamp(e.get('at'))}  {terminal(e['text'])}" for e in data["events"]]
    ctx.emit(data, "\n".join(lines) + "\n")
    return EXIT_OK


def print_body(ctx: Any, msg_id: str) -> int:
    """`queue view ID --body`: the whole stored message, escaped for the terminal (line
    ends kept), streamed as it comes."""
    write = sys.stdout.write
    carry = ""
    for chunk in ctx.client().stream("queue.body", {"id": msg_id}):
        text = carry + "".join(chunk)
        lines = text.split("\r\n")
        carry = lines.pop()
        write("".join(terminal(line) + "\n" for line in lines))
    if carry:
        write(terminal(carry) + "\n")
    return EXIT_OK


# --- spool -----------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def spool_status(ctx: Any, _ns: argparse.Namespace) -> int:
    data = ctx.call("spool.status")
    last = data["last_compaction_at"]
    lines = [
        f"Spool {data['path']} ({data['type']}): {data['messages']} message(s)",
        f"  segments: {len(data['segments'])}, log {_mib(data['log_bytes'])}, "
        f"live {_mib(data['live_bytes'])}, reclaimable {_mib(data['reclaimable_bytes'])}",
        f"  size on disk: {_mib(data['size_bytes'])}, free: {_mib(data['free_bytes'])} "
        f"of {_mib(data['total_bytes'])}",
        f"  pre-formatted for new records: {_mib(data.get('preformatted_bytes'))}",
        f"  space reserve: {_mib(data.get('reserve_bytes'))}"
        + (
            " IN USE: new mail is refused (452) until space is back"
            * bool(data.get("reserve_in_use"))
        ),
        "  last compaction: "
        + (
            "never (since start)"
            if last is None
            else f"{output.timestamp(last)}, freed {_mib(data['last_compaction_freed'])}"
        ),
        f"  history: {data['history']['files']} file(s), {_mib(data['history']['bytes'])}",
    ]
    lines += [
        f"  segment: {s['name']}, bytes: {s['bytes']}, live_bytes: {s['live_bytes']}, "
        f"live_messages: {s['live_messages']}"
        for s in data["segments"]
    ]
    ctx.emit(data, "\n".join(lines) + "\n")
    return EXIT_OK


def spool_compact(ctx: Any, _ns: argparse.Namespace) -> int:
    data = ctx.call("spool.compact")
    ctx.emit(
        data,
        f"compacted: freed {_mib(data['freed_bytes'])}, spool {_mib(data['size_before'])} -> "
        f"{_mib(data['size_after'])}, {_mib(data['free_bytes'])} free\n",
    )
    return EXIT_OK


def _none(_p: argparse.ArgumentParser) -> None:
    return None


COMMANDS: list[tuple[str, str, str, Any, Any]] = [
    ("queue", "hold", "hold units (by ID or filter): never attempted", queue_hold, _filter_args),
    ("queue", "release", "release held units (by ID or filter)", queue_release, _release_args),
    ("queue", "bounce", "DSN to each sender, then delete (ID/filter)", queue_bounce, _bulk_args),
    ("queue", "suspend", "no attempts to DOMAIN until resumed", queue_suspend, _suspend_args),
    ("queue", "resume", "end a domain's suspension", queue_resume, _domain_arg),
    ("queue", "summary", "per domain: units by status, age, limits", queue_summary, _summary_args),
    (
        "breaker",
        "list",
        "circuit breakers that are not plainly closed",
        breaker_list,
        _breaker_list_args,
    ),
    ("breaker", "reset", "close a domain's breaker now", breaker_reset, _domain_arg),
    ("breaker", "probe", "let one attempt through now", breaker_probe, _domain_arg),
    ("message", "log", "a message's whole story (kept after it leaves)", message_log, _log_args),
    ("spool", "status", "segments, live vs reclaimable bytes, free space", spool_status, _none),
    ("spool", "compact", "reclaim dead space now", spool_compact, _none),
]
