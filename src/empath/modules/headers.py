"""A message's header block as a list of fields, and the edits modules make to it.

Pure (no I/O).  The block is split at the first empty line (RFC 5322 §2.1); a line
starting with white space continues the field before it (folding).  A field keeps
its exact bytes (``raw``) so a message nobody changed is spooled byte for byte as it
came; an added or changed field is written ``Name: value`` CRLF.  Text is decoded as
UTF-8 with ``surrogateescape``, so any octet survives the round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

from empath.modules.api import AddHeader, ChangeHeader, Changes, DeleteHeader, HeaderChange

__all__ = ["Field", "apply_changes", "apply_header_changes", "join_message", "split_message"]


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    value: str  # after the colon, leading white space removed, folding kept, no final CRLF
    raw: bytes  # the field as written, final CRLF included

    @classmethod
    def new(cls, name: str, value: str) -> Field:
        return cls(name, value, f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def split_message(message: bytes) -> tuple[list[Field], bytes]:
    """``message`` (CRLF lines) → its header fields and its body (after the empty line).

    A line that is neither a field nor a continuation ends the header block there
    (it and what follows are the body), as a parser must not drop content."""
    fields: list[Field] = []
    pos = 0
    end = len(message)
    while pos < end:
        nl = message.find(b"\n", pos)
        line_end = end if nl < 0 else nl + 1
        line = message[pos:line_end]
        if line in (b"\r\n", b"\n"):
            return fields, message[line_end:]
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            raw = last.raw + line
            fields[-1] = Field(last.name, _value_of(raw, len(last.name)), raw)
        else:
            colon = line.find(b":")
            if colon <= 0 or b" " in line[:colon].rstrip() or b"\t" in line[:colon]:
                return fields, message[pos:]
            name = _decode(line[:colon].rstrip())
            fields.append(Field(name, _value_of(line, colon), line))
        pos = line_end
    return fields, b""


def _value_of(raw: bytes, colon: int) -> str:
    """The value of a field whose name ends at ``colon`` (the ':' may follow spaces)."""
    at = raw.find(b":", colon)
    value = raw[at + 1 :]
    if value.endswith(b"\r\n"):
        value = value[:-2]
    elif value.endswith(b"\n"):
        value = value[:-1]
    return _decode(value.lstrip(b" \t"))


def join_message(fields: list[Field], body: bytes) -> bytes:
    return b"".join(f.raw for f in fields) + b"\r\n" + body


def _nth(fields: list[Field], name: str, occurrence: int) -> int | None:
    low = name.lower()
    seen = 0
    for i, f in enumerate(fields):
        if f.name.lower() == low:
            seen += 1
            if seen == occurrence:
                return i
    return None


def apply_header_changes(fields: list[Field], changes: tuple[HeaderChange, ...]) -> list[Field]:
    """The fields after ``changes``, applied in order (a new list)."""
    out = list(fields)
    for change in changes:
        if isinstance(change, AddHeader):
            new = Field.new(change.name, change.value)
            if change.index is None:
                out.append(new)
            else:
                out.insert(max(0, min(change.index, len(out))), new)
        elif isinstance(change, ChangeHeader):
            at = _nth(out, change.name, change.occurrence)
            if at is None:
                out.append(Field.new(change.name, change.value))
            else:
                out[at] = Field.new(out[at].name, change.value)
        elif isinstance(change, DeleteHeader):
            if change.occurrence == 0:
                low = change.name.lower()
                out = [f for f in out if f.name.lower() != low]
            else:
                at = _nth(out, change.name, change.occurrence)
                if at is not None:
                    del out[at]
    return out


def apply_changes(
    message: bytes, recipients: tuple[str, ...], changes: list[Changes]
) -> tuple[bytes, tuple[str, ...]]:
    """The message and recipients after every module's :class:`Changes`, in order."""
    if not any(changes):
        return message, recipients
    fields, body = split_message(message)
    rcpts = list(recipients)
    for change in changes:
        if change.headers:
            fields = apply_header_changes(fields, change.headers)
        if change.body is not None:
            body = change.body
        for r in change.delete_recipients:
            low = r.strip("<>").lower()
            rcpts = [x for x in rcpts if x.lower() != low]
        for r in change.add_recipients:
            bare = r.strip("<>")
            if bare and bare.lower() not in (x.lower() for x in rcpts):
                rcpts.append(bare)
    return join_message(fields, body), tuple(rcpts)
