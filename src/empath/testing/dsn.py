"""Reading a DSN back (tests only): the stdlib ``email`` parser's view of what
:mod:`empath.delivery.bounce` builds, with the structural checks RFC 3464 asks for."""

from __future__ import annotations

import email.parser
import email.policy
import re
from dataclasses import dataclass
from typing import Any

from empath.delivery.bounce import MAX_LINE_OCTETS

_CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class ParsedDsn:
    """A DSN as the stdlib ``email`` parser sees it (field names lower-cased)."""

    headers: dict[str, str]
    report_type: str
    explanation: str
    per_message: dict[str, str]
    per_recipient: tuple[dict[str, str], ...]
    original_headers: bytes


def parse_dsn(body: bytes) -> ParsedDsn:
    """Parse ``body`` with ``email`` (policy=default); ValueError if it is not a sound DSN.

    Checks: CRLF-only lines of at most 998 octets, multipart/report whose report-type
    names the second of exactly three parts, the required RFC 3464 fields.
    """
    lines = body.split(_CRLF)
    if b"\r" in body.replace(_CRLF, b"") or b"\n" in body.replace(_CRLF, b""):
        raise ValueError("bare CR or LF")
    if any(len(line) > MAX_LINE_OCTETS for line in lines):
        raise ValueError("line longer than 998 octets")
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(body)
    if msg.get_content_type() != "multipart/report":
        raise ValueError(f"not multipart/report: {msg.get_content_type()}")
    payload = msg.get_payload()
    if not isinstance(payload, list):
        raise ValueError("not a multipart message")
    parts: list[Any] = list(payload)
    if len(parts) != 3:
        raise ValueError(f"{len(parts)} parts, want 3")
    report_type = str(msg.get_param("report-type", ""))
    if parts[1].get_content_type() != f"message/{report_type}":
        raise ValueError(f"report-type {report_type} but part 2 is {parts[1].get_content_type()}")
    raw_parts = body.split(b"\r\n--" + str(msg.get_boundary()).encode())
    groups = _status_groups(parts[1], raw_parts[2])
    if not groups or "reporting-mta" not in groups[0] or len(groups) < 2:
        raise ValueError("per-message fields or per-recipient groups missing")
    for group in groups[1:]:
        missing = {"final-recipient", "action", "status"} - group.keys()
        if missing:
            raise ValueError(f"per-recipient fields missing: {sorted(missing)}")
    headers = parts[2].get_payload(decode=True)  # None for message/global-headers
    if not isinstance(headers, bytes):
        headers = raw_parts[3][raw_parts[3].index(b"\r\n\r\n") + 4 :]
    return ParsedDsn(
        headers={k.lower(): str(v) for k, v in msg.items()},
        report_type=report_type,
        explanation=parts[0].get_content(),
        per_message=groups[0],
        per_recipient=tuple(groups[1:]),
        original_headers=headers,
    )


def _status_groups(part: Any, raw: bytes) -> list[dict[str, str]]:
    if part.get_content_type() == "message/delivery-status":  # the stdlib splits the groups
        return [{k.lower(): str(v) for k, v in block.items()} for block in part.get_payload()]
    # message/global-delivery-status is opaque to the stdlib: read the raw part ourselves.
    text = raw[raw.index(b"\r\n\r\n") + 4 :].decode()  # raw starts with CRLF
    groups = []
    for chunk in re.split(r"(?:\r\n){2,}", text.strip("\r\n")):
        unfolded = re.sub(r"\r\n(?=[ \t])", "", chunk)
        fields = (line.partition(":") for line in unfolded.split("\r\n"))
        groups.append({k.strip().lower(): v.strip() for k, _, v in fields})
    return groups
