"""Between the acceptance pipeline's message and the module API: the read-only
:class:`~empath.modules.api.Message` a module sees, and its :class:`Changes` applied
through :class:`~empath.transport.acceptance.AcceptedMessage`'s editing methods (so
modules and every other end-of-data step change a message one way)."""

from __future__ import annotations

from empath.modules.api import AddHeader, ChangeHeader, Changes, DeleteHeader, Message
from empath.transport.acceptance import AcceptedMessage, HeaderField, split_message

__all__ = ["apply_changes", "field_value", "message_view"]


def field_value(f: HeaderField) -> str:
    """The value as the module API gives it: after the colon, leading blanks removed,
    folding kept, final CRLF removed (UTF-8, any octet kept by surrogateescape)."""
    raw = f.raw
    value = raw[raw.find(b":") + 1 :]
    if value.endswith(b"\r\n"):
        value = value[:-2]
    return value.lstrip(b" \t").decode("utf-8", "surrogateescape")


class _View(Message):
    """A :class:`Message` whose ``headers`` and ``body`` are built on first use (a hook
    that never looks at them costs nothing for them): from the received bytes while
    the message is untouched (``_raw``), else from its fields and body as they were
    when the view was made.  Equal to, and read like, a Message."""

    __slots__ = ("_fields", "_raw")
    _fields: tuple[HeaderField, ...]  # the message's fields when the view was made
    _raw: bytes | None  # or the untouched received bytes, split on first use

    def _parse(self) -> None:
        raw = self._raw
        if raw is not None:
            fields, body, _sep = split_message(raw)
            object.__setattr__(self, "_fields", tuple(fields))
            _FIELDS["body"].__set__(self, body)
            object.__setattr__(self, "_raw", None)

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        built: tuple[tuple[str, str], ...] | None = _HEADERS.__get__(self)
        if built is None:
            self._parse()
            built = tuple((f.name, field_value(f)) for f in self._fields)
            _HEADERS.__set__(self, built)
        return built

    @headers.setter  # dataclasses.replace() builds through Message.__init__
    def headers(self, value: tuple[tuple[str, str], ...]) -> None:
        _HEADERS.__set__(self, value)
        object.__setattr__(self, "_raw", None)

    @property
    def body(self) -> bytes:
        self._parse()
        body: bytes = _FIELDS["body"].__get__(self)
        return body

    @body.setter
    def body(self, value: bytes) -> None:
        _FIELDS["body"].__set__(self, value)
        object.__setattr__(self, "_raw", None)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        mine = (self.sender, self.recipients, self.headers, self.body)
        return mine == (other.sender, other.recipients, other.headers, other.body)

    __hash__ = Message.__hash__

    def __repr__(self) -> str:
        return "Message" + Message.__repr__(self).removeprefix("_View")


_HEADERS = Message.__dict__["headers"]  # the slot behind Message.headers
_FIELDS = {name: Message.__dict__[name] for name in ("sender", "recipients", "body")}


def message_view(message: AcceptedMessage) -> Message:
    """The module API's read-only view of ``message`` as it is now."""
    view = object.__new__(_View)
    _FIELDS["sender"].__set__(view, message.sender)
    _FIELDS["recipients"].__set__(view, tuple(message.recipients))
    _HEADERS.__set__(view, None)
    raw = message.raw
    object.__setattr__(view, "_raw", raw)
    if raw is None:
        _FIELDS["body"].__set__(view, message.body)
        object.__setattr__(view, "_fields", tuple(message.headers))
    return view


def apply_changes(message: AcceptedMessage, changes: Changes) -> None:
    """Carry out ``changes`` in order (ValueError for a field or body that would
    corrupt the message; the caller treats that as the module's error)."""
    for change in changes.headers:
        if isinstance(change, AddHeader):
            message.add_header(change.name, change.value, change.index)
        elif isinstance(change, ChangeHeader):
            # libmilter: "if hdridx is greater than the number of times headerf
            # appears, a new copy of headerf will be added"
            if not message.change_header(change.name, change.occurrence, change.value):
                message.add_header(change.name, change.value)
        elif isinstance(change, DeleteHeader):
            if change.occurrence == 0:
                message.delete_header(change.name)
            else:
                message.change_header(change.name, change.occurrence, None)
    if changes.body is not None:
        message.replace_body(changes.body)
    if changes.delete_recipients:
        gone = {r.lower() for r in changes.delete_recipients}
        message.recipients = [r for r in message.recipients if r.lower() not in gone]
    for r in changes.add_recipients:
        if r and r.lower() not in {x.lower() for x in message.recipients}:
            message.recipients.append(r)
    if changes.sender is not None:
        message.sender = changes.sender
