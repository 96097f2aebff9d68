"""Delivery events for modules (DESIGN §14): the API's view of a unit's outcome, and
the in-place hand-over used for hooks that never suspend.

A filter's ``on_delivery_event`` is fire-and-forget behind a bounded queue (a slow
module never holds up delivery; drops are counted).  For a hook that may await, the
host runs a consumer task on an ``asyncio.Queue``.  For one whose code never awaits
(most: a counter, a log line) an :class:`EventDrain` does the same job without a task
step and a future per event: events wait in a deque and one loop callback hands the
batch over, later, in the filter's own context.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Callable
from typing import Final

from empath.modules.api import DeliveryEvent, DeliveryKind
from empath.spool.model import MessageState, UnitState, UnitStatus

__all__ = ["DELIVERY_QUEUE_MAX", "EventDrain", "delivery_event"]

DELIVERY_QUEUE_MAX: Final = 1000  # events waiting per filter; more are dropped and counted


class EventDrain:
    """The bounded delivery-event queue of a filter whose ``on_delivery_event`` never
    suspends: events wait here (at most DELIVERY_QUEUE_MAX, the rest dropped and
    counted) and ``call`` gets them from one loop callback per batch, later, in
    ``context``: fire-and-forget as with a consumer task (module doc)."""

    __slots__ = ("_call", "_context", "_dropped", "_events", "_loop", "_scheduled")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
        call: Callable[[DeliveryEvent], object],
        dropped: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._context = context
        self._call = call  # runs the hook on one event (contains its failures)
        self._dropped = dropped  # counts one dropped event
        self._events: deque[DeliveryEvent] = deque()
        self._scheduled: asyncio.Handle | None = None

    def put(self, event: DeliveryEvent) -> None:
        events = self._events
        if len(events) >= DELIVERY_QUEUE_MAX:
            self._dropped()
            return
        events.append(event)
        if self._scheduled is None:
            self._scheduled = self._loop.call_soon(self._run, context=self._context)

    def _run(self) -> None:
        self._scheduled = None
        events = self._events
        call = self._call
        for _ in range(len(events)):  # what is queued now; later ones in the next batch
            call(events.popleft())

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        self._events.clear()


_EVENT_KIND: Final[dict[UnitStatus, DeliveryKind]] = {
    UnitStatus.DELIVERED: "delivered",
    UnitStatus.RETRY: "deferred",
    UnitStatus.PENDING: "deferred",
    UnitStatus.FAILED: "failed",
    UnitStatus.EXPIRED: "failed",
}


# DeliveryEvent's slots, set directly: the frozen dataclass's own __init__ (interpreted,
# object.__setattr__ per field) cost ~15k instructions per event, most of what an event
# costs; a unit test checks the result equals the constructor's
_EVENT_SLOTS: Final = tuple(
    DeliveryEvent.__dict__[name].__set__
    for name in ("kind", "message_id", "domain", "sender", "recipients", "attempt", "detail",
                 "extra")
)  # fmt: skip


def delivery_event(msg: MessageState, unit: UnitState) -> DeliveryEvent:
    """The module API's view of one unit's outcome."""
    detail = unit.last_error
    if unit.history:
        last = unit.history[-1]
        detail = f"{last.code} {last.text}" if last.code is not None else last.text
    values: tuple[object, ...] = (
        _EVENT_KIND.get(unit.status, "deferred"),
        msg.id,
        unit.domain,
        msg.envelope.sender,
        tuple([r.address for r in unit.recipients]),
        unit.attempts,
        detail,
        {},
    )
    event = object.__new__(DeliveryEvent)
    for set_slot, value in zip(_EVENT_SLOTS, values, strict=True):
        set_slot(event, value)
    return event
