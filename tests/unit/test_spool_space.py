"""The pure space decisions of the file spool (issue 14, defect 15)."""

from __future__ import annotations

from pathlib import Path

import pytest

from empath.spool.space import (
    RESERVE_MAX_BYTES,
    RESERVE_MIN_BYTES,
    CompactMode,
    Reserve,
    SegmentSpace,
    mode_for,
    pick_victim,
    reclaimable_bytes,
    reserve_size,
    rotate_active,
    under_pressure,
)

MIB = 1024 * 1024


def test_the_reserve_is_a_64th_of_the_filesystem_within_bounds() -> None:
    assert RESERVE_MIN_BYTES == reserve_size(16 * MIB)
    assert 2 * MIB == reserve_size(128 * MIB)
    assert RESERVE_MAX_BYTES == reserve_size(1 << 40)


@pytest.mark.parametrize(
    ("expected", "free", "held"),
    [(False, 50 * MIB, True), (True, 9 * MIB, True), (True, 50 * MIB, False)],
)
def test_pressure_is_a_released_reserve_or_under_a_tenth_free(
    expected: bool, free: int, held: bool
) -> None:
    assert expected == under_pressure(free, 100 * MIB, held)


def test_an_operator_request_is_forced_and_pressure_beats_the_periodic_pass() -> None:
    assert CompactMode.FORCED == mode_for(True, False)
    assert CompactMode.PRESSURE == mode_for(False, True)
    assert CompactMode.NORMAL == mode_for(False, False)


def test_the_active_segment_is_rotated_only_under_pressure_or_on_request() -> None:
    dead = SegmentSpace(1, 16 * MIB, 0)
    assert not rotate_active(dead, CompactMode.NORMAL, 0.5)
    assert rotate_active(dead, CompactMode.PRESSURE, 0.5)
    assert rotate_active(dead, CompactMode.FORCED, 0.5)


def test_under_pressure_a_mostly_live_segment_is_not_rewritten_for_little() -> None:
    """Rewriting costs at most four live bytes per dead byte freed: no thrashing on a
    disk full of live mail."""
    live = SegmentSpace(1, 16 * MIB, 15 * MIB)
    assert not rotate_active(live, CompactMode.PRESSURE, 0.5)
    assert rotate_active(SegmentSpace(1, 16 * MIB, 12 * MIB), CompactMode.PRESSURE, 0.5)
    assert not rotate_active(SegmentSpace(1, 40_000, 0), CompactMode.PRESSURE, 0.5)
    assert rotate_active(SegmentSpace(1, 40_000, 0), CompactMode.FORCED, 0.5)


def test_victims_go_oldest_first_and_never_while_a_removal_is_under_way() -> None:
    old_live = SegmentSpace(1, MIB, MIB)
    new_dead = SegmentSpace(2, MIB, 0)
    assert old_live == pick_victim([new_dead, old_live], CompactMode.NORMAL, 0.5)
    assert None is pick_victim([old_live], CompactMode.NORMAL, 0.5)
    busy = SegmentSpace(1, MIB, 0, busy=True)
    assert None is pick_victim([busy, new_dead], CompactMode.PRESSURE, 0.5)
    assert None is pick_victim([], CompactMode.FORCED, 0.5)


def test_under_pressure_a_closed_segment_the_periodic_pass_would_take_is_taken() -> None:
    """Small segments (64 KiB) never reach MIN_RECLAIM_BYTES of dead data while they hold
    any live mail: under pressure compaction used to take none of them, so a full disk
    with plenty of reclaimable space stopped compacting altogether."""
    half_dead = SegmentSpace(1, 66_000, 30_000)
    assert half_dead == pick_victim([half_dead], CompactMode.NORMAL, 0.5)
    assert half_dead == pick_victim([half_dead], CompactMode.PRESSURE, 0.5)
    mostly_live = SegmentSpace(1, 66_000, 50_000)
    assert None is pick_victim([mostly_live], CompactMode.PRESSURE, 0.5)
    assert not rotate_active(half_dead, CompactMode.PRESSURE, 0.5)  # not worth a new file


def test_reclaimable_bytes_are_the_dead_bytes_of_every_segment() -> None:
    assert 3 * MIB == reclaimable_bytes(
        [SegmentSpace(1, 2 * MIB, MIB), SegmentSpace(2, 2 * MIB, 0)]
    )


def test_a_reserve_that_cannot_be_made_for_want_of_space_is_out(tmp_path: Path) -> None:
    """restore() allocates the file; release() unlinks it; a failure that is not about
    space (here: no directory) leaves no reserve but never refuses mail."""
    reserve = Reserve(tmp_path / "reserve")
    assert reserve.restore(RESERVE_MIN_BYTES)
    assert (tmp_path / "reserve").stat().st_blocks * 512 >= RESERVE_MIN_BYTES
    assert reserve.release() and not reserve.held
    assert not (tmp_path / "reserve").exists()
    assert not reserve.release()
    odd = Reserve(tmp_path / "missing-dir" / "reserve")
    assert odd.restore(RESERVE_MIN_BYTES) and odd.held
    assert 0 == odd.size
    assert not odd.release()
