"""Empath's module API (DESIGN §14; the guide is docs/MODULES.md).

The smallest module::

    from empath.modules import Reply

    class Block:
        def __init__(self, arguments: dict[str, object]) -> None:
            self.deny = str(arguments["deny"])

        async def on_rcpt_to(self, session, recipient: str) -> Reply | None:
            return Reply(550, "5.7.1", "not this one") if recipient == self.deny else None

configured as ``(type: "Python", name: "mypkg.filters:Block", arguments: {"deny":
"x@y.test"})``.  Nothing is run at import.
"""

from empath.modules.api import (
    AddHeader,
    ChangeHeader,
    Changes,
    DeleteHeader,
    DeliveryEvent,
    HeaderChange,
    Message,
    Reply,
    Session,
)

__all__ = [
    "AddHeader",
    "ChangeHeader",
    "Changes",
    "DeleteHeader",
    "DeliveryEvent",
    "HeaderChange",
    "Message",
    "Reply",
    "Session",
]
