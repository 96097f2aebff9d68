"""hypothesis: the counts the spool's index keeps as messages change (units per status,
non-terminal units per domain, the oldest live message) always equal a full recount.
The file spool's model test (test_spool_fs_model.py) checks the same across restarts."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from empath.control.queue import TOP_DOMAINS, count_messages, index_counts, new_counts
from empath.spool.index import STATUS_SLOT, MessageIndex
from empath.spool.memory import MemorySpool
from empath.spool.model import Envelope, MessageState, RecipientState, UnitState, UnitStatus
from empath.spool.store import IndexedMessages

DOMAINS = ["a.test", "b.test", "c.test", "d.test"]


def assert_index_counts(spool: IndexedMessages) -> None:
    """The index's counts equal a recount of ``spool.messages()``."""
    index = spool.index
    full = new_counts()
    count_messages(full, list(spool.messages()))
    kept = index_counts(index)
    assert dict(kept.by_status) == dict(full.by_status)
    assert kept.messages == full.messages == len(spool)
    assert index.domain_counts() == {d: n for d, n in full.domains.items() if n}
    assert (
        sorted(kept.domains.values(), reverse=True)
        == sorted((n for n in full.domains.values() if n), reverse=True)[:TOP_DOMAINS]
    )
    assert (kept.oldest_id, kept.oldest_at) == (full.oldest_id, full.oldest_at)
    recount = _domain_recount(list(spool.messages()))
    assert recount == {d: (c.units, c.by_status, c.by_minute) for d, c in index.domains().items()}
    every: dict[int, int] = {}
    for _n, _s, by_minute in recount.values():
        for minute, n in by_minute.items():
            every[minute] = every.get(minute, 0) + n
    assert every == index.minutes()


def _domain_recount(
    messages: list[MessageState],
) -> dict[str, tuple[int, list[int], dict[int, int]]]:
    """Per domain: non-terminal units, by status slot, by arrival minute (a full walk)."""
    out: dict[str, tuple[int, list[int], dict[int, int]]] = {}
    for msg in messages:
        minute = int(msg.envelope.received_at // 60)
        for unit in msg.units:
            if unit.status.terminal:
                continue
            n, by_status, by_minute = out.get(unit.domain, (0, [0, 0, 0, 0], {}))
            by_status[STATUS_SLOT[unit.status]] += 1
            by_minute[minute] = by_minute.get(minute, 0) + 1
            out[unit.domain] = (n + 1, by_status, by_minute)
    return out


def _message(msg_id: str, at: float, statuses: list[tuple[str, UnitStatus]]) -> MessageState:
    units = tuple(
        UnitState(domain=d, recipients=(RecipientState(f"u@{d}"),), status=s)
        for d, s in dict(statuses).items()
    )
    rcpts = tuple(f"u@{u.domain}" for u in units)
    return MessageState(id=msg_id, envelope=Envelope("s@x.test", rcpts, at), units=units)


unit_lists = st.lists(
    st.tuples(st.sampled_from(DOMAINS), st.sampled_from(list(UnitStatus))), min_size=1, max_size=4
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 12), st.integers(0, 300), unit_lists),
        st.tuples(st.just("pop"), st.integers(0, 12)),
    ),
    max_size=60,
)


class _Spool(IndexedMessages):
    def __init__(self, index: MessageIndex) -> None:
        self._index = index


@given(ops)
def test_kept_counts_equal_a_recount(program: list[tuple[object, ...]]) -> None:
    index = MessageIndex()
    spool = _Spool(index)
    for op in program:
        msg_id = f"m{op[1]:02d}"
        if op[0] == "set":
            at, units = op[2], op[3]
            assert isinstance(at, int) and isinstance(units, list)
            old = index.get(msg_id)
            received = old.envelope.received_at if old else float(at)  # fixed per message
            index[msg_id] = _message(msg_id, received, units)
        else:
            index.pop(msg_id)
        assert_index_counts(spool)
    assert_index_counts(_Spool(MessageIndex(dict(index.items()))))  # rebuilt from scratch


def test_stale_heap_entries_are_pruned() -> None:
    """Messages that finish behind a long-lived oldest one do not pile up in the heap."""
    index = MessageIndex()
    index["m0"] = _message("m0", 0.0, [("a.test", UnitStatus.RETRY)])
    for i in range(1, 5000):
        index[f"m{i}"] = _message(f"m{i}", float(i), [("b.test", UnitStatus.PENDING)])
        index.pop(f"m{i}")
    assert len(index._heap) < 2 * 1 + 1024 + 2
    assert index.oldest() is index["m0"]


def test_memory_spool_counts_follow_commit_update_remove() -> None:
    async def main() -> None:
        spool = MemorySpool()
        await spool.open()
        ids = []
        for i, rcpts in enumerate([("x@a.test",), ("y@b.test", "z@a.test"), ("w@c.test",)]):
            w = spool.begin()
            w.write(b"body\r\n")
            units = tuple(
                UnitState(domain=r.split("@")[1], recipients=(RecipientState(r),)) for r in rcpts
            )
            msg = await spool.commit(w, Envelope("s@x.test", rcpts, float(i)), units)
            ids.append(msg.id)
        assert_index_counts(spool)
        assert spool.index.status_counts()[UnitStatus.PENDING] == 4
        first = spool.get(ids[0])
        await spool.update(ids[0], (replace(first.units[0], status=UnitStatus.DELIVERED),))
        assert_index_counts(spool)
        assert spool.index.oldest() is spool.get(ids[1])
        assert spool.index.top_domains(1) == [("a.test", 1)]
        await spool.remove(ids[1])
        assert_index_counts(spool)
        assert spool.index.domain_counts() == {"c.test": 1}

    asyncio.run(main())
