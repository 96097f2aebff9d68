"""The group commit delay (spool/commit_delay.py): a small batch is held open a bounded
time while records are arriving fast, never on a quiet spool; the writer adds what
arrives meanwhile to the same write, stops waiting at ``target`` records, and a stop
during a hold still writes the held records."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.config.load import loads_config
from empath.config.model import SpoolConfig
from empath.config.reload import plan_reload
from empath.errors import ConfigError
from empath.spool.commit_delay import MIN_HOLD_S, MIN_JOINS, CommitDelay
from empath.spool.fs import FileSpool
from empath.spool.model import Envelope, MessageState, initial_units
from empath.spool.writer import LogWriter


def primed(gap_s: float, write_s: float, **kw: float) -> CommitDelay:
    """A policy that has seen records ``gap_s`` apart and writes of ``write_s``."""
    d = CommitDelay(**kw)  # type: ignore[arg-type]
    d.gap_s, d.write_s = gap_s, write_s
    return d


def test_a_spool_that_has_seen_no_traffic_never_waits() -> None:
    assert 0.0 == CommitDelay().hold_s(1)


def test_records_too_far_apart_to_join_within_the_hold_are_written_at_once() -> None:
    """Fewer than MIN_JOINS records expected within the longest hold: no hold."""
    assert 0.0 == primed(gap_s=1e-3, write_s=180e-6, max_hold_s=200e-6).hold_s(1)


def test_a_hold_is_worth_it_when_a_quarter_of_a_record_is_expected_to_join() -> None:
    assert 200e-6 == primed(gap_s=800e-6, write_s=180e-6, max_hold_s=200e-6).hold_s(1)


def test_a_batch_of_target_records_is_written_at_once() -> None:
    assert 0.0 == primed(gap_s=10e-6, write_s=180e-6, target=4).hold_s(4)


def test_the_hold_is_the_time_the_missing_records_should_take() -> None:
    assert 90e-6 == pytest.approx(primed(gap_s=30e-6, write_s=1e-3, target=4).hold_s(1))


def test_the_hold_is_bounded_by_the_longest_hold() -> None:
    assert 200e-6 == primed(gap_s=150e-6, write_s=1e-3, max_hold_s=200e-6).hold_s(1)


def test_the_hold_is_bounded_by_a_share_of_an_average_write() -> None:
    d = primed(gap_s=100e-6, write_s=180e-6, max_hold_s=1e-3, write_share=0.5)
    assert 90e-6 == pytest.approx(d.hold_s(1))


def test_a_hold_too_short_to_pay_for_its_timer_is_skipped() -> None:
    assert 0.0 == primed(gap_s=MIN_HOLD_S / 4, write_s=1e-3, target=2).hold_s(1)


def test_the_gap_is_the_cycle_time_over_the_records_it_took() -> None:
    d = CommitDelay()
    d.taken(10.0, 0)
    assert d.gap_s is None  # one cycle start says nothing yet
    d.taken(10.0004, 2)
    assert 200e-6 == pytest.approx(d.gap_s)


def test_a_quiet_spell_is_forgotten_within_a_dozen_busy_cycles() -> None:
    d = CommitDelay(max_hold_s=200e-6)
    d.wrote(180e-6)
    d.taken(0.0, 0)
    d.taken(3600.0, 1)  # an hour without mail
    assert 0.0 == d.hold_s(1)
    now = 3600.0
    for _ in range(12):  # then 12 cycles of 2 records 100 µs apart
        now += 200e-6
        d.taken(now, 2)
    assert d.hold_s(1) > 0.0


def test_the_write_time_is_averaged() -> None:
    d = CommitDelay()
    d.wrote(100e-6)
    d.wrote(500e-6)
    assert 200e-6 == pytest.approx(d.write_s)


@given(
    gap=st.floats(1e-7, 1.0),
    write=st.floats(1e-7, 1.0),
    batch=st.integers(0, 64),
    max_hold=st.floats(0.0, 2e-3),
    share=st.floats(0.0, 4.0),
)
def test_a_hold_never_exceeds_its_bounds(
    gap: float, write: float, batch: int, max_hold: float, share: float
) -> None:
    hold = primed(gap, write, max_hold_s=max_hold, write_share=share).hold_s(batch)
    assert hold == 0.0 or MIN_HOLD_S <= hold <= min(max_hold, write * share)
    assert hold == 0.0 or hold >= MIN_JOINS * gap


def test_the_config_knob_is_off_by_default_and_bounded() -> None:
    assert 0 == SpoolConfig().commit_delay_us
    assert 300 == loads_config("Empath( spool: ( commit_delay_us: 300 ) )").spool.commit_delay_us
    with pytest.raises(ConfigError, match="commit_delay_us: must be 0 to 1000"):
        loads_config("Empath( spool: ( commit_delay_us: 5000 ) )")


def test_a_changed_commit_delay_waits_for_a_restart() -> None:
    """The writer thread is built when the spool opens."""
    plan = plan_reload(
        loads_config("Empath( spool: ( commit_delay_us: 0 ) )"),
        loads_config("Empath( spool: ( commit_delay_us: 200 ) )"),
    )
    assert 0 == plan.applied.spool.commit_delay_us
    assert ("spool.commit_delay_us",) == plan.pending_keys


# --- the writer thread ------------------------------------------------------------------


async def put(spool: FileSpool, body: bytes) -> MessageState:
    e = Envelope(sender="s@example.org", recipients=("r@example.net",), received_at=1.0, peer="")
    w = spool.begin()
    w.write(body)
    return await spool.commit(w, e, initial_units(e.recipients, 5.0))


class HoldUntil(CommitDelay):
    """Holds every batch (long) until it has ``target`` records."""

    def taken(self, now: float, records: int) -> None:
        pass

    def hold_s(self, batch: int) -> float:
        return 0.0 if batch >= self.target else 30.0


async def held_first(
    path: Path, target: int
) -> tuple[FileSpool, LogWriter, asyncio.Future[MessageState]]:
    """A spool whose writer holds batches until ``target`` records, and the commit of a
    first message, held (not yet written)."""
    spool = FileSpool(path, commit_delay_us=200)
    await spool.open()
    w = spool._writer
    assert w is not None and w._delay is not None
    w._delay = HoldUntil(target=target)
    first = asyncio.ensure_future(put(spool, b"first\r\n"))
    await until(lambda: w.holds == 1, "the writer to hold the first record")
    return spool, w, first


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_record_arriving_during_a_hold_joins_the_held_write(tmp_path: Path) -> None:
    spool, w, first = await held_first(tmp_path, target=2)
    batches, records = w.batches, w.records
    assert not first.done()  # not acknowledged: not written yet
    second = await put(spool, b"b\r\n")  # completes the batch: written at once
    a = await first
    assert (batches + 1, records + 2) == (w.batches, w.records)
    assert {a.id, second.id} == {m.id for m in spool.messages()}
    await spool.close()


async def test_without_a_delay_each_record_is_written_as_it_comes(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path)
    await spool.open()
    w = spool._writer
    assert w is not None and w._delay is None
    batches = w.batches
    await put(spool, b"a\r\n")
    await put(spool, b"b\r\n")
    assert batches + 2 == w.batches
    await spool.close()


async def test_stopping_during_a_hold_writes_the_held_record(tmp_path: Path) -> None:
    spool, _, first = await held_first(tmp_path, target=5)
    await spool.close()
    kept = await first  # acknowledged: it was written before the writer stopped
    again = FileSpool(tmp_path)
    await again.open()
    assert [kept.id] == [m.id for m in again.messages()]
    await again.close()
