"""When the group-commit writer should hold a small batch open for more requests.

Theory of operation.  The spool writer (writer.py) takes every queued record, writes
them with one O_DSYNC ``pwrite`` and hands the batch back to the event loop.  Each
batch has a fixed cost wherever it runs: the writer thread wakes and takes the GIL,
the kernel commits the journal once, and the loop wakes once to resolve the batch.
When a node's load halves (two nodes sharing a port on one host), its batches halve
and that fixed cost is spread over half as many messages.

Databases answer this with a commit delay (PostgreSQL ``commit_delay``, MySQL
``binlog_group_commit_sync_delay``): before the sync, wait a short, bounded time if
more commits are likely to join.  :class:`CommitDelay` makes that decision from what
the writer has seen, with the time passed in (no clock of its own):

- :meth:`taken` records, at the start of each writer cycle, how many records the
  previous cycle took; the gap between records (cycle time / records) is averaged
  (EWMA; a sample counts as at most ten ``max_hold_s``, so a quiet spell is
  forgotten within a dozen busy cycles).  Held records count too, so holding never
  makes the rate look lower.
- :meth:`wrote` records how long a write (with its sync) took, also averaged.
- :meth:`hold_s` answers how long to wait for more: nothing when the batch already
  has ``target`` records or no rate is known yet; otherwise the time the missing
  records should take, bounded by ``max_hold_s`` and by ``write_share`` of an average
  write (a 250 waits at most that much longer than the sync it waits for) - and
  nothing after all when fewer than ``MIN_JOINS`` records are expected within that
  time (a quiet spool never waits) or the hold is shorter than ``MIN_HOLD_S``.

Why it pays (measured, docs/bench.md "Cores, round two"): each batch costs the writer
thread ~45-65 µs of kernel CPU in its O_DSYNC append alone on the reference VM, plus
the wake-ups of the writer and of the loop; records are ~1 per ingested message.  With
``commit_delay_us: 300`` one node taking 2,400 msg/s (open loop) wrote 0.39 instead of
0.86 batches per message, woke its loop 2.5 instead of 4.3 times, and spent 218
instead of 297 µs of CPU per message; the 250 waits up to the hold longer.  Off by
default: a closed-loop client (smtp-source) gained no CPU and lost some msg/s to the
extra wait.

The writer stops waiting as soon as the batch reaches ``target`` records.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_HOLD_S = 20e-6  # a shorter wait costs more in the timed wake-up than it can save
MIN_JOINS = 0.25  # hold only if at least this many records are expected to join
_ALPHA = 0.25  # weight of the newest sample in the averages
_GAP_CAP = 10  # a gap sample counts as at most this many max_hold_s


@dataclass(slots=True)
class CommitDelay:
    """The writer's hold decision (pure; every time is passed in, in seconds)."""

    max_hold_s: float = 200e-6
    target: int = 4  # records in a batch at which holding stops
    write_share: float = 1.5  # a hold is at most this share of an average write
    gap_s: float | None = None  # average time between records (None: not known yet)
    write_s: float | None = None  # average duration of one write with its sync
    _cycle_at: float | None = None

    def taken(self, now: float, records: int) -> None:
        """A writer cycle starts at ``now``; the previous cycle took ``records``."""
        if self._cycle_at is not None and records > 0:
            # an idle spell counts as a long gap, not as an endless one
            sample = min((now - self._cycle_at) / records, _GAP_CAP * self.max_hold_s)
            gap = self.gap_s
            self.gap_s = sample if gap is None else gap + _ALPHA * (sample - gap)
        self._cycle_at = now

    def wrote(self, seconds: float) -> None:
        """One batch's write and sync took ``seconds``."""
        w = self.write_s
        self.write_s = seconds if w is None else w + _ALPHA * (seconds - w)

    def hold_s(self, batch: int) -> float:
        """How long to wait for more records before writing ``batch`` records (0: now)."""
        gap, write = self.gap_s, self.write_s
        if batch >= self.target or gap is None or write is None:
            return 0.0
        hold = min(gap * (self.target - batch), self.max_hold_s, write * self.write_share)
        if hold < MIN_HOLD_S or hold < MIN_JOINS * gap:
            return 0.0  # too short to pay for its wake-up, or nothing likely to join
        return hold
