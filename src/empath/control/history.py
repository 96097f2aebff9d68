"""`empathctl message log ID`: one message's story from the spool and its history.

Pure: the live message (if it is still queued) and the history's events (see
:mod:`empath.spool.journal`) in, one list of timed events out, oldest first.  The
spool gives the envelope and, for domains the history has no attempt of, the
attempts the unit kept; the history gives TLS, DSNs, operator actions and the
message after it left the queue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from empath.spool.model import MessageState


def _reply(code: Any, text: str) -> str:
    if code is None or str(text).startswith(str(code)):
        return str(text)
    return f"{code} {text}".rstrip()


def _envelope_event(at: float, env: Mapping[str, Any]) -> dict[str, Any]:
    rcpts = ", ".join(env.get("recipients", []))
    return {
        "at": at,
        "event": "received",
        "text": f"received from {env.get('peer') or '-'} helo {env.get('helo') or '-'}: "
        f"from <{env.get('sender', '')}> to {rcpts}, {env.get('size', 0)} bytes"
        + (" (a DSN we generated)" if env.get("is_dsn") else ""),
    }


def _event_text(e: Mapping[str, Any]) -> str:
    kind = e.get("event")
    if kind == "attempt":
        parts = [f"attempt {e.get('domain')} via {e.get('mx') or '-'}"]
        if e.get("address"):
            parts.append(f"[{e['address']}]")
        parts.append(f"tls {e.get('tls') or 'none'}:")
        parts.append(_reply(e.get("code"), str(e.get("text", ""))) or "-")
        counts = [
            f"{len(e.get(k) or [])} {k}"
            for k in ("delivered", "temporary", "permanent")
            if e.get(k)
        ]
        if counts:
            parts.append(f"({', '.join(counts)})")
        return " ".join(parts)
    if kind == "dsn":
        return f"DSN ({e.get('kind')}) {e.get('dsn_id')} queued to the sender"
    if kind == "operator":
        text = f"operator: {e.get('action')} {e.get('domain') or ''}".rstrip()
        if e.get("dsn_id"):
            text += f" (DSN {e['dsn_id']})"
        return text
    if kind == "expired":
        return f"expired {e.get('domain')}: gave up without another attempt"
    if kind == "left":
        units = ", ".join(f"{u['domain']} {u['status']}" for u in e.get("units", []))
        return f"left the queue: {e.get('reason')} ({units})"
    return str(kind)


def message_story(
    msg_id: str, live: MessageState | None, events: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The message's events, oldest first, each with a one-line ``text``."""
    out: list[dict[str, Any]] = []
    left = next((e for e in reversed(events) if e.get("event") == "left"), None)
    journal_domains = {e.get("domain") for e in events if e.get("event") == "attempt"}
    if live is not None:
        env = live.envelope
        out.append(_envelope_event(env.received_at, env.to_json()))
        for u in live.units:
            if u.domain in journal_domains:
                continue
            for a in u.history:
                out.append(
                    {
                        "at": a.at,
                        "event": "attempt",
                        "domain": u.domain,
                        "text": f"attempt {u.domain} via {a.mx or '-'}: "
                        f"{_reply(a.code, a.text) or '-'}",
                    }
                )
    elif left is not None:
        out.append(_envelope_event(float(left.get("received_at", 0.0)), left))
        for u in left.get("units", []):
            if u.get("domain") in journal_domains:
                continue
            for a in u.get("history", []):
                out.append(
                    {
                        "at": a.get("at", 0.0),
                        "event": "attempt",
                        "domain": u.get("domain"),
                        "text": f"attempt {u.get('domain')} via {a.get('mx') or '-'}: "
                        f"{_reply(a.get('code'), str(a.get('text', ''))) or '-'}",
                    }
                )
    for e in events:
        item = {k: v for k, v in e.items() if k not in ("id", "units", "recipients")}
        item["text"] = _event_text(e)
        out.append(item)
    out.sort(key=lambda e: float(e.get("at") or 0.0))
    if live is not None:
        state = ", ".join(f"{u.domain} {u.status.value}" for u in live.units)
        status = f"queued ({state})"
    elif left is not None:
        status = f"left the queue: {left.get('reason')}"
    else:
        status = "not queued; only part of its history is kept"
    return {"id": msg_id, "queued": live is not None, "status": status, "events": out}
