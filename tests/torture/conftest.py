"""Torture suite: load held, faults survived, bad input tried - with nothing lost.

Every test here runs at one of two scales:

* ``ci`` (the default, part of ``make test``): sized to fit the CI time budget;
* ``full`` (``make torture``, ``EMPATH_TORTURE=full``): the issue's bars
  (20 SIGKILLs over >= 20,000 messages, 1M fuzz inputs, a 1M-unit queue, ...).

Each test prints one figure line through :func:`figure` (``TORTURE <name>: ...``)
and asserts its bar; ``make torture`` runs pytest with ``-s`` so the lines show.
"""

from __future__ import annotations

import os

import pytest

SCALE = os.environ.get("EMPATH_TORTURE", "ci")
if SCALE not in ("ci", "full"):
    raise RuntimeError(f"EMPATH_TORTURE must be 'ci' or 'full', not {SCALE!r}")


def full_scale() -> bool:
    """True when the run was asked for the issue's full bars (`make torture`)."""
    return SCALE == "full"


def pick(ci: int, full: int) -> int:
    """The number for this run's scale."""
    return full if full_scale() else ci


def figure(name: str, text: str) -> None:
    """Print one figure line; `make torture` shows them (pytest -s)."""
    print(f"\nTORTURE {name} [{SCALE}]: {text}", flush=True)


@pytest.fixture
def scale() -> str:
    return SCALE
