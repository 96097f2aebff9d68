"""SMTP replies: the value type both sides share, and an incremental reply parser.

Theory of operation
-------------------
A :class:`Reply` is a code plus one or more text lines.  The server side builds
replies (``Reply.of(250, "2.0.0", "Ok")``) and writes ``reply.to_bytes()``; the
client side feeds whatever bytes arrive from the network into a
:class:`ReplyParser` and gets back every *complete* reply those bytes finished.

RFC 5321 §4.2: "Reply-line = *( Reply-code "-" [ textstring ] CRLF )
Reply-code [ SP textstring ] CRLF".  Every line of a multi-line reply carries the
same code; the last line has a space (or nothing) after the code, the others a
hyphen.

RFC 3463 enhanced status codes ("class.subject.detail") follow the code on the
first line when the server advertises ENHANCEDSTATUSCODES; :attr:`Reply.enhanced`
extracts it (empty when absent).

The parser is line buffered and bounded: a reply line longer than
``MAX_REPLY_LINE_BYTES`` or a reply with more than ``MAX_REPLY_LINES`` lines is a
protocol error (a misbehaving server must not make us buffer without limit).
Lines ending in a bare LF are tolerated when *reading* (be liberal in what you
accept); we never write one.

Not frozen, against the house style: ``Reply`` (four per relayed message, the remote
server's answers). Why, and what stands in for frozen: DESIGN §15.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from empath.errors import SmtpProtocolError

# RFC 5321 §4.5.3.1.5: "The maximum total length of a reply line including the
# reply code and the <CRLF> is 512 octets."  Real servers exceed it (long EHLO
# keyword lists, verbose rejections), so the reader allows four times that.
MAX_REPLY_LINE_BYTES: Final = 2048
MAX_REPLY_LINES: Final = 100

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


@dataclass(slots=True, init=False, unsafe_hash=True)  # not frozen: see the module doc
class Reply:
    """One SMTP reply: a three-digit code and its text lines (without the code)."""

    code: int
    lines: tuple[str, ...]

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(self, code: int, lines: tuple[str, ...]) -> None:
        self.code = code
        self.lines = lines

    @classmethod
    def of(cls, code: int, enhanced: str, *texts: str) -> Reply:
        """A reply whose every line starts with the enhanced code (if any)."""
        if not texts:
            texts = ("",)
        if enhanced:
            return cls(code, tuple(f"{enhanced} {t}" if t else enhanced for t in texts))
        return cls(code, tuple(texts))

    @property
    def enhanced(self) -> str:
        """The RFC 3463 status code at the start of the first line, or ""."""
        if not self.lines:
            return ""
        m = _ENHANCED.match(self.lines[0])
        return m.group(0) if m else ""

    @property
    def text(self) -> str:
        """All lines joined with a space (as logged and stored in attempt history)."""
        return " ".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """3xx: 354 after DATA, 334 during AUTH."""
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def to_bytes(self) -> bytes:
        """Wire form: ``250-first`` ... ``250 last`` each ending in CRLF."""
        lines = self.lines or ("",)
        code = str(self.code)
        last = len(lines) - 1
        parts = []
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            parts.append(f"{code}{sep}{line}\r\n" if line or i != last else f"{code}\r\n")
        return "".join(parts).encode("utf-8", "replace")

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


def _malformed(what: str) -> SmtpProtocolError:
    # A server speaking garbage is a transient condition from the client's view
    # (another MX, or the same one later, may do better).
    return SmtpProtocolError(421, "4.5.0", f"malformed SMTP reply: {what}")


class ReplyParser:
    """Incremental reply reader for the client.

    ``feed(data)`` returns the replies completed by ``data`` (possibly none, possibly
    several when the server answered pipelined commands in one segment).  Raises
    :class:`SmtpProtocolError` on a malformed line, a line longer than
    ``MAX_REPLY_LINE_BYTES`` or a reply with too many lines; the parser is then
    unusable (the connection must be dropped).
    """

    __slots__ = ("_buf", "_code", "_lines")

    def __init__(self) -> None:
        self._buf = b""
        self._code = -1  # code of the multi-line reply in progress, -1 if none
        self._lines: list[str] = []

    @property
    def pending(self) -> bool:
        """True while part of a reply has been read but not completed."""
        return bool(self._buf) or bool(self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        buf = self._buf + data if self._buf else data
        out: list[Reply] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
            if nl + 1 - start > MAX_REPLY_LINE_BYTES:
                raise _malformed(f"line longer than {MAX_REPLY_LINE_BYTES} bytes")
            reply = self._line(buf[start:end])
            if reply is not None:
                out.append(reply)
            start = nl + 1
        rest = buf[start:]
        if len(rest) > MAX_REPLY_LINE_BYTES:
            raise _malformed(f"line longer than {MAX_REPLY_LINE_BYTES} bytes")
        self._buf = rest
        return out

    def _line(self, line: bytes) -> Reply | None:
        if len(line) < 3 or not line[:3].isdigit() or line[0] not in b"2345":
            raise _malformed(repr(line[:40]))
        code = int(line[:3])
        if len(line) == 3:
            last, text = True, b""
        elif line[3] == 0x20:  # " "
            last, text = True, line[4:]
        elif line[3] == 0x2D:  # "-"
            last, text = False, line[4:]
        else:
            raise _malformed(repr(line[:40]))
        if self._code not in (-1, code):
            raise _malformed(f"code {code} inside a {self._code} multi-line reply")
        self._lines.append(text.decode("utf-8", "replace"))
        if not last:
            if len(self._lines) >= MAX_REPLY_LINES:
                raise _malformed(f"more than {MAX_REPLY_LINES} lines in one reply")
            self._code = code
            return None
        reply = Reply(code, tuple(self._lines))
        self._code = -1
        self._lines = []
        return reply
