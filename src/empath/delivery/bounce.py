"""Delivery status notifications (RFC 3464): whether one may be sent, and its bytes.

Theory of operation: the delivery engine decides *when* a DSN is due and collects
one :class:`RecipientReport` per affected recipient; this pure module decides
*whether* a DSN may be sent (:func:`should_send_dsn`) and composes it
(:func:`build_dsn`) as a complete RFC 5322 message -- CRLF line ends only, no
line over 998 octets -- that the caller spools with the null sender like any
other mail.  Time, host name and Message-ID source are arguments: no I/O, no
clock, the same inputs give the same bytes.

The DSN is ``multipart/report; report-type=delivery-status`` (RFC 6522): a human
explanation, the ``message/delivery-status`` fields and the original header block
as ``text/rfc822-headers``.  If the DSN's recipient or a reported address is
non-ASCII, or the original SMTPUTF8 message has UTF-8 headers, the RFC 6533 forms
are used (``message/global-delivery-status``, ``utf-8;`` addresses,
``message/global-headers``) and the DSN needs SMTPUTF8 (``DsnMessage.smtputf8``).
Otherwise it is 7-bit clean: the human part and 8-bit original headers travel
quoted-printable and remote reply text is reduced to ASCII in the report fields.

Who gets one.  RFC 5321 §6.1: "If there is a delivery failure after acceptance of
a message, the receiver-SMTP MUST formulate and mail a notification message.
[...] However, if this address is null ("<>"), the receiver-SMTP MUST NOT send a
notification."  RFC 3464 §2: "Whenever an SMTP transaction is used to send a
DSN, the MAIL FROM command MUST use a NULL return address".  So: never to the
null sender and never about a DSN (ours carry ``is_dsn``, others' carry ``<>``).
``Auto-Submitted`` is deliberately not consulted: RFC 3834 §2 ("Automatic
responses SHOULD NOT be issued in response to any message which contains an
Auto-Submitted header field [...] where that field has any value other than
"no"") binds responders such as vacation programs, while the MTA's duty above is
a MUST whose only exception is the null path.  Machine-generated mail with a real
return path (cron output, alerts) still gets bounces -- else its owner never
learns it was lost -- and no loop can form, as every DSN leaves with ``<>``.
"""

from __future__ import annotations

import binascii
import enum
import ipaddress
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from empath.spool.model import Envelope

HEADER_BLOCK_MAX_BYTES = 64 * 1024  # original headers returned at most
MAX_LINE_OCTETS = 998  # RFC 5322 §2.1.1, excluding the CRLF
_FOLD_AT = 78  # RFC 5322 §2.1.1: lines SHOULD be no more than 78 characters
_MAX_WORD_BYTES = 900  # longer unbreakable runs are split so lines stay <= 998
_MAX_DIAGNOSTIC_CHARS = 2000
_CRLF = b"\r\n"


class DsnAction(enum.StrEnum):
    """RFC 3464 §2.3.3 Action values this MTA reports."""

    FAILED = "failed"
    DELAYED = "delayed"


class DsnKind(enum.StrEnum):
    """The event a DSN reports (DESIGN §4)."""

    FAILED = "failed"  # permanent (5xx) failure
    EXHAUSTED = "exhausted"  # delivery.max_attempts reached
    EXPIRED = "expired"  # delivery.message_expiration_secs passed
    DELAYED = "delayed"  # one-time warning after dsn.delay_warning_secs
    DELETED = "deleted"  # operator: queue delete --bounce

    @property
    def action(self) -> DsnAction:
        return DsnAction.DELAYED if self is DsnKind.DELAYED else DsnAction.FAILED


_SUBJECTS = {
    DsnAction.FAILED: "Undelivered Mail Returned to Sender",
    DsnAction.DELAYED: "Delayed Mail (still being retried)",
}

_UNDELIVERED = "Your message could not be delivered to the recipients listed below"
_EXPLANATIONS = {
    DsnKind.FAILED: f"{_UNDELIVERED}: their mail servers refused it permanently.",
    DsnKind.EXHAUSTED: f"{_UNDELIVERED}: every allowed delivery attempt failed.",
    DsnKind.EXPIRED: f"{_UNDELIVERED} within the time a message may wait in the queue.",
    DsnKind.DELETED: f"{_UNDELIVERED}: the mail administrator removed it from the queue.",
    DsnKind.DELAYED: "Your message has not yet been delivered to the recipients listed below."
    " This is only a warning: delivery is still being retried, do not send it again.",
}


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What happened to one affected recipient (one per-recipient block)."""

    address: str
    action: DsnAction
    status: str  # RFC 3463 enhanced status, e.g. "5.1.1"
    remote_mta: str = ""  # MX host name; a ":port" suffix is dropped
    diagnostic_code: str = ""  # "smtp; 550 5.1.1 No such user" (see diagnostic_code())
    last_attempt_at: float | None = None  # wall clock
    will_retry_until: float | None = None  # wall clock; delayed reports only


@dataclass(frozen=True, slots=True)
class DsnMessage:
    """A composed DSN, ready to be spooled and delivered like any message."""

    recipients: tuple[str, ...]  # the original sender
    body: bytes
    message_id: str
    kind: DsnKind
    smtputf8: bool  # needs SMTPUTF8 downstream (implies 8-bit parts)
    sender: str = ""  # always the null sender
    is_dsn: bool = True

    def envelope(self, received_at: float) -> Envelope:
        return Envelope(
            sender=self.sender,
            recipients=self.recipients,
            received_at=received_at,
            smtputf8=self.smtputf8,
            body_8bit=self.smtputf8,
            size=len(self.body),
            is_dsn=True,
        )


def should_send_dsn(envelope: Envelope) -> bool:
    """True unless the sender is null or the message is itself a DSN (see module doc)."""
    return envelope.sender not in ("", "<>") and not envelope.is_dsn


def diagnostic_code(code: int | None, text: str) -> str:
    """The Diagnostic-Code value for a remote reply (``smtp; 550 ...``) or a local error."""
    text = _squash(text)
    if code is None:
        return f"X-Empath; {text}" if text else ""
    return f"smtp; {text}" if text.startswith(str(code)) else f"smtp; {code} {text}".rstrip()


def header_block(body: bytes, limit_bytes: int = HEADER_BLOCK_MAX_BYTES) -> bytes:
    """The header section of a stored body: whole lines up to the first empty line.

    Ends with CRLF (unless empty) and is cut at a line boundary to ``limit_bytes``.
    """
    end = body.find(b"\r\n\r\n")
    block = body if end < 0 else body[: end + 2]
    if block.startswith(_CRLF):
        return b""
    if len(block) > limit_bytes:
        cut = block.rfind(_CRLF, 0, limit_bytes - 1)
        block = block[: cut + 2] if cut >= 0 else block[: limit_bytes - 2]
    return block if block.endswith(_CRLF) or not block else block + _CRLF


def build_dsn(
    *,
    kind: DsnKind,
    original_id: str,
    envelope: Envelope,
    recipients: Sequence[RecipientReport],
    original_headers: bytes,
    hostname: str,
    reporting_mta: str | None,
    postmaster: str,
    now: float,
    message_id_factory: Callable[[], str],
    original_envelope_id: str | None = None,
) -> DsnMessage:
    """Compose the DSN for ``kind`` about ``recipients`` of message ``original_id``.

    ``message_id_factory`` returns a unique left-hand side (e.g. ``ids.new_ulid``);
    the Message-ID is ``<left@hostname>``.  Raises ValueError when no DSN may be
    sent (:func:`should_send_dsn`), for an empty report list, or for a report
    whose action does not match ``kind``.
    """
    if not should_send_dsn(envelope):
        raise ValueError("no DSN may be sent to a null sender or about a DSN")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient report")
    if any(r.action is not kind.action for r in recipients):
        raise ValueError(f"a {kind} DSN reports only action {kind.action}")
    headers = _normalise_block(original_headers)
    utf8_headers = envelope.smtputf8 and not headers.isascii() and _is_utf8(headers)
    addresses = [envelope.sender, *(r.address for r in recipients)]
    smtputf8 = utf8_headers or not all(a.isascii() for a in addresses)
    left = re.sub(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]", "", message_id_factory()) or "dsn"
    message_id = f"<{left}@{hostname}>"
    postmaster = postmaster.replace("<hostname>", hostname)

    parts = [
        _human_part(kind, original_id, recipients, hostname, postmaster),
        _status_part(
            envelope=envelope,
            recipients=recipients,
            original_id=original_id,
            reporting_mta=reporting_mta or hostname,
            original_envelope_id=original_envelope_id,
            utf8=smtputf8,
        ),
        _headers_part(headers, global_form=smtputf8 and _is_utf8(headers)),
    ]
    boundary = _boundary(left, parts)
    report_type = "global-delivery-status" if smtputf8 else "delivery-status"
    top = [
        _fold("From", f"Mail Delivery System <MAILER-DAEMON@{hostname}>"),
        _fold("To", f"<{_one_line(envelope.sender)}>"),
        _fold("Subject", _SUBJECTS[kind.action]),
        _fold("Date", _date(now)),
        _fold("Message-ID", message_id),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type={report_type};\r\n boundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if smtputf8 else '7bit'}",
    ]
    out = [
        "\r\n".join(top).encode(),
        b"\r\n\r\nThis is a MIME-encapsulated delivery status notification.\r\n",
    ]
    delimiter = b"--" + boundary.encode()
    for part in parts:
        out += [delimiter, _CRLF, part, _CRLF]
    out += [delimiter, b"--\r\n"]
    return DsnMessage(
        recipients=(envelope.sender,),
        body=b"".join(out),
        message_id=message_id,
        kind=kind,
        smtputf8=smtputf8,
    )


# -- parts -----------------------------------------------------------------------------


def _human_part(
    kind: DsnKind,
    original_id: str,
    recipients: Sequence[RecipientReport],
    hostname: str,
    postmaster: str,
) -> bytes:
    paras = [[f"This is the mail system at {hostname}."], [_EXPLANATIONS[kind]]]
    for r in recipients:
        dtype, dtext = _split_diagnostic(r.diagnostic_code)
        lines = [f"<{_one_line(r.address)}>:"]
        host = _host(r.remote_mta)
        if dtext and host and dtype.lower() == "smtp":
            lines.append(f"the mail server {host} replied: {dtext}")
        elif dtext:
            lines.append(dtext)
        lines.append(f"(status {_status(r)})")
        if r.will_retry_until is not None:
            lines.append(f"Delivery will be retried until {_date(r.will_retry_until)}.")
        paras.append(lines)
    paras.append(
        [
            f"The message had queue id {_one_line(original_id)}; its headers are attached."
            f" For help, contact the postmaster <{postmaster}> and include this report."
        ]
    )
    out: list[str] = []
    for para in paras:
        for i, line in enumerate(para):
            indent = "    " if i else ""
            out += textwrap.wrap(
                line, 72, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
            )
        out.append("")
    text = "\r\n".join(out)
    if text.isascii():
        head = "Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit"
        content = text.encode()
    else:
        head = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: "
        head += "quoted-printable"
        content = binascii.b2a_qp(text.encode(), istext=True)
    return f"{head}\r\nContent-Description: Notification\r\n\r\n".encode() + content


def _status_part(
    *,
    envelope: Envelope,
    recipients: Sequence[RecipientReport],
    original_id: str,
    reporting_mta: str,
    original_envelope_id: str | None,
    utf8: bool,
) -> bytes:
    def field(name: str, value: str) -> str:
        value = _one_line(value)
        return _fold(name, value if utf8 else value.encode("ascii", "replace").decode())

    # RFC 3464 §2.1: "The per-message fields appear first, followed by a blank line.
    # Following the per-message fields are one or more groups of per-recipient fields."
    per_message = []
    if original_envelope_id:
        per_message.append(field("Original-Envelope-Id", original_envelope_id))
    per_message += [
        field("Reporting-MTA", f"dns; {reporting_mta}"),
        field("X-Empath-Queue-ID", original_id),
        field("X-Empath-Sender", _address_field(envelope.sender)),
        field("Arrival-Date", _date(envelope.received_at)),
    ]
    groups = ["\r\n".join(per_message)]
    for r in recipients:
        block = [
            field("Final-Recipient", _address_field(r.address)),
            field("Action", r.action.value),
            field("Status", _status(r)),
        ]
        if host := _host(r.remote_mta):
            block.append(field("Remote-MTA", f"dns; {host}"))
        dtype, dtext = _split_diagnostic(r.diagnostic_code)
        if dtext:
            block.append(field("Diagnostic-Code", f"{dtype}; {dtext}"))
        if r.last_attempt_at is not None:
            block.append(field("Last-Attempt-Date", _date(r.last_attempt_at)))
        if r.action is DsnAction.DELAYED and r.will_retry_until is not None:
            block.append(field("Will-Retry-Until", _date(r.will_retry_until)))
        groups.append("\r\n".join(block))
    if utf8:
        head = "Content-Type: message/global-delivery-status\r\nContent-Transfer-Encoding: 8bit"
    else:
        head = "Content-Type: message/delivery-status"
    body = "\r\n\r\n".join(groups) + "\r\n"
    return f"{head}\r\nContent-Description: Delivery report\r\n\r\n{body}".encode()


def _headers_part(headers: bytes, *, global_form: bool) -> bytes:
    description = b"Content-Description: Headers of the undelivered message\r\n\r\n"
    if headers.isascii():
        return b"Content-Type: text/rfc822-headers\r\n" + description + headers
    if global_form:  # RFC 6533 §6.3: UTF-8 header fields, needs 8-bit transport
        head = b"Content-Type: message/global-headers\r\nContent-Transfer-Encoding: 8bit\r\n"
        return head + description + headers
    # 8-bit headers of a non-SMTPUTF8 message: text/* may travel quoted-printable.
    head = b"Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: quoted-printable\r\n"
    return head + description + binascii.b2a_qp(headers, istext=True)


# -- helpers ---------------------------------------------------------------------------

_CONTROLS = dict.fromkeys((*range(32), 127), " ")
_DIAGNOSTIC_TYPE = re.compile(r"([A-Za-z][A-Za-z0-9-]*)\s*;\s*(.*)", re.DOTALL)


def _one_line(text: str) -> str:
    """Control characters (CR, LF, TAB, ...) become spaces; outer space is trimmed."""
    return text.translate(_CONTROLS).strip()


def _squash(text: str) -> str:
    """One line with single spaces, for reply texts (multi-line replies join up)."""
    return " ".join(text.translate(_CONTROLS).split())


def _split_diagnostic(value: str) -> tuple[str, str]:
    """("smtp", "550 5.1.1 ...") from "smtp; 550 ..."; a bare reply is taken as smtp."""
    value = _squash(value)
    m = _DIAGNOSTIC_TYPE.fullmatch(value)
    dtype, text = (m[1], m[2]) if m else ("smtp", value)
    if len(text) > _MAX_DIAGNOSTIC_CHARS:
        text = text[:_MAX_DIAGNOSTIC_CHARS] + " [...]"
    return dtype, text


_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _status(report: RecipientReport) -> str:
    """RFC 3464 §2.3.4 status-code whose class agrees with the action.

    "failed" is a permanent failure (5.x.x) and "delayed" a transient one that is still
    being retried (4.x.x) (RFC 3463 §3.1 classes); a status of the other class keeps its
    subject and detail with the action's class, and a malformed one becomes x.0.0.
    """
    klass = _ACTION_CLASS[report.action]
    status = report.status.strip()
    if not _STATUS.fullmatch(status):
        return f"{klass}.0.0"
    return klass + status[1:]


_ACTION_CLASS = {DsnAction.FAILED: "5", DsnAction.DELAYED: "4"}


def _host(remote_mta: str) -> str:
    """The MX host of "host", "host:port" or "[addr]:port"; a bare IP address is written
    as an RFC 5321 address literal ("[192.0.2.1]", "[IPv6:2001:db8::1]"), never as a name."""
    host = _one_line(remote_mta)
    if host.startswith("[") and "]" in host:
        return host[: host.index("]") + 1]
    if _ip(host) is None and host.count(":") == 1:
        host = host.split(":", 1)[0]
    ip = _ip(host)
    if ip is None:
        return host
    return f"[IPv6:{ip.compressed}]" if ip.version == 6 else f"[{ip.compressed}]"


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _address_field(address: str) -> str:
    """RFC 3464 "rfc822; addr", or RFC 6533 "utf-8; " utf-8-addr-unitext when non-ASCII."""
    if address.isascii():
        return f"rfc822; {address}"
    # RFC 6533 §3: QUCHAR excludes controls, space, "\", "+" and "="; those travel as \x{HH}.
    return "utf-8; " + "".join(
        f"\\x{{{ord(c):02X}}}" if c.isascii() and (c in " \\+=" or not c.isprintable()) else c
        for c in address
    )


def _date(t: float) -> str:
    return format_datetime(datetime.fromtimestamp(t, tz=UTC))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _fold(name: str, value: str) -> str:
    """``Name: value`` folded at spaces near 78 characters; no line over 998 octets.

    Runs without spaces longer than _MAX_WORD_BYTES are split (a space appears there
    when the field is unfolded); everything else unfolds to the exact value.
    """
    words: list[str] = []
    for run in value.split(" "):
        while len(run.encode()) > _MAX_WORD_BYTES:
            words.append(run[: _MAX_WORD_BYTES // 4])
            run = run[_MAX_WORD_BYTES // 4 :]  # noqa: PLW2901
        words.append(run)
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if word and len(line) + 1 + len(word) > _FOLD_AT and line != f"{name}:":
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return "\r\n".join(lines)


def _normalise_block(block: bytes) -> bytes:
    """CRLF line ends only and lines <= 998 octets, folding overlong lines."""
    if block.count(b"\n") != block.count(_CRLF) or block.count(b"\r") != block.count(_CRLF):
        block = re.sub(rb"\r\n|\r|\n", _CRLF, block)
    if block and not block.endswith(_CRLF):
        block += _CRLF
    lines = block.split(_CRLF)
    if all(len(line) <= MAX_LINE_OCTETS for line in lines):
        return block
    step = MAX_LINE_OCTETS - 1  # continuation lines start with a space
    out = [b"\r\n ".join(line[i : i + step] for i in range(0, len(line), step)) for line in lines]
    return _CRLF.join(out)


def _boundary(left: str, parts: Sequence[bytes]) -> str:
    """A boundary made unique by the Message-ID and checked against every part."""
    stem = "=_empath_" + re.sub(r"[^A-Za-z0-9]", "", left)[:40]
    n = 0
    while True:
        boundary = stem if n == 0 else f"{stem}_{n}"
        if not any(boundary.encode() in p for p in parts):
            return boundary
        n += 1
