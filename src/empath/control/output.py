"""How `empathctl` prints each reply: plain text for people and pipelines, or JSON.

The `queue list` line is a contract (DESIGN §5, the runbook's pipelines)::

    id: <ULID> domain: <domain>, status: <s>, attempts: <n>, age: <dur>, \
        next: <time|->, from: <sender>, rcpts: <n>            (one line)

No field may hold a space before ``domain:`` or a comma before ``status:``, and no
free text (remote replies) appears on it; ``queue view`` shows those.  The fields
that come from the network (the domain and the sender) go through
:func:`empath.textsafe.list_field`: a hostile sender such as
``"x id: 01AAA domain: victim.test,"@evil.test`` is printed with its spaces and
comma escaped (``\x20``, ``\x2c``), so ``grep -o 'id: [^ ]*'`` and ``grep -o
'domain: [^,]*'`` see only the real fields.  ``queue view`` passes every text it
shows through :func:`empath.textsafe.terminal`.
"""

from __future__ import annotations

import time

from empath.textsafe import list_field, terminal

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)

if TYPE_CHECKING:  # nor collections: `empathctl` start-up time
    from collections.abc import Iterable
    from typing import Any

LIST_FIELDS = (
    "id",
    "domain",
    "status",
    "attempts",
    "age_s",
    "next_attempt_at",
    "from",
    "rcpts",
    "last_error",
)
ERROR_CHARS = 60  # the last error on a `queue list` line is cut to this (queue view: whole)


def duration(seconds: float | None) -> str:
    """Compact age: 42s, 5m12s, 3h05m, 2d04h."""
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def timestamp(at: float | None) -> str:
    """UTC, second precision, no spaces: 2026-11-29T23:14:20Z (or '-')."""
    if not at:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def sender(address: str) -> str:
    return terminal(address) if address else "<>"


_MEMO_MAX = 1 << 16  # entries per memo before it starts over
_ts_memo: dict[int, str] = {}
_age_memo: dict[int, str] = {}


def list_lines(rows: Iterable[list[Any]]) -> str:
    """Plain `queue list` lines for a chunk of wire rows (see module doc)."""
    return "".join(list_line_items(rows))


def list_line_items(rows: Iterable[list[Any]]) -> list[str]:
    """One plain `queue list` line per wire row, each ending in a newline.

    The daemon renders them (``queue.list`` with ``format: "lines"``) so that a full
    list of a large queue costs the CLI no JSON decoding of 100,000s of rows; ages
    and timestamps are formatted once per distinct second (memos), not per row."""
    ts_memo = _ts_memo
    age_memo = _age_memo
    if len(ts_memo) > _MEMO_MAX or len(age_memo) > _MEMO_MAX:
        ts_memo.clear()
        age_memo.clear()
    out = []
    for row in rows:
        mid, domain, status, attempts, age_s, nxt, frm, rcpts = row[:8]
        error = row[8] if len(row) > 8 else ""
        age_key = int(age_s) if age_s > 0 else 0
        age = age_memo.get(age_key)
        if age is None:
            age = age_memo[age_key] = duration(age_key)
        if nxt:
            key = int(nxt)
            when = ts_memo.get(key)
            if when is None:
                when = ts_memo[key] = timestamp(key)
        else:
            when = "-"
        out.append(
            f"id: {mid} domain: {list_field(domain)}, status: {status}, attempts: {attempts}, "
            f"age: {age}, next: {when}, from: {list_field(frm) if frm else '<>'}, rcpts: {rcpts}"
            + (f", error: {short_error(error)}\n" if error else "\n")
        )
    return out


def short_error(error: str) -> str:
    """The last error as the last field of a `queue list` line: cut to
    :data:`ERROR_CHARS`, escaped as every list field is (no space, comma or ``key: ``
    shape left for the runbook's greps to find)."""
    if len(error) > ERROR_CHARS:
        error = error[: ERROR_CHARS - 3] + "..."
    return list_field(error)


def list_objects(rows: Iterable[list[Any]]) -> list[dict[str, Any]]:
    """`queue list --json`: one object per unit (printed one per line)."""
    out = []
    for r in rows:
        obj = dict(zip(LIST_FIELDS, r, strict=False))
        obj["next_attempt_at"] = timestamp(r[5]) if r[5] else None
        out.append(obj)
    return out


def _table(pairs: Iterable[tuple[str, Any]], indent: str = "  ") -> list[str]:
    items = list(pairs)
    width = max((len(k) for k, _ in items), default=0)
    return [f"{indent}{k:<{width}}  {v}" for k, v in items]


# What the `delivered` status counts: a message leaves the queue when it is finished,
# so its delivered units are only seen while it still has another unit (for another
# domain) waiting, or kept for `failed_retention_secs` with a failed one.  Throughput is
# the "Last ...: N delivered" line.
DELIVERED_NOTE = (
    "  (delivered: units already delivered of messages still queued for another domain;"
    " finished messages leave the queue - see 'Last ...' below for deliveries)"
)


def stats_text(data: dict[str, Any]) -> str:
    lines = ["Units by status:"]
    lines += _table(data["by_status"].items())
    if "delivered" in data["by_status"]:
        lines.append(DELIVERED_NOTE)
    lines.append(f"Messages: {data['messages']}   in flight: {data['in_flight']}")
    if data.get("oldest_id"):
        lines.append(f"Oldest queued: {duration(data['oldest_age_s'])} ({data['oldest_id']})")
    else:
        lines.append("Oldest queued: -")
    top = data.get("top_domains") or []
    lines.append("Top domains by queued units:" if top else "Top domains by queued units: -")
    lines += _table((terminal(d), n) for d, n in top)
    lines.append(
        f"Last {duration(data['window_s'])}: {data['delivered_in_window']} delivered "
        f"({data['delivered_per_min']}/min), {data['failed_attempts_in_window']} failed "
        f"attempts ({data['failed_per_min']}/min)"
    )
    if "suspended" in data:
        lines.append(f"Suspended domains: {suspended_text(data['suspended'])}")
    return "\n".join(lines) + "\n"


def _mib(n: int) -> str:
    """Bytes as MiB with one decimal (a small spool's figures are not all 0)."""
    return f"{n / 2**20:.1f}"


def suspended_text(items: list[dict[str, Any]]) -> str:
    """``a.test until 2026-...Z (reason), b.test until resumed`` or ``none``."""
    out = []
    for s in items:
        until = "until resumed" if s.get("until") is None else f"until {timestamp(s['until'])}"
        reason = f" ({terminal(s['reason'])})" if s.get("reason") else ""
        out.append(f"{terminal(s['domain'])} {until}{reason}")
    return ", ".join(out) or "none"


def status_text(data: dict[str, Any]) -> str:
    dns = data["dns_cache"]
    spool = data["spool"]
    cfg = data["config"]
    if cfg["last_reload_at"] is None:
        reload = "never"
    elif cfg["last_reload_ok"]:
        reload = f"{timestamp(cfg['last_reload_at'])} ok"
    else:
        reload = f"{timestamp(cfg['last_reload_at'])} FAILED: {terminal(cfg['last_reload_error'])}"
    queue = ", ".join(f"{k} {v}" for k, v in data["queue"].items())
    lines = [
        f"Empath {data['version']} (pid {data['pid']}, up {duration(data['uptime_s'])}, "
        f"{'compiled' if data['compiled'] else 'pure Python'}) on {data['hostname']}",
        "Listeners:",
        *(f"  {x['name']}  active sessions: {x['active_sessions']}" for x in data["listeners"]),
        f"Queue: {queue} ({data['messages']} messages)",
        f"Deliveries in flight: {data['in_flight']}",
        *_heartbeat_line(data.get("scheduler")),
        _dns_line(dns),
        f"Open circuit breakers: {', '.join(data['open_breakers']) or 'none'}",
        *(
            [f"Suspended domains: {suspended_text(data['suspended'])}"]
            if "suspended" in data
            else []
        ),
        f"Spool: {spool['path']} ({spool['type']}), {_mib(spool['free_bytes'])} MiB free, "
        f"{_mib(spool['size_bytes'])} MiB used, "
        f"{_mib(spool.get('reclaimable_bytes', 0))} MiB reclaimable"
        + (" (FULL: space reserve in use, new mail refused)" * bool(spool.get("reserve_released"))),
        f"Config: {cfg['file'] or '-'}, last reload: {reload}",
    ]
    pending = cfg.get("restart_pending") or []
    if pending:
        lines.append(f"  RESTART PENDING: {len(pending)} change(s) apply only after a restart:")
        lines += [f"    {terminal(line)}" for line in pending]
    modules = data.get("modules") or []
    lines.append(f"Modules: {len(modules) or 'none'}")
    for m in modules:
        where = f" at {terminal(m['address'])}" if m.get("address") else ""
        error = f" ({terminal(m['last_error'])})" if m.get("last_error") else ""
        lines.append(
            f"  {terminal(m['name'])}  {m['type']}{where}  {m['health']}{error}  "
            f"hooks: {', '.join(m['hooks'])}  on_error: {m['on_error']}"
        )
    cluster = data.get("cluster")
    if cluster is not None:
        mode = "FALLBACK to local limits (Redis unreachable)" if cluster["fallback"] else "Redis up"
        lines.append(
            f"Cluster: node {cluster['node_id']}, {cluster['node_count']} live node(s), {mode}"
        )
        lines += [f"  {line}" for line in _node_lines(cluster)]
    return "\n".join(lines) + "\n"


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _dns_line(dns: dict[str, Any]) -> str:
    """The DNS cache line: the hit rate over the recent window (what DnsCacheHitRateLow
    judges), labelled, with the since-start figure beside it."""
    lifetime = (
        f"since start {_percent(dns['hit_rate'])} ({dns['hits']} hits, {dns['misses']} misses)"
    )
    if "window_s" not in dns:  # an older daemon
        return f"DNS cache: {dns['entries']} entries, hit rate {lifetime}"
    return (
        f"DNS cache: {dns['entries']} entries, hit rate {_percent(dns['window_hit_rate'])} "
        f"over the last {duration(dns['window_s'])} ({dns['window_hits']} hits, "
        f"{dns['window_misses']} misses); {lifetime}"
    )


def _heartbeat_line(scheduler: dict[str, Any] | None) -> list[str]:
    if scheduler is None:  # an older daemon
        return []
    age = scheduler["heartbeat_age_s"]
    verdict = "ok" if scheduler["heartbeat_ok"] else "STALE: the delivery runner is stuck"
    return [f"Scheduler heartbeat: {age:.1f}s ago ({verdict})"]


def cluster_text(data: dict[str, Any]) -> str:
    """``empathctl cluster status``: a header, then one line per node."""
    if not data["enabled"]:
        return "cluster mode is off (no `cluster` section in the config): a single node\n"
    mode = "FALLBACK to local limits" if data["fallback"] else "shared state"
    lines = [
        f"Cluster via {data['redis_url']}: this node {data['node_id']}, "
        f"Redis {'up' if data['redis_up'] else 'DOWN'}, {mode}, "
        f"{data['node_count']} live node(s)"
    ]
    return "\n".join(lines + _node_lines(data)) + "\n"


def _node_lines(data: dict[str, Any]) -> list[str]:
    """One line per node of a cluster status (and why the list is missing)."""
    lines = []
    if data.get("error"):
        lines.append(f"cannot read the node list: {data['error']}")
    for n in data["nodes"]:
        queue = ", ".join(f"{k} {v}" for k, v in n["queue"].items())
        lines.append(
            f"node: {n['node_id']}, {'alive' if n['alive'] else 'DEAD'}, "
            f"heartbeat: {n['heartbeat_age_s']:.1f}s ago, pid: {n['pid']}, host: {n['host']}, "
            f"in_flight: {n['in_flight']}, fallback: {'yes' if n['fallback'] else 'no'}, "
            f"queue: {queue or '-'}"
        )
    return lines


def _reply(code: int | None, text: str) -> str:
    """A reply as '550 5.1.1 text', without repeating a code the text starts with
    (escaped for the terminal: the text is the remote server's)."""
    if code is None or text.startswith(str(code)):
        return terminal(text)
    return terminal(f"{code} {text}".rstrip())


def view_text(data: dict[str, Any]) -> str:
    """``queue view``: every text that came from the network (addresses, HELO, header
    lines, body preview, remote replies) escaped for the terminal."""
    rcpts = ", ".join(terminal(r) for r in data["recipients"])
    lines = [
        f"Message {data['id']}",
        f"  from: {sender(data['sender'])}",
        f"  to: {rcpts}",
        f"  received: {timestamp(data['received_at'])} (age {duration(data['age_s'])})"
        f" from {terminal(data['peer'] or '-')} helo {terminal(data['helo'] or '-')}",
        f"  size: {data['size']} bytes{'  (a DSN)' if data['is_dsn'] else ''}",
    ]
    if data.get("auth_user"):
        lines.insert(4, f"  authenticated as: {terminal(data['auth_user'])}")
    for u in data["units"]:
        lines.append(
            f"Unit {terminal(u['domain'])}: {u['status']}, attempts {u['attempts']}, "
            f"next {timestamp(u['next_attempt_at'])}"
        )
        for r in u["recipients"]:
            reply = _reply(r["code"], r["text"])
            lines.append(
                f"  rcpt {terminal(r['address'])}: {r['status']}{' ' + reply if reply else ''}"
            )
        for reason in u.get("waiting_for") or []:
            lines.append(f"  waiting: {terminal(reason['text'])}")
        for a in u["history"]:
            reply = _reply(a["code"], a["text"]) or "-"
            lines.append(f"  attempt {timestamp(a['at'])} mx {terminal(a['mx'] or '-')}: {reply}")
    lines.append("Headers:")
    lines += [f"  {terminal(h)}" for h in data.get("headers", "").split("\r\n") if h]
    lines.append("Body preview:")
    lines += [f"  {terminal(b)}" for b in data.get("body_preview", "").split("\r\n")]
    if data.get("body_truncated"):
        lines.append("  [...]")
    return "\n".join(lines) + "\n"
