"""DESIGN §7's readiness thresholds, judged from one snapshot of the daemon's state."""

from __future__ import annotations

import dataclasses

import pytest

from empath.observability.health import (
    MAX_HEARTBEAT_AGE_S,
    MIN_SPOOL_FREE_RATIO,
    ReadinessInputs,
    readiness_checks,
)

READY = ReadinessInputs(
    listeners_bound=True,
    spool_writable=True,
    spool_free_ratio=MIN_SPOOL_FREE_RATIO,
    heartbeat_age_s=MAX_HEARTBEAT_AGE_S,
    pending_units=9,
    max_queue_size=10,
)


def test_at_the_thresholds_every_check_passes() -> None:
    checks = readiness_checks(READY)
    assert [
        "listeners",
        "spool_writable",
        "spool_free_ratio",
        "scheduler_heartbeat_age_s",
        "pending_units",
    ] == [c.name for c in checks]
    assert all(c.ok for c in checks)
    assert (0.01, 10.0) == (MIN_SPOOL_FREE_RATIO, MAX_HEARTBEAT_AGE_S)


@pytest.mark.parametrize(
    ("change", "failing"),
    [
        ({"listeners_bound": False}, "listeners"),
        ({"spool_writable": False}, "spool_writable"),
        ({"spool_free_ratio": 0.0099}, "spool_free_ratio"),
        ({"heartbeat_age_s": 10.001}, "scheduler_heartbeat_age_s"),
        ({"pending_units": 10}, "pending_units"),
    ],
)
def test_past_a_threshold_exactly_that_check_fails(change: dict[str, object], failing: str) -> None:
    checks = readiness_checks(dataclasses.replace(READY, **change))  # type: ignore[arg-type]
    assert [failing] == [c.name for c in checks if not c.ok]
