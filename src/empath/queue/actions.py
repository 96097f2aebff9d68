"""The operator's actions on queued units (`empathctl queue hold|release|delete|bounce`
by filter), as a mixin of :class:`~empath.queue.runner.DeliveryRunner`.

Kept apart from the runner's delivery loop (which it shares state with: the spool,
the scheduler, the history, DSNs): holding takes units out of the scheduler and
writes them ``held``; releasing makes them due at once; deleting some units of a
message keeps the others.  Every action is recorded in the message's history.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import replace
from typing import TYPE_CHECKING

from empath.delivery import transition
from empath.delivery.classify import AttemptResult
from empath.logs import get_logger
from empath.queue.index import UnitKey
from empath.spool.model import MessageState, UnitStatus

if TYPE_CHECKING:
    from empath.clock import Clock
    from empath.queue.runner import DeleteOutcome
    from empath.queue.scheduler import Scheduler
    from empath.spool.journal import MessageJournal
    from empath.spool.store import Spool

log = get_logger("delivery", __name__)


class OperatorActions:
    """Mixed into the runner; needs its spool, scheduler, clock, journal and DSN path."""

    if TYPE_CHECKING:
        spool: Spool
        scheduler: Scheduler
        clock: Clock
        journal: MessageJournal
        _tasks: dict[UnitKey, asyncio.Task[None]]

        @property
        def _decide(self) -> transition.TransitionSettings: ...

        async def _send_dsn(
            self, msg: MessageState, report: transition.DsnReport, now: float
        ) -> str: ...

        async def delete(self, msg_id: str, *, bounce: bool) -> DeleteOutcome: ...

        def forget(self, msg_id: str, domains: list[str]) -> None: ...

        def _kick(self) -> None: ...

    async def delete_units(
        self, msg_id: str, domains: Collection[str], *, bounce: bool, durable: bool = True
    ) -> str | None:
        """Delete only the units of ``domains`` (a filter matched them, not the whole
        message); the whole message when no other unit is left.  Returns the DSN's id.
        As :meth:`delete`, an attempt of those units in flight is waited for (up to
        ``DELETE_WAIT_S``) so that what it delivered is not bounced."""
        from empath.queue.runner import DELETE_WAIT_S

        msg = self.spool.get(msg_id)
        self.forget(msg_id, list(domains))
        busy = [t for k, t in self._tasks.items() if k.message_id == msg_id and k.domain in domains]
        if busy:
            _done, running = await asyncio.wait(busy, timeout=DELETE_WAIT_S)
            if running:
                log.warn("Units deleted while their attempt runs", message_id=msg_id)
            msg = self.spool.get(msg_id)  # raises UnknownMessageError: all delivered
        left = [
            u for u in msg.units if u.domain not in domains and u.status is not UnitStatus.DELIVERED
        ]
        if not left:
            return (await self.delete(msg_id, bounce=bounce)).dsn_id
        gone = tuple(u for u in msg.units if u.domain in domains)
        self.forget(msg_id, [u.domain for u in gone])
        dsn_id = None
        if bounce:
            report = transition.deleted(gone, envelope=msg.envelope, settings=self._decide)
            if report is not None:
                dsn_id = await self._send_dsn(msg, report, self.clock.now())
        current = self.spool.get(msg_id)
        action = "bounced" if bounce else "deleted"
        for u in gone:  # history first: durable with the state change (journal.py)
            self.journal.record(msg_id, "operator", action=action, domain=u.domain, dsn_id=dsn_id)
        await self.spool.update(
            msg_id, tuple(u for u in current.units if u.domain not in domains), durable=durable
        )
        log.audit(
            "Units deleted by the operator",
            message_id=msg_id,
            domains=sorted(u.domain for u in gone),
            dsn_id=dsn_id or "",
        )
        return dsn_id

    async def hold(
        self, msg_id: str, domains: Collection[str], *, durable: bool = True
    ) -> list[str]:
        """`queue hold`: the waiting units of ``domains`` become ``held`` (persisted) and
        leave the scheduler; one in flight finishes its attempt and then stays held.
        The domains held."""
        msg = self.spool.get(msg_id)
        held = [
            u.domain
            for u in msg.units
            if u.domain in domains and not u.status.terminal and u.status is not UnitStatus.HELD
        ]
        if not held:
            return []
        units = tuple(
            replace(u, status=UnitStatus.HELD) if u.domain in held else u for u in msg.units
        )
        for domain in held:
            self.journal.record(msg_id, "operator", action="hold", domain=domain)
        await self.spool.update(msg_id, units, durable=durable)
        for domain in held:
            self.scheduler.remove(UnitKey(msg_id, domain))
        return held

    async def release(
        self,
        msg_id: str,
        domains: Collection[str],
        *,
        durable: bool = True,
        restart_expiry: bool = False,
    ) -> list[str]:
        """`queue release`: held units of ``domains`` are due now again (a suspension or
        an open breaker may still keep them waiting); their next attempt is made even
        past the deadline (:func:`~empath.delivery.transition.released`).  The domains
        released."""
        msg = self.spool.get(msg_id)
        released = [
            u.domain for u in msg.units if u.domain in domains and u.status is UnitStatus.HELD
        ]
        if not released:
            return []
        now = self.clock.now()
        units = tuple(
            transition.released(u, now, restart_expiry=restart_expiry)
            if u.domain in released
            else u
            for u in msg.units
        )
        for domain in released:
            self.journal.record(msg_id, "operator", action="release", domain=domain)
        await self.spool.update(msg_id, units, durable=durable)
        for domain in released:
            key = UnitKey(msg_id, domain)
            if not self.scheduler.is_in_flight(key):
                self.scheduler.add(key, now)
        self._kick()
        return released

    def _left(self, msg: MessageState, reason: str) -> None:
        """The message left the queue: its envelope and last unit states go to the
        history, which keeps them for ``failed_retention_secs``."""
        env = msg.envelope
        self.journal.record(
            msg.id,
            "left",
            reason=reason,
            sender=env.sender,
            recipients=list(env.recipients),
            received_at=env.received_at,
            peer=env.peer,
            helo=env.helo,
            size=env.size,
            is_dsn=env.is_dsn,
            units=[
                {
                    "domain": u.domain,
                    "status": u.status.value,
                    "attempts": u.attempts,
                    "last_error": u.last_error,
                    "history": [a.to_json() for a in u.history],
                }
                for u in msg.units
            ],
        )

    def _record_attempt(self, msg_id: str, domain: str, result: AttemptResult) -> None:
        """One attempt in the message's history (with what the spool does not keep:
        the address, TLS and each recipient's outcome)."""
        mx, code, text = result.summary
        self.journal.record(
            msg_id,
            "attempt",
            domain=domain,
            mx=result.mx_label or mx,
            address=result.address,
            tls=result.tls_version or ("yes" if result.tls else "none"),
            code=code,
            text=text,
            delivered=list(result.delivered),
            temporary=list(result.temporary),
            permanent=list(result.permanent),
        )
