"""The DKIM acceptance step: sign once, at acceptance, before the 250 (DESIGN §12).

Runs in the ``DKIM`` stage of the end-of-data pipeline (transport/acceptance.py),
after modules, milters and the submission From: check, so it signs the bytes that
are spooled and later sent - never again per delivery attempt.  Only mail from a
trusted network (``relay.trusted_networks``) or an authenticated client
(``auth_user``) is signed: anyone else could have Empath sign their forgeries.

Where the work runs: the per-message Python (choosing the domain and selectors,
canonicalising with dkimpy, hashing the signed fields) on the event loop, then the
private-key operations on a small thread pool (``cryptography`` releases the GIL while
OpenSSL signs, so they use the second core); a body over 64 KiB is canonicalised and
hashed in the pool too (about 4 µs per KiB: a 5 MiB body would hold the loop ~20 ms).
Measured on this 2-vCPU VM (in-process, smtp-source, 20 sessions, alternating, loaded
by other work): an RSA-2048 signature costs 0.3-1.8 ms - over the issue's ~0.5 ms -
and with the key operation in the pool the listener relayed 360-411 msg/s against
174-270 with it on the loop; even Ed25519 (~0.05-0.1 ms) was faster in the pool
(437-531 vs 251-358 msg/s), the session yielding the loop while it waits.  It costs
more CPU in all (the hand-over), which the closing note reports.  Later (the same
way, ``bench/dkim_pipeline``): RSA with the key operation in the pool 584-648 msg/s
against 316-441 all on the loop, so RSA stays there; a message signed with Ed25519
only is signed entirely on the loop now (its key operation is ~30 µs of CPU, less
than the hand-over and the GIL ping-pong it causes: the in-process profile showed
~120 µs per message in ``SimpleQueue.put`` alone).
A signing failure answers ``451 4.3.0`` (the client retries; nothing is spooled) and
counts ``empath_dkim_signatures_total{result="error"}``.

The key table is swapped whole (:meth:`DkimSigner.install`) on reload and after a
rotation step; a message in progress keeps the table it started with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
from collections.abc import Callable, Sequence
from typing import Final

from empath.clock import Clock
from empath.dkim.policy import EMPTY_TABLE, KeyTable, plan
from empath.dkim.sign import SignSpec, Unsigned, finish, prepare
from empath.logs import get_logger
from empath.smtp.replies import Reply
from empath.stats import DomainLabels, Histogram
from empath.transport.acceptance import AcceptedMessage, HeaderField, Stage

log = get_logger("smtp", __name__)

R_SIGN_FAILED: Final = Reply.of(451, "4.3.0", "DKIM signing failed, try again later")
DURATION_BUCKETS_S: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

FinishFn = Callable[[Sequence[Unsigned]], list[bytes]]

# Canonicalising and hashing cost about 4 µs per KiB on a quiet core: past 64 KiB
# (~0.25 ms) the whole signature is made on the pool, not only the key operation.
INLINE_BODY_BYTES: Final = 64 * 1024


class Where(enum.Enum):
    """Where one message's signing work runs (module doc)."""

    ALL_ON_LOOP = "all-on-loop"  # Ed25519 only (~30 µs of CPU): cheaper than a hand-over
    KEY_IN_POOL = "key-in-pool"  # canonicalise on the loop, key operations in the pool
    ALL_IN_POOL = "all-in-pool"  # big body: everything in the pool


def where(specs: Sequence[SignSpec], body_bytes: int) -> Where:
    if body_bytes > INLINE_BODY_BYTES:
        return Where.ALL_IN_POOL
    if all(s.algorithm == "ed25519-sha256" for s in specs):
        return Where.ALL_ON_LOOP
    return Where.KEY_IN_POOL


class DkimStats:
    """What the signer counts; read by the metrics collector and ``dkim list``."""

    __slots__ = ("by_selector", "domains", "duration", "signatures")

    def __init__(self, domains: DomainLabels) -> None:
        self.domains = domains  # the runner's: one cap for every domain label
        # (domain label, algorithm, result) -> count; result: ok | error | skipped
        self.signatures: dict[tuple[str, str, str], int] = {}
        self.duration = Histogram(DURATION_BUCKETS_S)
        self.by_selector: dict[tuple[str, str], int] = {}  # signatures made, uncapped

    def count(self, domain: str, algorithm: str, result: str, selector: str = "") -> None:
        key = (self.domains(domain), algorithm, result)
        self.signatures[key] = self.signatures.get(key, 0) + 1
        if result == "ok":
            ref = (domain, selector)
            self.by_selector[ref] = self.by_selector.get(ref, 0) + 1


class DkimSigner:
    """The acceptance step (see module doc)."""

    name: Final = "dkim"
    stage: Final = Stage.DKIM

    def __init__(
        self,
        clock: Clock,
        stats: DkimStats,
        *,
        table: KeyTable = EMPTY_TABLE,
        finish_fn: FinishFn = finish,
        workers: int = 2,
        decide: Callable[[Sequence[SignSpec], int], Where] = where,
    ) -> None:
        self._clock = clock
        self.stats = stats
        self.table = table
        self._finish = finish_fn
        self._where = decide
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dkim")

    @property
    def enabled(self) -> bool:
        return bool(self.table.domains)

    def install(self, table: KeyTable) -> None:
        self.table = table

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, message: AcceptedMessage) -> Reply | None:
        facts = message.facts
        if not facts.trusted and facts.auth_user is None:
            return None
        now = self._clock.now()
        what = plan(
            self.table,
            message.header_values("From"),
            message.header_values("DKIM-Signature"),
            now,
        )
        if what is None:
            return None
        stats = self.stats
        for sk in what.skipped:
            stats.count(what.domain, sk.algorithm, "skipped")
        if not what.specs:
            return None
        started = self._clock.monotonic()
        fields = [f.raw for f in message.headers]
        body = message.body
        now_s = int(now)
        try:
            place = self._where(what.specs, len(body))
            if place is Where.ALL_ON_LOOP:
                signatures = self._finish(prepare(fields, body, what.specs, now_s))
            elif place is Where.KEY_IN_POOL:
                pending = prepare(fields, body, what.specs, now_s)
                loop = asyncio.get_running_loop()
                signatures = await loop.run_in_executor(self._pool, self._finish, pending)
            else:
                loop = asyncio.get_running_loop()
                signatures = await loop.run_in_executor(
                    self._pool, self._sign_all, fields, body, what.specs, now_s
                )
        except Exception as exc:
            for spec in what.specs:
                stats.count(what.domain, spec.algorithm, "error")
            log.error(
                "DKIM signing failed, message refused", message_id=message.id,
                dkim_domain=what.domain, dkim_selectors=_names(what.specs),
                error=repr(exc), smtp_code="451", peer=facts.peer,
            )  # fmt: skip
            return R_SIGN_FAILED
        stats.duration.observe(self._clock.monotonic() - started)
        for spec in what.specs:
            stats.count(what.domain, spec.algorithm, "ok", spec.selector)
        # on top, in the configured order (RFC 6376 §5.6: prepended to the header)
        message.headers[:0] = [HeaderField(sig) for sig in signatures]
        message.log_fields["dkim_domain"] = what.domain
        message.log_fields["dkim_selectors"] = _names(what.specs)
        return None

    def _sign_all(
        self, fields: Sequence[bytes], body: bytes, specs: Sequence[SignSpec], now: int
    ) -> list[bytes]:
        return self._finish(prepare(fields, body, specs, now))


def _names(specs: Sequence[SignSpec]) -> str:
    return ",".join(s.selector for s in specs)
