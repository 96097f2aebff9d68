"""SMTP command lines, paths and ESMTP parameters (server side, sans-I/O).

Theory of operation
-------------------
The server's line buffer hands :func:`parse_command` one command line without
its line ending.  It splits off the verb (case-insensitive, RFC 5321 §2.4:
"Verbs and argument values ... are not case sensitive") and returns a
:class:`Command`.  The server then parses the argument with the function for
that verb: :func:`parse_mail`, :func:`parse_rcpt`, :func:`parse_bdat`,
:func:`parse_helo`.

Every failure raises :class:`~empath.errors.SmtpProtocolError` carrying the reply
the client earns; nothing else escapes (checked with hypothesis on random bytes).

Paths follow RFC 5321 §4.1.2:

    Reverse-path = Path / "<>"
    Path         = "<" [ A-d-l ":" ] Mailbox ">"      (the source route is ignored)
    Mailbox      = Local-part "@" ( Domain / address-literal )
    Local-part   = Dot-string / Quoted-string

With SMTPUTF8 (RFC 6531 §3.3) atext, qtext and domain labels may also contain
UTF-8 non-ASCII characters; without it such an address is refused with
``553 5.6.7``.  Domains are returned as written; callers compare them
case-insensitively.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from empath.errors import SmtpProtocolError

# RFC 5321 §4.5.3.1: local-part 64 octets, domain 255 octets, path 256 octets.
MAX_LOCAL_PART_BYTES: Final = 64
MAX_DOMAIN_BYTES: Final = 255
MAX_PATH_BYTES: Final = 256


class Verb(enum.Enum):
    HELO = "HELO"
    EHLO = "EHLO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BDAT = "BDAT"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"
    VRFY = "VRFY"
    EXPN = "EXPN"
    HELP = "HELP"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"  # RFC 4954


_VERBS: Final = {v.value: v for v in Verb}


@dataclass(slots=True)  # not frozen, __init__ written out: per command (events.py)
class Command:
    verb: Verb
    arg: str  # everything after the verb and one space, as sent


class Body(enum.Enum):
    """RFC 6152 BODY= values we take (BINARYMIME is not offered)."""

    UNSPECIFIED = ""
    SEVEN_BIT = "7BIT"
    EIGHT_BIT_MIME = "8BITMIME"


@dataclass(slots=True, init=False)  # not frozen, __init__ written out: per command (events.py)
class MailFrom:
    sender: str  # "" is the null reverse-path <>
    size: int | None = None  # SIZE= declared by the client
    body: Body = Body.UNSPECIFIED
    smtputf8: bool = False
    ret: str = ""  # RFC 3461 RET=, accepted and ignored
    envid: str = ""  # RFC 3461 ENVID=, accepted and ignored

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(
        self,
        sender: str,
        size: int | None = None,
        body: Body = Body.UNSPECIFIED,
        smtputf8: bool = False,
        ret: str = "",
        envid: str = "",
    ) -> None:
        self.sender = sender
        self.size = size
        self.body = body
        self.smtputf8 = smtputf8
        self.ret = ret
        self.envid = envid


@dataclass(slots=True, init=False)  # not frozen, __init__ written out: per command (events.py)
class RcptTo:
    recipient: str
    notify: str = ""  # RFC 3461 NOTIFY=, accepted and ignored
    orcpt: str = ""  # RFC 3461 ORCPT=, accepted and ignored

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(self, recipient: str, notify: str = "", orcpt: str = "") -> None:
        self.recipient = recipient
        self.notify = notify
        self.orcpt = orcpt


def _err(code: int, enhanced: str, text: str) -> SmtpProtocolError:
    return SmtpProtocolError(code, enhanced, text)


# --- command line -----------------------------------------------------------


def split_command(line: bytes) -> tuple[str, str]:
    """(upper-cased verb word, argument) of a command line; the hot path of the server."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise _err(500, "5.5.2", "Syntax error: invalid UTF-8") from None
    sp = text.find(" ")
    if sp < 0:
        return text.upper(), ""
    return text[:sp].upper(), text[sp + 1 :]


def parse_command(line: bytes) -> Command:
    """Split one command line (without CRLF) into verb and argument."""
    word, arg = split_command(line)
    verb = _VERBS.get(word)
    if verb is None:
        raise _err(500, "5.5.1", "Command unrecognized")
    return Command(verb, arg)


# --- paths ------------------------------------------------------------------

# RFC 5321 §4.1.2 atext (RFC 5322 §3.2.3) and qtextSMTP / quoted-pairSMTP.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_QTEXT = r"\x20\x21\x23-\x5b\x5d-\x7e"
_LET_DIG = r"A-Za-z0-9"
_U8 = r"\u0080-\U0010ffff"


def _path_regex(utf8: bool) -> re.Pattern[str]:
    extra = _U8 if utf8 else ""
    atom = f"[{_ATEXT}{extra}]+"
    dot_string = f"{atom}(?:\\.{atom})*"
    quoted = f'"(?:[{_QTEXT}{extra}]|\\\\[\\x20-\\x7e])*"'
    label = f"[{_LET_DIG}{extra}](?:[{_LET_DIG}\\-{extra}]*[{_LET_DIG}{extra}])?"
    domain = f"{label}(?:\\.{label})*"
    literal = r"\[[^\[\]\\\s]+\]"
    at_domain = f"@(?:{domain}|{literal})"
    return re.compile(
        f"(?:{at_domain}(?:,{at_domain})*:)?"  # A-d-l, ignored (RFC 5321 §4.1.1.3)
        f"(?P<local>{dot_string}|{quoted})@(?P<domain>{domain}|{literal})"
    )


_MAILBOX_ASCII: Final = _path_regex(False)
_MAILBOX_UTF8: Final = _path_regex(True)


def _address_literal_ok(literal: str) -> bool:
    inner = literal[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def parse_path(text: str, *, smtputf8: bool, bad: tuple[int, str, str]) -> str:
    """The mailbox of ``<...>`` (``""`` for ``<>``); ``bad`` is raised on a syntax error.

    RFC 5321 §3.3: "the <reverse-path> ... can contain more than just a mailbox"
    (a source route), which "SHOULD" be ignored: we return the mailbox only.
    """
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise _err(*bad)
    inner = text[1:-1]
    if not inner:
        return ""
    ascii_only = inner.isascii()
    if not ascii_only and not smtputf8:
        # RFC 6531 §3.7.4.1 (non-ASCII address without the SMTPUTF8 parameter)
        raise _err(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
    m = (_MAILBOX_ASCII if ascii_only else _MAILBOX_UTF8).fullmatch(inner)
    if m is None:
        raise _err(*bad)
    local, domain = m.group("local"), m.group("domain")
    if domain[0] == "[" and not _address_literal_ok(domain):
        raise _err(*bad)
    # a short ASCII path cannot break the limits (skip the encodes on the hot path)
    if (not ascii_only or len(inner) > MAX_LOCAL_PART_BYTES) and (
        len(local.encode()) > MAX_LOCAL_PART_BYTES
        or len(domain.encode()) > MAX_DOMAIN_BYTES
        or len(inner.encode()) > MAX_PATH_BYTES
    ):
        raise _err(*bad)
    start = m.start("local")
    return inner[start:] if start else inner


# --- ESMTP parameters -----------------------------------------------------------

# RFC 5321 §4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-");
# esmtp-value = 1*(%d33-60 / %d62-126)
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9\-]*)(?:=([\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+))?")


def _split_path(arg: str, prefix: str, bad: tuple[int, str, str]) -> tuple[str, list[str]]:
    """``FROM:<path> params`` → (``<path>``, params).  A space after the colon is tolerated."""
    if arg[: len(prefix)].upper() != prefix:
        raise _err(
            501, "5.5.4", f"Syntax: {'MAIL FROM' if prefix == 'FROM:' else 'RCPT TO'}:<address>"
        )
    rest = arg[len(prefix) :].lstrip(" ")
    if not rest.startswith("<"):
        raise _err(*bad)
    end = rest.find(">")
    # a ">" may sit inside a quoted local part; take the first ">" followed by space/end
    while end >= 0 and end + 1 < len(rest) and rest[end + 1] != " ":
        end = rest.find(">", end + 1)
    if end < 0:
        raise _err(*bad)
    return rest[: end + 1], rest[end + 1 :].split()


def _params(words: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for word in words:
        m = _PARAM.fullmatch(word)
        if m is None:
            raise _err(501, "5.5.4", "Syntax error in parameters")
        key = m.group(1).upper()
        if key in out:
            raise _err(501, "5.5.4", f"Duplicate parameter {key}")
        out[key] = m.group(2)
    return out


# (code, enhanced, text) — a fresh exception is made for every raise (re-raising one
# module-level instance would grow its __traceback__ forever).
_MAIL_BAD: Final = (501, "5.1.7", "Bad sender address syntax")
_RCPT_BAD: Final = (553, "5.1.3", "Bad recipient address syntax")


def parse_mail(arg: str) -> MailFrom:
    """Argument of MAIL: ``FROM:<reverse-path> [SP mail-parameters]``."""
    path, words = _split_path(arg, "FROM:", _MAIL_BAD)
    params = _params(words)
    size: int | None = None
    body = Body.UNSPECIFIED
    smtputf8 = False
    ret = envid = ""
    for key, value in params.items():
        if key == "SIZE":
            # RFC 1870: size-value ::= 1*20DIGIT
            if value is None or not value.isascii() or not value.isdigit() or len(value) > 20:
                raise _err(501, "5.5.4", "Bad SIZE parameter")
            size = int(value)
        elif key == "BODY":
            v = (value or "").upper()
            if v == "BINARYMIME":
                raise _err(555, "5.5.4", "BODY=BINARYMIME is not supported")
            if v not in ("7BIT", "8BITMIME"):
                raise _err(501, "5.5.4", "Bad BODY parameter")
            body = Body(v)
        elif key == "SMTPUTF8":
            if value is not None:
                raise _err(501, "5.5.4", "SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise _err(501, "5.5.4", "Bad RET parameter")
            ret = value.upper()
        elif key == "ENVID":
            envid = value or ""
        elif key == "AUTH":
            pass  # RFC 4954 §5: the AUTH= parameter; we keep no identity
        else:
            raise _err(555, "5.5.4", f"Unsupported parameter {key}")
    sender = parse_path(path, smtputf8=smtputf8, bad=_MAIL_BAD)
    return MailFrom(sender, size, body, smtputf8, ret, envid)


_NOTIFY_WORDS: Final = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})


def parse_rcpt(arg: str, *, smtputf8: bool) -> RcptTo:
    """Argument of RCPT: ``TO:<forward-path> [SP rcpt-parameters]``.

    ``smtputf8`` is whether the transaction's MAIL carried SMTPUTF8.
    RFC 5321 §4.1.1.3: "<Postmaster>" without a domain is accepted.
    """
    path, words = _split_path(arg, "TO:", _RCPT_BAD)
    notify = orcpt = ""
    for key, value in _params(words).items():
        if key == "NOTIFY":
            parts = (value or "").upper().split(",")
            if not all(p in _NOTIFY_WORDS for p in parts) or ("NEVER" in parts and len(parts) > 1):
                raise _err(501, "5.5.4", "Bad NOTIFY parameter")
            notify = ",".join(parts)
        elif key == "ORCPT":
            if not value or ";" not in value:
                raise _err(501, "5.5.4", "Bad ORCPT parameter")
            orcpt = value
        else:
            raise _err(555, "5.5.4", f"Unsupported parameter {key}")
    if path.lower() == "<postmaster>":
        return RcptTo("postmaster", notify, orcpt)
    rcpt = parse_path(path, smtputf8=smtputf8, bad=_RCPT_BAD)
    if not rcpt:
        raise _err(553, "5.1.3", "Null recipient not allowed")
    return RcptTo(rcpt, notify, orcpt)


def domain_of(address: str) -> str:
    """The lower-cased domain part of an address ("" for the null address or a bare
    ``postmaster``)."""
    at = address.rfind("@")
    return address[at + 1 :].lower() if at >= 0 else ""


def parse_bdat(arg: str) -> tuple[int, bool]:
    """RFC 3030: ``BDAT <chunk-size> [LAST]`` → (size, last)."""
    words = arg.split()
    if (
        not 1 <= len(words) <= 2
        or not words[0].isascii()
        or not words[0].isdigit()
        or len(words[0]) > 20
        or (len(words) == 2 and words[1].upper() != "LAST")
    ):
        raise _err(501, "5.5.4", "Syntax: BDAT <size> [LAST]")
    return int(words[0]), len(words) == 2


def parse_helo(arg: str) -> str:
    """The client's EHLO/HELO name.  RFC 5321 §4.1.4 wants a domain or address
    literal; like most MTAs we only require something printable, since the name is
    only recorded (in Received:), never trusted."""
    name = arg.strip(" ")
    if not name or " " in name or not name.isprintable():
        raise _err(501, "5.5.4", "Syntax: EHLO <domain>")
    return name
