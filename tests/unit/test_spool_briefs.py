"""FileSpool holds a waiting message as a brief (issue 20: RSS per queued unit): recovery
decodes nothing beyond what the queue's views read, a message whose newest state is durable
and not due soon is chilled, and ``get`` reads a brief's records back into exactly the
message that was written - after a restart, a compaction and a crash mid-delivery alike."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from empath.control.queue import ListFilter, list_rows
from empath.errors import UnknownMessageError
from empath.spool import fs
from empath.spool.fs import FileSpool
from empath.spool.index import MessageView, pack_state, unpack_state
from empath.spool.model import Attempt, MessageState, UnitStatus
from tests.unit.test_spool_fs import put


async def reopen(path: Path, **kw: Any) -> FileSpool:
    spool = FileSpool(path, **kw)
    await spool.open()
    return spool


async def retry_later(spool: FileSpool, msg: MessageState, error: str) -> MessageState:
    """The runner's snapshot after a temporary failure: due in an hour."""
    later = time.time() + 3600.0
    unit = replace(
        msg.units[0], status=UnitStatus.RETRY, attempts=1, next_attempt_at=later, last_error=error
    ).with_attempt(Attempt(at=later - 3600.0, mx="mx.example.net:25", code=451, text=error))
    return await spool.update(msg.id, (unit, *msg.units[1:]))


def fields(view: MessageView) -> tuple[Any, ...]:
    env = view.envelope
    units = [
        (u.domain, u.status, u.attempts, u.next_attempt_at, u.last_error, u.finished_at,
         u.rcpt_count)
        for u in view.units
    ]  # fmt: skip
    return view.id, env.sender, env.received_at, view.finished, units


def test_a_state_location_packs_and_unpacks() -> None:
    for loc in [(1, 0, 1), (7, 2**40 - 1, 2**32 - 1), (2**31, 12345, 678)]:
        assert loc == unpack_state(pack_state(*loc))
    with pytest.raises(ValueError):
        pack_state(1, 2**40, 1)
    with pytest.raises(ValueError):
        pack_state(1, 0, 0)


async def test_a_recovered_queue_is_held_brief_and_decodes_to_what_was_written(
    tmp_path: Path,
) -> None:
    spool = await reopen(tmp_path)
    a = await put(spool, b"a\r\n", "x@a.example", "y@b.example", "z@b.example")
    b = await put(spool, b"b\r\n")
    b2 = await retry_later(spool, b, "451 4.7.1 try later")
    c = await put(spool, b"c\r\n")
    decoded = list(spool.messages())
    assert [a, b2, c] == decoded
    await spool.close()

    spool = await reopen(tmp_path)
    assert 0 == spool.index.hot
    assert 3 == len(spool)
    assert [fields(m) for m in decoded] == [fields(v) for v in spool.views()]
    assert [a, b2, c] == [spool.get(m.id) for m in decoded]
    assert [a, b2, c] == list(spool.messages())
    assert 0 == spool.index.hot  # reading a brief does not keep it decoded
    assert b"b\r\n" == await spool.read_body(b.id)
    await spool.remove(b.id)
    with pytest.raises(UnknownMessageError):
        spool.get(b.id)
    assert [a, c] == list(spool.messages())
    await spool.close()


async def test_a_message_retried_later_is_chilled_once_its_state_is_durable(
    tmp_path: Path,
) -> None:
    spool = await reopen(tmp_path)
    m = await put(spool, b"m\r\n")
    assert spool.index.brief(m.id) is None  # just accepted: due now, kept decoded
    waiting = await retry_later(spool, m, "451 greylisted")
    brief = spool.index.brief(m.id)
    assert brief is not None and brief.state != 0
    assert 0 == spool.index.hot
    assert waiting == spool.get(m.id)
    due_now = replace(waiting.units[0], next_attempt_at=time.time())
    again = await spool.update(m.id, (due_now,))
    assert spool.index.brief(m.id) is None  # due soon: the runner reads it next
    assert again == spool.get(m.id)
    await spool.close()


async def test_more_than_the_hot_limit_of_new_messages_are_held_brief(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue built by ingest for a domain that takes nothing stays bounded too."""
    monkeypatch.setattr(fs, "HOT_LIMIT", 2)
    spool = await reopen(tmp_path)
    msgs = [await put(spool, b"%d\r\n" % i) for i in range(5)]
    assert 2 == spool.index.hot
    assert msgs == list(spool.messages())
    await spool.close()


async def test_compaction_moves_a_brief_and_it_decodes_to_its_newest_state(
    tmp_path: Path,
) -> None:
    spool = await reopen(tmp_path, segment_bytes=4096)
    msgs = [await put(spool, b"%04d" % i + b"x" * 150 + b"\r\n") for i in range(40)]
    keep = msgs[3]
    kept = await retry_later(spool, keep, "451 later")
    for m in msgs:
        if m.id != keep.id:
            await spool.remove(m.id)
    brief = spool.index.brief(keep.id)
    assert brief is not None and brief.state != 0
    assert await spool.compact() > 0
    brief = spool.index.brief(keep.id)
    assert brief is not None and brief.state == 0  # the copy holds the newest units
    assert kept == spool.get(keep.id)
    assert keep.envelope.size == len(await spool.read_body(keep.id))
    await spool.close()
    spool = await reopen(tmp_path, segment_bytes=4096)
    assert [kept] == list(spool.messages())
    await spool.close()


async def test_a_unit_in_progress_at_a_crash_is_pending_in_the_brief_and_decoded(
    tmp_path: Path,
) -> None:
    spool = await reopen(tmp_path)
    m = await put(spool, b"x\r\n")
    await spool.update(m.id, (replace(m.units[0], status=UnitStatus.IN_PROGRESS),))
    await spool.close()
    spool = await reopen(tmp_path)
    (view,) = spool.views()
    assert UnitStatus.PENDING == view.units[0].status
    assert UnitStatus.PENDING == spool.get(m.id).units[0].status
    assert 1 == spool.index.status_counts()[UnitStatus.PENDING]
    await spool.close()


async def test_queue_list_rows_are_the_same_from_briefs_and_decoded_messages(
    tmp_path: Path,
) -> None:
    spool = await reopen(tmp_path)
    a = await put(spool, b"a\r\n", "x@a.example", "y@b.example")
    await retry_later(spool, a, "451 later")
    await put(spool, b"b\r\n")
    await spool.close()
    spool = await reopen(tmp_path)
    now = time.time()
    flt = ListFilter()
    from_briefs = [r for chunk in list_rows(spool.views(), flt, now, set()) for r in chunk]
    decoded = [r for chunk in list_rows(spool.messages(), flt, now, set()) for r in chunk]
    assert 3 == len(from_briefs)
    assert decoded == from_briefs
    await spool.close()
