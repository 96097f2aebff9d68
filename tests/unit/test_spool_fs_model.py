"""hypothesis: any sequence of commit/update/remove/compact/reopen leaves the file spool equal
to a plain in-memory model of what was acknowledged."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from empath.spool.fs import FileSpool
from empath.spool.memory import requeue_in_progress
from empath.spool.model import Envelope, UnitState, UnitStatus, initial_units
from tests.unit.test_spool_index import assert_index_counts

STATUSES = list(UnitStatus)

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("commit"),
            st.binary(max_size=300),
            st.lists(
                st.sampled_from(["a@x.com", "b@x.com", "c@y.org", "d@z.net"]),
                min_size=1,
                max_size=3,
            ),
        ),
        st.tuples(st.just("update"), st.integers(0, 50), st.sampled_from(STATUSES), st.booleans()),
        st.tuples(st.just("remove"), st.integers(0, 50)),
        st.tuples(st.just("compact")),
        st.tuples(st.just("reopen")),
    ),
    max_size=40,
)


def _expected_after_reopen(units: tuple[UnitState, ...]) -> tuple[UnitState, ...]:
    return requeue_in_progress(units)


@given(ops)
def test_reopened_spool_equals_the_model(program: list[tuple[object, ...]]) -> None:
    """After each reopen, ids, envelopes, units and bodies equal the model's; the
    index's kept counts equal a full recount after every step and every reopen."""

    async def main(path: Path) -> None:
        kw: dict[str, Any] = {"segment_bytes": 2048, "spill_bytes": 128}
        spool = FileSpool(path, **kw)
        await spool.open()
        model: dict[str, tuple[Envelope, tuple[UnitState, ...], bytes]] = {}

        async def check() -> None:
            assert list(model) == sorted(model)
            assert sorted(model) == sorted(m.id for m in spool.messages())
            for msg_id, (envelope, units, body) in model.items():
                got = spool.get(msg_id)
                assert envelope == got.envelope
                assert units == got.units
                assert body == await spool.read_body(msg_id)
            assert_index_counts(spool)

        try:
            for op in program:
                ids = list(model)
                if op[0] == "commit":
                    body, rcpts = op[1], op[2]
                    assert isinstance(body, bytes) and isinstance(rcpts, list)
                    w = spool.begin()
                    for i in range(0, len(body), 50):
                        w.write(body[i : i + 50])
                    e = Envelope("s@example.org", tuple(rcpts), 1.5, size=len(body))
                    msg = await spool.commit(w, e, initial_units(rcpts, 2.0))
                    model[msg.id] = (msg.envelope, msg.units, body)
                elif op[0] == "update" and ids:
                    idx, status, durable = op[1], op[2], op[3]
                    assert isinstance(idx, int) and isinstance(durable, bool)
                    assert isinstance(status, UnitStatus)
                    msg_id = ids[idx % len(ids)]
                    envelope, units, body = model[msg_id]
                    new = (
                        replace(units[0], status=status, attempts=units[0].attempts + 1),
                        *units[1:],
                    )
                    await spool.update(msg_id, new, durable=durable)
                    model[msg_id] = (envelope, new, body)
                elif op[0] == "remove" and ids:
                    idx = op[1]
                    assert isinstance(idx, int)
                    msg_id = ids[idx % len(ids)]
                    await spool.remove(msg_id)
                    del model[msg_id]
                elif op[0] == "compact":
                    await spool.compact()
                elif op[0] == "reopen":
                    await spool.close()
                    spool = FileSpool(path, **kw)
                    report = await spool.open()
                    assert 0 == report.quarantined
                    model = {k: (e, _expected_after_reopen(u), b) for k, (e, u, b) in model.items()}
                await check()
            await spool.close()
            spool = FileSpool(path, **kw)
            await spool.open()
            model = {k: (e, _expected_after_reopen(u), b) for k, (e, u, b) in model.items()}
            await check()
        finally:
            await spool.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp)))
