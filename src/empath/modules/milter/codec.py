"""The Sendmail milter protocol, version 6, MTA side: bytes in, packets out (sans-I/O).

Theory of operation
-------------------
A packet is a 4-octet big-endian length (counting the command octet), one command
octet and the data.  Strings are NUL-terminated.  This module encodes the MTA's
commands (``SMFIC_*``), splits the milter's byte stream into packets
(:class:`PacketReader`, bounded) and decodes the milter's replies (``SMFIR_*``) into
frozen values.  It imports nothing async and reads no clock; ``client.py`` is the
asyncio shell around it and ``filter.py`` the module behind Empath's hook interface.

The MTA opens with ``SMFIC_OPTNEG`` offering protocol version 6, the actions it can
carry out and the protocol steps a milter may skip or not answer (as Postfix does);
the milter answers with the subset it wants (:class:`Negotiated`).  Then, per SMTP
session: macros (``SMFIC_MACRO``) before each command they belong to, ``CONNECT``,
``HELO``, per message ``MAIL``, ``RCPT``..., ``DATA``, ``HEADER``..., ``EOH``,
``BODY`` chunks of at most 65,535 octets, ``BODYEOB``; ``ABORT`` ends a message the
milter saw part of; ``QUIT`` the session.  A step the milter asked to skip is not
sent; a step it asked not to answer (``SMFIP_NR_*``) is sent and not waited for.
Numbers and letters are those of libmilter's ``mfdef.h`` (facts, not its code).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from empath.errors import EmpathError

__all__ = [
    "MILTER_CHUNK_MAX",
    "MTA_ACTIONS",
    "MTA_PROTOCOL",
    "Act",
    "Cmd",
    "MilterProtocolError",
    "Negotiated",
    "PacketReader",
    "Proto",
    "Response",
    "decode_response",
    "encode",
]

PROTOCOL_VERSION: Final = 6
MILTER_CHUNK_MAX: Final = 65535
MAX_PACKET_BYTES: Final = 4 * 1024 * 1024  # a reply bigger than this is a broken milter


class MilterProtocolError(EmpathError):
    """The milter sent something the protocol does not allow."""


class Cmd(bytes, enum.Enum):
    """MTA → milter commands (SMFIC_*)."""

    ABORT = b"A"
    BODY = b"B"
    CONNECT = b"C"
    MACRO = b"D"
    BODYEOB = b"E"
    HELO = b"H"
    QUIT_NC = b"K"
    HEADER = b"L"
    MAIL = b"M"
    EOH = b"N"
    OPTNEG = b"O"
    QUIT = b"Q"
    RCPT = b"R"
    DATA = b"T"
    UNKNOWN = b"U"


class Act(enum.IntFlag):
    """Actions a milter may take (SMFIF_*)."""

    ADDHDRS = 0x01
    CHGBODY = 0x02
    ADDRCPT = 0x04
    DELRCPT = 0x08
    CHGHDRS = 0x10
    QUARANTINE = 0x20
    CHGFROM = 0x40
    ADDRCPT_PAR = 0x80
    SETSYMLIST = 0x100


class Proto(enum.IntFlag):
    """Protocol steps a milter may skip (NO*) or not answer (NR_*) (SMFIP_*)."""

    NOCONNECT = 0x1
    NOHELO = 0x2
    NOMAIL = 0x4
    NORCPT = 0x8
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000


# What we offer: every action (Postfix offers them all too) and every step flag.
MTA_ACTIONS: Final = Act(0x1FF)
MTA_PROTOCOL: Final = Proto(0x1FFFFF)

# Per command: the flag that skips it and the flag that says "no reply".
STEP_FLAGS: Final[dict[Cmd, tuple[Proto, Proto]]] = {
    Cmd.CONNECT: (Proto.NOCONNECT, Proto.NR_CONN),
    Cmd.HELO: (Proto.NOHELO, Proto.NR_HELO),
    Cmd.MAIL: (Proto.NOMAIL, Proto.NR_MAIL),
    Cmd.RCPT: (Proto.NORCPT, Proto.NR_RCPT),
    Cmd.DATA: (Proto.NODATA, Proto.NR_DATA),
    Cmd.HEADER: (Proto.NOHDRS, Proto.NR_HDR),
    Cmd.EOH: (Proto.NOEOH, Proto.NR_EOH),
    Cmd.BODY: (Proto.NOBODY, Proto.NR_BODY),
    Cmd.UNKNOWN: (Proto.NOUNKNOWN, Proto.NR_UNKN),
}


def encode(cmd: Cmd, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd.value + data


def _z(*parts: str) -> bytes:
    return b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in parts)


def optneg() -> bytes:
    return encode(Cmd.OPTNEG, struct.pack(">III", PROTOCOL_VERSION, MTA_ACTIONS, MTA_PROTOCOL))


def macros(for_cmd: Cmd, values: dict[str, str]) -> bytes:
    """SMFIC_MACRO for the command that follows it (empty values are left out)."""
    pairs = [p for k, v in values.items() if v for p in (k, v)]
    return encode(Cmd.MACRO, for_cmd.value + _z(*pairs))


def connect(hostname: str, address: str, port: int) -> bytes:
    """SMFIC_CONNECT: family '4' or '6' with the port, 'U' (unknown) when there is no
    address (the milter then gets only the host name)."""
    if not address:
        return encode(Cmd.CONNECT, _z(hostname) + b"U")
    family = b"6" if ":" in address else b"4"
    return encode(Cmd.CONNECT, _z(hostname) + family + struct.pack(">H", port) + _z(address))


def helo(name: str) -> bytes:
    return encode(Cmd.HELO, _z(name))


def mail(sender: str, *esmtp: str) -> bytes:
    return encode(Cmd.MAIL, _z(f"<{sender}>", *esmtp))


def rcpt(recipient: str, *esmtp: str) -> bytes:
    return encode(Cmd.RCPT, _z(f"<{recipient}>", *esmtp))


def header(name: str, value: str) -> bytes:
    return encode(Cmd.HEADER, _z(name, value))


def body_chunks(body: bytes) -> list[bytes]:
    step = MILTER_CHUNK_MAX
    return [encode(Cmd.BODY, body[i : i + step]) for i in range(0, len(body), step)]


# --- reading ------------------------------------------------------------------------


class PacketReader:
    """Splits the milter's byte stream into ``(command, data)`` packets."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        buf = self._buf + data
        out: list[tuple[bytes, bytes]] = []
        pos = 0
        while len(buf) - pos >= 4:
            (size,) = struct.unpack_from(">I", buf, pos)
            if size == 0 or size > MAX_PACKET_BYTES:
                raise MilterProtocolError(f"milter packet of {size} octets")
            if len(buf) - pos - 4 < size:
                break
            out.append((buf[pos + 4 : pos + 5], buf[pos + 5 : pos + 4 + size]))
            pos += 4 + size
        self._buf = buf[pos:]
        return out


# --- replies --------------------------------------------------------------------------


class Kind(enum.Enum):
    """Milter → MTA replies (SMFIR_*) we understand."""

    ADDRCPT = b"+"
    DELRCPT = b"-"
    ADDRCPT_PAR = b"2"
    SHUTDOWN = b"4"
    ACCEPT = b"a"
    REPLBODY = b"b"
    CONTINUE = b"c"
    DISCARD = b"d"
    CHGFROM = b"e"
    CONN_FAIL = b"f"
    ADDHEADER = b"h"
    INSHEADER = b"i"
    SETSYMLIST = b"l"
    CHGHEADER = b"m"
    PROGRESS = b"p"
    QUARANTINE = b"q"
    REJECT = b"r"
    SKIP = b"s"
    TEMPFAIL = b"t"
    REPLYCODE = b"y"
    OPTNEG = b"O"


# Replies that end a step (the rest are modifications or progress, which do not).
FINAL: Final = frozenset({Kind.ACCEPT, Kind.CONTINUE, Kind.DISCARD, Kind.REJECT,
                          Kind.TEMPFAIL, Kind.REPLYCODE, Kind.SKIP, Kind.SHUTDOWN,
                          Kind.CONN_FAIL})  # fmt: skip


@dataclass(frozen=True, slots=True)
class Response:
    """One decoded reply.  ``args`` are its strings; ``index`` the number of
    INSHEADER/CHGHEADER; ``data`` the raw bytes of REPLBODY."""

    kind: Kind
    args: tuple[str, ...] = ()
    index: int = 0
    data: bytes = b""

    @property
    def final(self) -> bool:
        return self.kind in FINAL


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The milter's answer to OPTNEG."""

    version: int
    actions: Act
    protocol: Proto

    def skips(self, cmd: Cmd) -> bool:
        flags = STEP_FLAGS.get(cmd)
        return flags is not None and bool(self.protocol & flags[0])

    def answers(self, cmd: Cmd) -> bool:
        flags = STEP_FLAGS.get(cmd)
        return flags is None or not self.protocol & flags[1]


def _strings(data: bytes) -> tuple[str, ...]:
    if data and not data.endswith(b"\0"):
        raise MilterProtocolError("milter string not NUL-terminated")
    return (
        tuple(p.decode("utf-8", "surrogateescape") for p in data[:-1].split(b"\0")) if data else ()
    )


def decode_response(cmd: bytes, data: bytes) -> Response:
    try:
        kind = Kind(cmd)
    except ValueError:
        raise MilterProtocolError(f"unknown milter reply {cmd!r}") from None
    if kind in (Kind.INSHEADER, Kind.CHGHEADER):
        if len(data) < 4:
            raise MilterProtocolError(f"short {kind.name} reply")
        (index,) = struct.unpack_from(">I", data)
        args = _strings(data[4:])
        if len(args) != 2:
            raise MilterProtocolError(f"{kind.name} needs a name and a value")
        return Response(kind, args, index)
    if kind is Kind.REPLBODY:
        return Response(kind, data=data)
    if kind is Kind.SETSYMLIST:
        return Response(kind, data=data)
    if kind is Kind.OPTNEG:
        return Response(kind, data=data)
    args = _strings(data)
    if kind is Kind.ADDHEADER and len(args) != 2:
        raise MilterProtocolError("ADDHEADER needs a name and a value")
    if kind in (Kind.ADDRCPT, Kind.DELRCPT, Kind.ADDRCPT_PAR, Kind.REPLYCODE, Kind.CHGFROM) and (
        not args
    ):
        raise MilterProtocolError(f"{kind.name} needs an argument")
    return Response(kind, args)


def decode_optneg(data: bytes) -> Negotiated:
    """The milter's OPTNEG reply (macro lists a v6 milter may append are ignored:
    we send the macros Postfix sends by default whatever it asks)."""
    if len(data) < 12:
        raise MilterProtocolError("short OPTNEG reply")
    version, actions, protocol = struct.unpack_from(">III", data)
    if version < 2:
        raise MilterProtocolError(f"milter protocol version {version} is too old")
    if actions & ~int(MTA_ACTIONS):
        raise MilterProtocolError(f"milter wants actions 0x{actions:x} we do not offer")
    if protocol & ~int(MTA_PROTOCOL):
        raise MilterProtocolError(f"milter wants protocol steps 0x{protocol:x} we do not offer")
    return Negotiated(version, Act(actions), Proto(protocol))


def parse_replycode(text: str) -> tuple[int, str, str]:
    """``"550 5.7.1 Gtube pattern"`` → ``(550, "5.7.1", "Gtube pattern")``.

    Multi-line replies (``550-5.7.1 a\\r\\n550 5.7.1 b``) keep their text lines."""
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln]
    if not lines or len(lines[0]) < 3 or not lines[0][:3].isdigit():
        raise MilterProtocolError(f"bad REPLYCODE {text!r}")
    code = int(lines[0][:3])
    if not 400 <= code <= 599:
        raise MilterProtocolError(f"REPLYCODE {code} is not 4xx/5xx")
    enhanced = ""
    texts: list[str] = []
    for ln in lines:
        rest = ln[4:] if len(ln) > 3 and ln[3] in " -" else ln[3:]
        word, _, after = rest.partition(" ")
        parts = word.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and word[0] == str(code)[0]:
            enhanced = enhanced or word
            rest = after
        texts.append(rest)
    return code, enhanced, "\n".join(texts)
