"""Spool records: what a message and its delivery state look like, in memory and on disk.

A message is accepted once, with an immutable :class:`Envelope` and body.  Its
delivery state is a tuple of :class:`UnitState`, one per recipient domain (the
unit of delivery work).  State changes are written as whole-message snapshots
(:class:`MessageState`), never as deltas, so the newest snapshot of a message is
all recovery needs.

Everything here is a slotted dataclass with ``to_json``/``from_json`` helpers producing
plain JSON-able dicts (versioned on disk by the store). Frozen, but for the five made
for every message (``Envelope``, ``RecipientState``, ``Attempt``, ``UnitState``,
``MessageState``): a frozen dataclass sets each field through ``object.__setattr__`` (a
frozen ``UnitState`` took 1.5 µs; seven fields frozen 0.93 µs against 0.19 plain), and a
relayed message makes eight of them (issue 20). ``unsafe_hash`` keeps the hash a frozen
one had. Nothing changes one once made (the index shares them): treat them as read-only
and make a new one (``dataclasses.replace``) for a new state.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from empath.smtp.parsing import domain_of


class UnitStatus(enum.StrEnum):
    """Status of one (message, domain) delivery unit.  See DESIGN §4."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    RETRY = "retry"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    # put on hold by the operator (`empathctl queue hold`): never attempted, not pending,
    # kept until `queue release` (then due at once)
    HELD = "held"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({UnitStatus.DELIVERED, UnitStatus.FAILED, UnitStatus.EXPIRED})


class RcptStatus(enum.StrEnum):
    """Status of one recipient inside a unit."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see the module doc
class Envelope:
    """The SMTP envelope and facts about the session that handed us the message."""

    sender: str  # "" is the null sender <>
    recipients: tuple[str, ...]
    received_at: float  # wall-clock seconds since epoch at 250
    peer: str = ""  # client address "ip:port"
    helo: str = ""
    smtputf8: bool = False  # message needs SMTPUTF8 downstream
    body_8bit: bool = False  # BODY=8BITMIME was declared
    size: int = 0  # body size in bytes as stored (with our Received: header)
    is_dsn: bool = False  # a delivery status notification we generated
    listener: str = ""  # listener socket that received it
    # DESIGN §13: the SMTP AUTH user that submitted it.  Records written before it
    # existed decode with None.  (The spool's encoder writes dataclasses as they are,
    # so an unset one is stored as null, a few bytes, rather than left out.)
    auth_user: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "sender": self.sender,
            "recipients": list(self.recipients),
            "received_at": self.received_at,
            "peer": self.peer,
            "helo": self.helo,
            "smtputf8": self.smtputf8,
            "body_8bit": self.body_8bit,
            "size": self.size,
            "is_dsn": self.is_dsn,
            "listener": self.listener,
            "auth_user": self.auth_user,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        return cls(
            sender=str(data["sender"]),
            recipients=tuple(str(r) for r in data["recipients"]),
            received_at=float(data["received_at"]),
            peer=str(data.get("peer", "")),
            helo=str(data.get("helo", "")),
            smtputf8=bool(data.get("smtputf8", False)),
            body_8bit=bool(data.get("body_8bit", False)),
            size=int(data.get("size", 0)),
            is_dsn=bool(data.get("is_dsn", False)),
            listener=str(data.get("listener", "")),
            auth_user=None if data.get("auth_user") is None else str(data["auth_user"]),
        )


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see the module doc
class RecipientState:
    address: str
    status: RcptStatus = RcptStatus.PENDING
    code: int | None = None  # last remote reply code for this recipient
    text: str = ""  # last remote reply text / error

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "status": self.status.value,
            "code": self.code,
            "text": self.text,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecipientState:
        code = data.get("code")
        return cls(
            address=str(data["address"]),
            status=RcptStatus(data.get("status", "pending")),
            code=None if code is None else int(code),
            text=str(data.get("text", "")),
        )


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see the module doc
class Attempt:
    """One delivery attempt of a unit, for `queue view` and DSNs."""

    at: float  # wall clock
    mx: str  # "host[:port]" or "" when DNS failed
    code: int | None  # reply code, None for network/DNS errors
    text: str  # reply text or error description

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "mx": self.mx, "code": self.code, "text": self.text}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attempt:
        code = data.get("code")
        return cls(
            at=float(data["at"]),
            mx=str(data.get("mx", "")),
            code=None if code is None else int(code),
            text=str(data.get("text", "")),
        )


MAX_HISTORY = 20  # attempts kept per unit (the newest)


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see the module doc
class UnitState:
    """Delivery state of one (message, recipient domain) unit."""

    domain: str  # lower-case ASCII/IDNA domain
    recipients: tuple[RecipientState, ...]
    status: UnitStatus = UnitStatus.PENDING
    attempts: int = 0
    next_attempt_at: float = 0.0  # wall clock; 0 = now
    history: tuple[Attempt, ...] = ()
    delay_warned: bool = False  # the "delayed" DSN went out
    last_error: str = ""
    finished_at: float = 0.0  # wall clock when it became terminal
    # wall clock of the last `queue retry` that reopened it (failed/expired): its
    # expiry window starts here instead of at acceptance; 0 = never reopened
    reopened_at: float = 0.0
    # wall clock of the last `queue release` from hold: the first attempt after it is
    # made even when the deadline passed while the unit was held (postsuper -H); 0 = never
    released_at: float = 0.0

    def expiry_base(self, received_at: float) -> float:
        """Where this unit's ``message_expiration_secs`` window starts."""
        return max(received_at, self.reopened_at)

    def with_attempt(self, attempt: Attempt) -> UnitState:
        return replace(self, history=(*self.history, attempt)[-MAX_HISTORY:])

    @property
    def rcpt_count(self) -> int:
        return len(self.recipients)

    def pending_recipients(self) -> tuple[str, ...]:
        return tuple(r.address for r in self.recipients if r.status is RcptStatus.PENDING)

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "recipients": [r.to_json() for r in self.recipients],
            "status": self.status.value,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "history": [a.to_json() for a in self.history],
            "delay_warned": self.delay_warned,
            "last_error": self.last_error,
            "finished_at": self.finished_at,
            "reopened_at": self.reopened_at,
            "released_at": self.released_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UnitState:
        return cls(
            domain=str(data["domain"]),
            recipients=tuple(RecipientState.from_json(r) for r in data["recipients"]),
            status=UnitStatus(data.get("status", "pending")),
            attempts=int(data.get("attempts", 0)),
            next_attempt_at=float(data.get("next_attempt_at", 0.0)),
            history=tuple(Attempt.from_json(a) for a in data.get("history", ())),
            delay_warned=bool(data.get("delay_warned", False)),
            last_error=str(data.get("last_error", "")),
            finished_at=float(data.get("finished_at", 0.0)),
            reopened_at=float(data.get("reopened_at", 0.0)),
            released_at=float(data.get("released_at", 0.0)),
        )


def initial_units(recipients: Iterable[str], now: float = 0.0) -> tuple[UnitState, ...]:
    """One pending unit per recipient domain, domains in first-seen order."""
    by_domain: dict[str, list[RecipientState]] = {}
    for rcpt in recipients:
        domain = domain_of(rcpt)
        same = by_domain.get(domain)
        if same is None:
            by_domain[domain] = [RecipientState(rcpt)]
        else:
            same.append(RecipientState(rcpt))
    pending = UnitStatus.PENDING  # (positional, no generator: this runs once per message)
    return tuple([UnitState(d, tuple(rs), pending, 0, now) for d, rs in by_domain.items()])


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see the module doc
class MessageState:
    """A live message as the spool knows it: id, envelope, where its body is, unit states."""

    id: str
    envelope: Envelope
    units: tuple[UnitState, ...]

    @property
    def finished(self) -> bool:
        return all(u.status.terminal for u in self.units)
