"""MemorySpool honours the Spool contract that the file store implements."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from empath.errors import SpoolFullError, UnknownMessageError
from empath.ids import is_ulid
from empath.spool.memory import MemorySpool
from empath.spool.model import Envelope, UnitStatus, initial_units
from empath.spool.store import Spool


def _env(*rcpts: str) -> Envelope:
    return Envelope(sender="a@example.org", recipients=rcpts, received_at=1.0)


def test_memory_spool_satisfies_the_protocol() -> None:
    """MemorySpool is usable wherever a Spool is expected."""
    spool: Spool = MemorySpool()
    assert 0 == len(spool)


def test_commit_update_remove_round_trip() -> None:
    """A committed message is indexed with its body; updates replace units; remove forgets it."""

    async def main() -> None:
        spool = MemorySpool()
        await spool.open()
        w = spool.begin()
        w.write(b"Subject: x\r\n\r\n")
        w.write(b"hi\r\n")
        env = _env("b@x.com", "c@y.com")
        msg = await spool.commit(w, env, initial_units(env.recipients))
        assert is_ulid(msg.id)
        assert 18 == msg.envelope.size
        assert b"Subject: x\r\n\r\nhi\r\n" == await spool.read_body(msg.id)
        chunks = [c async for c in spool.iter_body(msg.id, chunk_bytes=7)]
        assert b"Subject: x\r\n\r\nhi\r\n" == b"".join(chunks)
        assert ["x.com", "y.com"] == [u.domain for u in spool.get(msg.id).units]

        units = tuple(replace(u, status=UnitStatus.IN_PROGRESS) for u in msg.units)
        await spool.update(msg.id, units, durable=False)
        assert UnitStatus.IN_PROGRESS == spool.get(msg.id).units[0].status
        await spool.open()  # a "restart": in-flight units are pending again
        assert UnitStatus.PENDING == spool.get(msg.id).units[0].status
        await spool.remove(msg.id)
        assert 0 == len(spool)
        with pytest.raises(UnknownMessageError):
            spool.get(msg.id)
        with pytest.raises(UnknownMessageError):
            await spool.update(msg.id, units)

    asyncio.run(main())


def test_fail_next_commit_raises_and_keeps_nothing() -> None:
    """fail_next_commit makes exactly the next commit fail, storing nothing."""

    async def main() -> None:
        spool = MemorySpool()
        await spool.open()
        spool.fail_next_commit(SpoolFullError("full"))
        w = spool.begin()
        w.write(b"x\r\n")
        with pytest.raises(SpoolFullError):
            await spool.commit(w, _env("b@x.com"), initial_units(["b@x.com"]))
        assert 0 == len(spool)
        w2 = spool.begin()
        w2.write(b"x\r\n")
        msg = await spool.commit(w2, _env("b@x.com"), initial_units(["b@x.com"]))
        assert [msg.id] == [m.id for m in spool.messages()]

    asyncio.run(main())
