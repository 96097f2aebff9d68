"""The end-of-data acceptance pipeline: steps that see a whole message before it is spooled.

Theory of operation
-------------------
Without any step configured a session streams the body into the spool as it arrives
and never holds a whole message (session.py's fast path; nothing here runs, not
even an attribute lookup per body chunk).  When a listener has an
:class:`AcceptancePipeline`, the session opens a :class:`HeldBody` instead: the body
chunks are kept in memory (bounded by the listener's ``size`` limit, which the SMTP
state machine enforces before we see a byte past it).  At end of DATA/BDAT the
session builds an :class:`AcceptedMessage` and runs the pipeline on it, as one task
per message, while the client waits for its reply (the state machine is in its
WAITING phase; pipelined input stays buffered there).

The pipeline runs its steps in stage order (:class:`Stage`), each awaited in turn:

1. ``MODULES``    - Python modules and milters (DESIGN §14): may reject or tempfail,
   add/change/delete headers, change the sender, add/delete recipients, replace the body;
2. ``SUBMISSION`` - the header ``From:`` ownership check of authenticated
   submission (DESIGN §13, ``550 5.7.1``);
3. ``DKIM``       - signing (DESIGN §12): signs the final bytes; a failure is ``451 4.3.0``.

Then the session writes the final bytes into the spool body and commits as usual:
``250`` only once durable.

Step interface (the contract for every feature that plugs in)
--------------------------------------------------------------
A step is any object with a ``name`` (for logs), a ``stage`` and ::

    async def run(self, message: AcceptedMessage) -> Reply | None

* return ``None`` to carry on with the next step;
* return a 4xx or 5xx :class:`~empath.smtp.replies.Reply` to refuse the message: the
  pipeline stops, the client gets that reply and nothing is spooled.  (A 2xx/3xx reply
  is a bug in the step and answered ``451 4.3.0``; a step that wants "accept now"
  semantics among its own sub-steps, like a module chain, handles that itself: the
  later stages still run.)
* call ``message.discard(reason)`` and return ``None`` to accept and drop the
  message (the milter ``discard`` action): the client gets ``250``, nothing is spooled;
* raising an exception is contained: logged, answered ``451 4.3.0``, nothing spooled.
  Steps bound their own waits (a milter's timeout); the pipeline as a whole is cut
  off after the listener's ``data_termination_secs`` (``451 4.3.0``).
* optionally, ``immediate = True`` and a plain ``def run_now(self, message)`` doing
  what ``run`` does without ever suspending (e.g. modules that never await): when
  every step of a pipeline is immediate, the session runs it in place
  (:meth:`AcceptancePipeline.run_now`: no task, no timer, no event-loop turn).
* optionally, for the last step only, a plain ``def run_soon(self, message)`` that
  answers as ``run_now`` does, or returns :class:`Later` (a future, and what turns it
  into the step's answer once done) when it has to wait for something outside the
  loop (DKIM: the key process).  When the other steps are immediate the session runs
  the pipeline this way (:meth:`AcceptancePipeline.run_soon`): no task, no coroutine
  chain, no pipeline timer, and the session carries on from the future's done
  callback.  Such a step must bound its own wait: the future has to finish (DKIM's
  key process refuses what it has not answered in 30 s).

A step changes the message only through :class:`AcceptedMessage`:

* ``headers``: the header fields, in order, each a :class:`HeaderField` holding the
  field's raw bytes (name, colon, value with its folding, final CRLF), as received.
  ``header(name)`` / ``header_values(name)`` read them; ``add_header(name, value,
  index=None)`` appends (milter ``addheader``) or inserts before position ``index``
  (``insheader``, 0 = the top, above our ``Received:``); ``change_header(name,
  occurrence, value)`` replaces the n-th (1-based) field of that name, and with
  ``value=None`` deletes it (milter ``chgheader`` semantics); ``delete_header(name)``
  deletes all of them.  Values are ``str`` (UTF-8 on the wire; fold long values
  yourself with ``"\\r\\n\\t"``).
* ``body``: the bytes after the header block (CRLF line ends, dot-unstuffed);
  ``replace_body(data)`` sets it (CRLF is enforced: a bare CR or LF is refused with
  ``ValueError``, DESIGN §3 never emits them downstream).
* ``sender`` and ``recipients`` (a list): the envelope; change them in place.  A
  message left with no recipients is discarded (as by ``discard``).
* ``facts``: read-only :class:`SessionFacts` (peer address, HELO, ``trusted``,
  ``auth_user``, TLS, listener) and ``id``, the ULID it will be spooled under.
* ``log_fields``: extra fields for the ``Message received`` log line
  (DKIM puts ``dkim_domain`` and ``dkim_selectors`` there).
* ``to_bytes()``: the message as it would be spooled now (DKIM signs these bytes).

Step factories are wired in :func:`empath.transport.steps.build_acceptance` (one place,
config → steps per listener); SIGHUP/``config reload`` rebuilds them and sessions
pick up the new pipeline for their next message.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from empath.logs import get_logger
from empath.smtp.replies import Reply

if TYPE_CHECKING:
    from empath.spool.store import BodyWriter

log = get_logger("smtp", __name__)

R_STEP_ERROR: Final = Reply.of(451, "4.3.0", "Local error in processing, try again later")


class Stage(enum.IntEnum):
    """Where a step runs in the pipeline (lower first; equal stages keep config order)."""

    MODULES = 10
    SUBMISSION = 20
    DKIM = 30


@dataclass(slots=True)
class SessionFacts:
    """What the session knows about the client that sent this message.  Read-only by
    contract; not ``frozen`` because mypyc builds a frozen dataclass through an
    interpreted ``__init__`` (object.__setattr__ per field: ~16k instructions, once per
    message with steps)."""

    peer_ip: str
    peer: str  # "ip:port" as logged
    helo: str
    trusted: bool  # the client is in relay.trusted_networks
    auth_user: str | None  # the authenticated user (DESIGN §13), None without AUTH
    tls: bool
    listener: str
    esmtp: bool = True
    smtputf8: bool = False
    # the modules' per-connection state (empath.modules.api.Session), when modules run
    module_session: Any = field(default=None, compare=False)


@dataclass(slots=True)
class HeaderField:
    """One header field's raw bytes: ``Name: value`` with its folding and final CRLF."""

    raw: bytes

    @property
    def name(self) -> str:
        colon = self.raw.find(b":")
        return self.raw[: max(colon, 0)].decode("utf-8", "replace").strip()

    @property
    def value(self) -> str:
        """The unfolded value, leading blank and final CRLF removed."""
        colon = self.raw.find(b":")
        text = self.raw[colon + 1 :].decode("utf-8", "replace")
        return text.replace("\r\n", "").strip(" \t")

    @classmethod
    def of(cls, name: str, value: str) -> HeaderField:
        check_header(name, value)
        return cls(f"{name}: {value}\r\n".encode())


def check_header(name: str, value: str) -> None:
    """Refuse a field that would corrupt the message (ValueError)."""
    if not name or any(c in name for c in ": \t\r\n") or not name.isprintable():
        raise ValueError(f"invalid header field name: {name!r}")
    rest = value.replace("\r\n ", "").replace("\r\n\t", "")
    if "\r" in rest or "\n" in rest:
        raise ValueError(f"header {name}: bare CR/LF or a line that is not folded")


def split_message(data: bytes) -> tuple[list[HeaderField], bytes, bool]:
    """Header fields, body and whether a blank separator line was present.

    The header block ends at the first empty line; a line that is neither a field
    (``name:``) nor a continuation (starts with SP/HT) also ends it and starts the
    body (no separator then: ``to_bytes`` adds one, as Postfix's cleanup does)."""
    fields: list[HeaderField] = []
    pos = 0
    n = len(data)
    while pos < n:
        end = data.find(b"\r\n", pos)
        end = n if end < 0 else end + 2
        line = data[pos:end]
        if line in (b"\r\n", b""):
            return fields, data[end:], True
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].raw += line
        elif _starts_field(line):
            fields.append(HeaderField(line))
        else:
            return fields, data[pos:], False
        pos = end
    return fields, b"", False


def _starts_field(line: bytes) -> bool:
    """``line`` (with its line end) opens a header field: ``name:`` with a name and
    a final CRLF."""
    colon = line.find(b":")
    return colon > 0 and b" " not in line[:colon].strip() and line.endswith(b"\r\n")


class AcceptedMessage:
    """The complete message as the pipeline's steps see and change it (module doc).

    The received bytes are split into header fields and body only when a step first
    reads or changes ``headers`` or ``body`` (a step that never does, e.g. a module
    hook that only looks at the envelope, costs no parse).  Until then :meth:`to_bytes`
    is the received bytes themselves, exactly what a listener without steps spools
    (for an odd message whose header block runs into the body without an empty line,
    the separator that reassembling adds comes only once a step has split it)."""

    __slots__ = (
        "_body",
        "_headers",
        "_raw",
        "_separator",
        "discarded",
        "facts",
        "id",
        "log_fields",
        "recipients",
        "sender",
    )

    def __init__(
        self,
        msg_id: str,
        data: bytes,
        *,
        sender: str,
        recipients: Sequence[str],
        facts: SessionFacts,
    ) -> None:
        self.id = msg_id
        self._raw: bytes | None = data  # None once split (headers/body are the truth)
        self._headers: list[HeaderField] = []
        self._body = b""
        self._separator = False
        self.sender = sender
        self.recipients = list(recipients)
        self.facts = facts
        self.discarded: str | None = None
        self.log_fields: dict[str, object] = {}

    def _split(self) -> None:
        raw = self._raw
        if raw is not None:
            self._raw = None
            self._headers, self._body, self._separator = split_message(raw)

    @property
    def raw(self) -> bytes | None:
        """The received bytes while nothing has read or changed ``headers``/``body``
        (then a read-only view may split them itself), else None."""
        return self._raw

    @property
    def headers(self) -> list[HeaderField]:
        self._split()
        return self._headers

    @headers.setter
    def headers(self, value: list[HeaderField]) -> None:
        self._split()
        self._headers = value

    @property
    def body(self) -> bytes:
        self._split()
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        self._split()
        self._body = value

    # -- headers -------------------------------------------------------------

    def header_values(self, name: str) -> list[str]:
        """Unfolded values of every field called ``name`` (case-insensitive), in order."""
        prefix = name.lower().encode() + b":"
        n = len(prefix)
        key = name.lower()
        stem = prefix[:-1]
        return [
            f.value
            for f in self.headers
            if f.raw[:n].lower() == prefix  # the common spelling, without decoding
            or (  # "Name :" (obsolete): a field line starts with its name, never a blank
                f.raw[: n - 1].lower() == stem
                and f.raw[n - 1 : n] != b":"
                and f.name.lower() == key
            )
        ]

    def header(self, name: str) -> str | None:
        """The first ``name`` field's unfolded value, or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def add_header(self, name: str, value: str, index: int | None = None) -> None:
        hf = HeaderField.of(name, value)
        if index is None:
            self.headers.append(hf)
        else:
            self.headers.insert(max(0, index), hf)

    def change_header(self, name: str, occurrence: int, value: str | None) -> bool:
        """Replace (or with None delete) the ``occurrence``-th (1-based) ``name`` field;
        False when there is no such field (milter semantics: then nothing changes)."""
        key = name.lower()
        seen = 0
        for i, f in enumerate(self.headers):
            if f.name.lower() == key:
                seen += 1
                if seen == occurrence:
                    if value is None:
                        del self.headers[i]
                    else:
                        self.headers[i] = HeaderField.of(f.name, value)
                    return True
        return False

    def prepend_fields(self, data: bytes) -> None:
        """Put complete header fields (``Name: value\\r\\n`` each) on top of the header;
        a message nobody has split stays unsplit (DKIM's signatures, DESIGN §12)."""
        raw = self._raw
        if raw is not None:
            self._raw = data + raw
        else:
            self._headers[:0] = split_message(data)[0]

    def delete_header(self, name: str) -> int:
        """Delete every ``name`` field; how many there were."""
        key = name.lower()
        before = len(self.headers)
        self.headers = [f for f in self.headers if f.name.lower() != key]
        return before - len(self.headers)

    # -- body, envelope ------------------------------------------------------

    def replace_body(self, data: bytes) -> None:
        if data.replace(b"\r\n", b"").count(b"\r") or data.replace(b"\r\n", b"").count(b"\n"):
            raise ValueError("replacement body has a bare CR or LF")
        self.body = data

    def discard(self, reason: str) -> None:
        self.discarded = reason or "discarded"

    def to_bytes(self) -> bytes:
        """The message as it would be spooled now."""
        raw = self._raw
        if raw is not None:
            return raw  # untouched by every step: spooled as received, as without steps
        self._split()
        head = b"".join(f.raw for f in self._headers)
        if self._separator or self._body:
            return head + b"\r\n" + self._body
        return head


class AcceptanceStep(Protocol):
    """One step of the pipeline (module doc: the contract)."""

    @property
    def name(self) -> str: ...

    @property
    def stage(self) -> Stage: ...

    async def run(self, message: AcceptedMessage) -> Reply | None: ...


class Later:
    """A step's answer still to come (``run_soon``, module doc): once ``future`` is
    done, ``finish(future)`` gives the answer (``None`` or a refusal) and may raise.
    Read-only by contract (a plain class: one per message, and mypyc builds a frozen
    dataclass through an interpreted ``__init__``)."""

    __slots__ = ("finish", "future")

    def __init__(
        self, future: asyncio.Future[Any], finish: Callable[[asyncio.Future[Any]], Reply | None]
    ) -> None:
        self.future = future
        self.finish = finish


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the pipeline decided: spool the message, or answer ``reply`` without
    spooling (``reply`` is ``250`` for a discarded message)."""

    reply: Reply | None = None
    discarded: str | None = None

    @property
    def spool(self) -> bool:
        return self.reply is None


@dataclass(frozen=True, slots=True)
class AcceptancePipeline:
    """The ordered steps of one listener; immutable (a reload builds a new one)."""

    steps: tuple[AcceptanceStep, ...]
    timeout_s: float = 600.0
    _ordered: tuple[AcceptanceStep, ...] = field(init=False, repr=False, compare=False)
    # every step offers run_now (module doc): the session may call run_now instead
    immediate: bool = field(init=False, repr=False, compare=False)
    # every step but the last offers run_now, the last run_now or run_soon: run_soon
    soon: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.steps, key=lambda s: int(s.stage)))
        object.__setattr__(self, "_ordered", ordered)
        now = all(getattr(s, "immediate", False) for s in ordered)
        object.__setattr__(self, "immediate", now)
        soon = bool(ordered) and all(getattr(s, "immediate", False) for s in ordered[:-1])
        last = ordered[-1] if ordered else None
        soon = soon and (getattr(last, "immediate", False) or hasattr(last, "run_soon"))
        object.__setattr__(self, "soon", soon)

    @property
    def ordered(self) -> tuple[AcceptanceStep, ...]:
        return self._ordered

    async def run(self, message: AcceptedMessage) -> Verdict:
        """Run every step in stage order (module doc); never raises."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._run(message)
        except TimeoutError:
            log.error("Acceptance steps timed out, message refused", message_id=message.id,
                      peer=message.facts.peer, smtp_code="451")  # fmt: skip
            return Verdict(R_STEP_ERROR)

    async def _run(self, message: AcceptedMessage) -> Verdict:
        for step in self._ordered:
            try:
                reply = await step.run(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return _failed(step, message, exc)
            verdict = _judged(step, message, reply)
            if verdict is not None:
                return verdict
        return Verdict()

    def run_now(self, message: AcceptedMessage) -> Verdict:
        """:meth:`run` here and now, for a pipeline whose every step is ``immediate``
        (module doc); never raises.  No timer: nothing in it can wait."""
        return _in_place(self._ordered, message) or _SPOOL

    def run_soon(self, message: AcceptedMessage) -> Verdict | Later:
        """:meth:`run` for a pipeline that is ``soon`` (module doc): the verdict now, or
        the last step's :class:`Later`, for :meth:`settle` once its future is done.
        Never raises."""
        ordered = self._ordered
        last = ordered[-1]
        if getattr(last, "immediate", False):
            return self.run_now(message)
        verdict = _in_place(ordered[:-1], message)
        if verdict is not None:
            return verdict
        try:
            answer = cast(_SoonStep, last).run_soon(message)
        except Exception as exc:
            return _failed(last, message, exc)
        if isinstance(answer, Later):
            return answer
        return _judged(last, message, answer) or _SPOOL

    def settle(self, message: AcceptedMessage, later: Later) -> Verdict:
        """The verdict once ``later.future`` (from :meth:`run_soon`) is done; never raises."""
        last = self._ordered[-1]
        try:
            reply = later.finish(later.future)
        except Exception as exc:
            return _failed(last, message, exc)
        return _judged(last, message, reply) or _SPOOL


class _ImmediateStep(Protocol):
    def run_now(self, message: AcceptedMessage) -> Reply | None: ...


def _in_place(steps: Sequence[AcceptanceStep], message: AcceptedMessage) -> Verdict | None:
    """Immediate ``steps`` in turn: the first final verdict, or None (spool so far)."""
    for step in steps:
        try:
            reply = cast(_ImmediateStep, step).run_now(message)
        except Exception as exc:
            return _failed(step, message, exc)
        verdict = _judged(step, message, reply)
        if verdict is not None:
            return verdict
    return None


class _SoonStep(Protocol):
    def run_soon(self, message: AcceptedMessage) -> Reply | Later | None: ...


def _failed(step: AcceptanceStep, message: AcceptedMessage, exc: Exception) -> Verdict:
    log.exception("Acceptance step failed, message refused", step=step.name,
                  message_id=message.id, peer=message.facts.peer,
                  error=repr(exc), smtp_code="451")  # fmt: skip
    return Verdict(R_STEP_ERROR)


def _judged(step: AcceptanceStep, message: AcceptedMessage, reply: Reply | None) -> Verdict | None:
    """What a step's answer means for the message: a final verdict, or None (go on)."""
    if reply is not None:
        if reply.code < 400:
            log.error("Acceptance step answered a non-error reply; refusing",
                      step=step.name, message_id=message.id, code=reply.code)  # fmt: skip
            return Verdict(R_STEP_ERROR)
        log.info("Message refused by acceptance step", step=step.name,
                 message_id=message.id, peer=message.facts.peer,
                 smtp_code=str(reply.code), reply=reply.text)  # fmt: skip
        return Verdict(reply)
    if message.discarded is None and not message.recipients:
        message.discard(f"{step.name} removed every recipient")
    if message.discarded is not None:
        log.info("Message discarded by acceptance step", step=step.name,
                 message_id=message.id, reason=message.discarded)  # fmt: skip
        return Verdict(R_DISCARDED, message.discarded)
    return None


R_DISCARDED: Final = Reply.of(250, "2.0.0", "Ok: discarded")
_SPOOL: Final = Verdict()


class HeldBody:
    """A body kept in memory for the pipeline; stands in for the spool's BodyWriter
    in the session (same ``write``/``abort``/``id``/``size``), wrapping the real one
    that receives the final bytes after the steps ran."""

    __slots__ = ("_chunks", "_size", "pipeline", "writer")

    def __init__(self, writer: BodyWriter, pipeline: AcceptancePipeline) -> None:
        self.writer = writer
        self.pipeline = pipeline
        self._chunks: list[bytes] = []
        self._size = 0

    @property
    def id(self) -> str:
        return self.writer.id

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)

    def abort(self) -> None:
        self._chunks.clear()
        self.writer.abort()

    def take(self) -> bytes:
        """Everything written so far (the buffer is released)."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data
