"""Message content on the wire: dot-stuffing, the end-of-data rule, BDAT chunks.

Theory of operation
-------------------
Three streaming transformers, all chunk-oriented (``bytes.find``/``count``/
``replace`` over whole chunks, never a Python loop per byte):

* :class:`DotStuffer` (client side) turns a stored body into DATA content:
  RFC 5321 §4.5.2 "Before sending a line of mail text, the SMTP client checks the
  first character of the line.  If it is a period, one additional period is
  inserted at the beginning of the line."  It also guarantees we never emit a
  bare CR or LF: any found is rewritten to CRLF.
* :class:`DataDecoder` (server side) reads DATA content until the one true end of
  data, ``<CRLF>.<CRLF>``, removing the stuffed dots.  RFC 5321 §4.5.2: "When a
  line of mail text is received by the SMTP server, it checks the line.  If the
  line is composed of a single period, it is treated as the end of mail
  indicator.  If the first character is a period and there are other characters
  on the line, the first character is deleted."
* :class:`BdatDecoder` (server side) reads RFC 3030 chunks of exact byte counts.

Both server decoders check the content with one :class:`_Checker`:

* RFC 5321 §2.3.8: "SMTP client implementations MUST NOT transmit [CR and LF]
  except when they are intended as line terminators".  A bare CR, a bare LF or a
  NUL anywhere marks the message bad (``BodyError.BARE_LINE_ENDING`` / ``NUL``).
  This is what makes SMTP smuggling (CVE-2023-51764 family) impossible here:
  ``<LF>.<LF>``, ``<CR>.<CR>``, ``<LF>.<CR><LF>`` and ``<CR><LF>.<LF>`` are not
  terminators, and a message containing them is refused rather than stored, so
  nothing we relay can be split differently by a downstream server.
* RFC 5321 §4.5.3.1.6: "The maximum total length of a text line including the
  <CRLF> is 1000 octets."  Longer → ``BodyError.LINE_TOO_LONG`` (DESIGN §3: 500 5.5.2).
* More unstuffed bytes than ``max_bytes`` → ``BodyError.TOO_BIG`` (552 5.3.4).

A bad message is *not* cut short: the decoder keeps reading to the real end of
the data (so the next command is found where the client thinks it is), emits no
more body bytes, and the server replies with the error then.  The first error
found is the one reported.

Chunk boundaries: the DATA decoder holds back at most two bytes (a trailing
``"\\r"`` or a ``"."``/``".\\r"`` at the start of a line), so a CRLF pair, a
stuffed dot and the terminator are recognised wherever the network splits them.
"""

from __future__ import annotations

import enum
import re
from typing import Final

# RFC 5321 §4.5.3.1.6 text line limit, including CRLF.
MAX_LINE_BYTES: Final = 1000

_BARE_EOL = re.compile(rb"\r\n|\r|\n")
# A "\n" followed by 1000 non-LF bytes is a line of > 1000 octets incl. CRLF.
_LONG_LINE = re.compile(rb"\n[^\n]{%d}" % MAX_LINE_BYTES)
_TERMINATOR = b"\r\n.\r\n"


class BodyError(enum.Enum):
    """Why a message body is refused (the server maps each to a reply)."""

    BARE_LINE_ENDING = "bare CR or LF"
    NUL = "NUL byte"
    LINE_TOO_LONG = "line too long"
    TOO_BIG = "message too big"


# --- client side ------------------------------------------------------------


class DotStuffer:
    """Stream a stored (CRLF) body as DATA content; see module doc.

    ``feed(chunk)`` returns the stuffed bytes for ``chunk`` (a trailing CR is held
    back until the next chunk tells whether it starts a CRLF); ``finish()`` returns
    the rest: a CRLF if the body did not end with one, then ``.<CRLF>``.
    """

    __slots__ = ("_at_line_start", "_pending_cr")

    def __init__(self) -> None:
        self._at_line_start = True
        self._pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        n_lf = chunk.count(b"\n")
        if chunk.count(b"\r") != n_lf or chunk.count(b"\r\n") != n_lf:
            chunk = _BARE_EOL.sub(b"\r\n", chunk)
        out = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and out[:1] == b".":
            out = b"." + out
        self._at_line_start = chunk.endswith(b"\n")
        return out

    def finish(self) -> bytes:
        tail = b""
        if self._pending_cr:  # a bare CR at the very end becomes a line end
            tail = b"\r\n"
            self._pending_cr = False
            self._at_line_start = True
        if not self._at_line_start:
            tail += b"\r\n"
        self._at_line_start = True
        return tail + b".\r\n"


def dot_stuff(body: bytes) -> bytes:
    """The whole DATA content (stuffed body and terminator) for ``body``."""
    s = DotStuffer()
    return s.feed(body) + s.finish()


# --- server side ------------------------------------------------------------


class _Checker:
    """Content rules shared by DATA and BDAT; fed regions never split a CRLF pair."""

    __slots__ = ("error", "line_bytes", "max_bytes", "size")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0  # body bytes accepted (unstuffed)
        self.line_bytes = 0  # length of the current, unfinished line
        self.error: BodyError | None = None

    def check(self, region: bytes) -> None:
        """Validate raw wire bytes (before unstuffing); sets ``error`` on the first fault."""
        if self.error is not None or not region:
            return
        n_lf = region.count(b"\n")
        if region.count(b"\r") != n_lf or region.count(b"\r\n") != n_lf:
            self.error = BodyError.BARE_LINE_ENDING
            return
        if b"\0" in region:
            self.error = BodyError.NUL
            return
        if n_lf == 0:
            self.line_bytes += len(region)
            if self.line_bytes > MAX_LINE_BYTES:
                self.error = BodyError.LINE_TOO_LONG
            return
        first = region.find(b"\n")
        last = region.rfind(b"\n")
        if (
            self.line_bytes + first + 1 > MAX_LINE_BYTES
            or (last - first > MAX_LINE_BYTES and _LONG_LINE.search(region, first, last))
            or len(region) - last - 1 > MAX_LINE_BYTES
        ):
            self.error = BodyError.LINE_TOO_LONG
            return
        self.line_bytes = len(region) - last - 1

    def count(self, body: bytes) -> bool:
        """Account accepted body bytes; False (and TOO_BIG) once over the limit."""
        if self.error is not None:
            return False
        self.size += len(body)
        if self.max_bytes and self.size > self.max_bytes:
            self.error = BodyError.TOO_BIG
            return False
        return True


class DataDecoder:
    """Server-side DATA reader; see module doc.

    ``feed(chunk)`` → ``(body, done, leftover)``: ``body`` is unstuffed content to
    store (empty once the message is bad), ``done`` says the terminator was seen,
    and ``leftover`` holds the bytes after it (pipelined commands).  After
    ``done``, check :attr:`error` before committing.
    """

    __slots__ = ("_at_line_start", "_carry", "_checker", "done")

    def __init__(self, max_bytes: int = 0) -> None:
        self._checker = _Checker(max_bytes)
        self._carry = b""
        # DATA content starts a line: the DATA command itself ended with CRLF.
        self._at_line_start = True
        self.done = False

    @property
    def error(self) -> BodyError | None:
        return self._checker.error

    @property
    def size(self) -> int:
        """Unstuffed body bytes accepted so far."""
        return self._checker.size

    def feed(self, chunk: bytes) -> tuple[bytes, bool, bytes]:
        if self.done:
            return b"", True, chunk
        buf = self._carry + chunk if self._carry else chunk
        if self._at_line_start and buf[:3] == b".\r\n":
            region, cut, after = b"", 0, 3
        else:
            idx = buf.find(_TERMINATOR)
            if idx >= 0:
                cut = idx + 2  # the CRLF before "." belongs to the last line
                region, after = buf[:cut], idx + 5
            else:
                cut = self._hold_back(buf)
                region, after = buf[:cut], -1
        body = self._take(region)
        if after >= 0:
            self.done = True
            self._carry = b""
            return body, True, buf[after:]
        self._carry = buf[cut:]
        return body, False, b""

    def _hold_back(self, buf: bytes) -> int:
        """Where to cut so no CRLF, stuffed dot or terminator straddles chunks."""
        n = len(buf)
        cut = n
        if buf.endswith(b"\r"):
            cut = n - 1
        if cut > 0 and buf[cut - 1] == 0x2E:  # "." possibly alone at a line start
            if cut >= 3 and buf[cut - 3 : cut - 1] == b"\r\n":
                cut -= 1
            elif cut == 1 and self._at_line_start:
                cut = 0
        return cut

    def _take(self, region: bytes) -> bytes:
        checker = self._checker
        if not region:
            return b""
        checker.check(region)
        at_start = self._at_line_start
        # only a real CRLF starts a line: "<LF>." must never look like a terminator
        self._at_line_start = region.endswith(b"\r\n")
        if checker.error is not None:
            return b""
        body = region.replace(b"\r\n.", b"\r\n")
        if at_start and body[:1] == b".":
            body = body[1:]
        return body if checker.count(body) else b""


class BdatDecoder:
    """Server-side reader for the chunks of one BDAT transaction (RFC 3030).

    RFC 3030 §2: "The BDAT verb takes two arguments.  The first argument indicates
    the length, in octets, of the binary data chunk."  Call :meth:`start_chunk`
    for each BDAT command, then ``feed`` → ``(body, chunk_done, leftover)``.  The
    content rules are those of DATA (we do not offer BINARYMIME); a CR at the end
    of one chunk may pair with an LF at the start of the next.
    """

    __slots__ = ("_checker", "_last", "_pending_cr", "_remaining", "finished")

    def __init__(self, max_bytes: int = 0) -> None:
        self._checker = _Checker(max_bytes)
        self._remaining = 0
        self._last = False
        self._pending_cr = False
        self.finished = False  # the LAST chunk has been read completely

    @property
    def error(self) -> BodyError | None:
        return self._checker.error

    @property
    def size(self) -> int:
        return self._checker.size

    @property
    def remaining(self) -> int:
        """Bytes still expected in the current chunk."""
        return self._remaining

    def start_chunk(self, size: int, last: bool) -> None:
        self._remaining = size
        self._last = last
        if size == 0 and last:
            self._finish()

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        take = min(self._remaining, len(data))
        part, leftover = (data, b"") if take == len(data) else (data[:take], data[take:])
        self._remaining -= take
        region = b"\r" + part if self._pending_cr else part
        self._pending_cr = region.endswith(b"\r")
        if self._pending_cr:
            region = region[:-1]
        body = b""
        if region:
            self._checker.check(region)
            if self._checker.error is None and self._checker.count(region):
                body = region
        done = self._remaining == 0
        if done and self._last:
            self._finish()
            # the held-back CR was a bare one
        return body, done, leftover

    def _finish(self) -> None:
        if self._pending_cr:
            self._pending_cr = False
            if self._checker.error is None:
                self._checker.error = BodyError.BARE_LINE_ENDING
        self.finished = True


# --- loop detection ------------------------------------------------------------

_RECEIVED: Final = b"\nreceived:"
_END_OF_HEADERS: Final = b"\n\r\n"


class ReceivedCounter:
    """Counts the ``Received:`` header fields of an incoming message (DESIGN §3, loops).

    Fed the unstuffed body chunk by chunk, it looks only at the header section (up
    to the first empty line) and keeps the last few bytes of each chunk so a field
    name or the empty line is recognised wherever the network split it.  A line
    starts after an LF (the body already passed the bare-LF check, or is refused
    anyway); header field names compare case-insensitively (RFC 5322 §1.2.2).
    Postfix's ``hopcount_limit`` counts the same way.
    """

    __slots__ = ("_tail", "count", "done")

    def __init__(self) -> None:
        self._tail = b"\n"  # the message starts a line
        self.count = 0
        self.done = False  # the empty line ending the header section was seen

    def feed(self, chunk: bytes) -> None:
        if self.done or not chunk:
            return
        data = self._tail + chunk
        end = data.find(_END_OF_HEADERS)
        if end >= 0:
            self.done = True
            data = data[: end + 1]
        data = data.lower()
        # the tail is shorter than the pattern: no match lies wholly inside it,
        # so none is counted twice
        self.count += data.count(_RECEIVED)
        self._tail = data[-(len(_RECEIVED) - 1) :]
