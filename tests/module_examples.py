"""Python modules the integration tests load into a real daemon (by name, as an
operator's config would: ``tests.module_examples:Block``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from empath.modules import AddHeader, Changes, DeliveryEvent, Message, Reply, Session


class Block:
    """DESIGN §14's smallest module, as written there."""

    def __init__(self, arguments: dict[str, object]) -> None:
        self.deny = str(arguments["deny"])

    async def on_rcpt_to(self, session, recipient: str) -> Reply | None:  # type: ignore[no-untyped-def]
        return (
            Reply(550, "5.7.1", "not this one") if recipient == self.deny else None
        )  # None: carry on


class Tag:
    """Adds ``X-Tagged: <value>`` at end of data."""

    def __init__(self, arguments: dict[str, object]) -> None:
        self.value = str(arguments.get("value", "yes"))

    async def on_data(self, session: Session, message: Message) -> Changes:
        return Changes(headers=(AddHeader("X-Tagged", self.value),))


class Slow:
    """Sleeps in ``on_mail_from`` longer than its timeout."""

    def __init__(self, arguments: dict[str, object]) -> None:
        self.sleep_s = float(str(arguments.get("sleep_s", 5)))

    async def on_mail_from(self, session: Session, sender: str) -> Reply | None:
        await asyncio.sleep(self.sleep_s)
        return None


class Raises:
    """Raises in ``on_helo``."""

    def __init__(self, arguments: dict[str, object]) -> None:
        pass

    async def on_helo(self, session: Session, helo: str) -> Reply | None:
        raise RuntimeError(f"module bug on {helo}")


class Noop:
    """Every hook, doing nothing (the benchmark's no-op module)."""

    def __init__(self, arguments: dict[str, object]) -> None:
        pass

    async def on_connect(self, session: Session) -> None:
        return None

    async def on_helo(self, session: Session, helo: str) -> None:
        return None

    async def on_mail_from(self, session: Session, sender: str) -> None:
        return None

    async def on_rcpt_to(self, session: Session, recipient: str) -> None:
        return None

    async def on_data(self, session: Session, message: Message) -> None:
        return None

    async def on_delivery_event(self, event: DeliveryEvent) -> None:
        return None


class Recorder:
    """Writes each delivery event as a JSON line to ``arguments["path"]``."""

    def __init__(self, arguments: dict[str, object]) -> None:
        self.path = Path(str(arguments["path"]))

    async def on_delivery_event(self, event: DeliveryEvent) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": event.kind, "domain": event.domain,
                                "recipients": list(event.recipients)}) + "\n")  # fmt: skip


class Explodes:
    """A constructor that raises."""

    def __init__(self, arguments: dict[str, object]) -> None:
        raise ValueError("bad arguments")
