"""The DKIM acceptance step: sign once, at acceptance, before the 250 (DESIGN §12).

Runs in the ``DKIM`` stage of the end-of-data pipeline (transport/acceptance.py),
after modules, milters and the submission From: check, so it signs the bytes that
are spooled and later sent - never again per delivery attempt.  Only mail from a
trusted network (``relay.trusted_networks``) or an authenticated client
(``auth_user``) is signed: anyone else could have Empath sign their forgeries.

Where the work runs: a signature whose estimated cost (:func:`estimate_us`) is under
``OFFLOAD_ABOVE_US`` (0.5 ms) is made on the event loop; a dearer one (RSA keys above
2048 bits, big bodies: canonicalising and hashing a 5 MiB body takes tens of ms) goes to
a small thread pool, and the session waits for it without holding the loop.  Why not
always the pool: on this 2-core VM a hand-over to a worker thread and back cost the
loop thread more than an Ed25519 signature (GIL hand-offs; bench/dkim, numbers in the
closing note), and the per-message parts in Python (canonicalisation, header hashing)
hold the GIL wherever they run.  The estimate uses costs measured on a quiet core:
RSA-2048 about 0.3 ms (``cryptography``/OpenSSL; dkimpy's pure-Python RSA would take
6.6 ms), Ed25519 about 0.06 ms, canonicalising and hashing about 4 µs per KiB.
A signing failure answers ``451 4.3.0`` (the client retries; nothing is spooled) and
counts ``empath_dkim_signatures_total{result="error"}``.

The key table is swapped whole (:meth:`DkimSigner.install`) on reload and after a
rotation step; a message in progress keeps the table it started with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Final

from cryptography.hazmat.primitives.asymmetric import rsa

from empath.clock import Clock
from empath.dkim.policy import EMPTY_TABLE, KeyTable, plan
from empath.dkim.sign import SignSpec, sign
from empath.logs import get_logger
from empath.smtp.replies import Reply
from empath.stats import DomainLabels, Histogram
from empath.transport.acceptance import AcceptedMessage, HeaderField, Stage

log = get_logger("smtp", __name__)

R_SIGN_FAILED: Final = Reply.of(451, "4.3.0", "DKIM signing failed, try again later")
DURATION_BUCKETS_S: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

SignFn = Callable[[Sequence[bytes], bytes, Sequence[SignSpec], int], list[bytes]]

OFFLOAD_ABOVE_US: Final = 500.0  # the "~0.5 ms": dearer signing leaves the loop
_RSA_US: Final = {1024: 60.0, 2048: 300.0, 3072: 900.0, 4096: 2000.0}


def estimate_us(specs: Sequence[SignSpec], body_bytes: int) -> float:
    """Rough cost of signing on a quiet core (module doc); decides loop vs pool."""
    us = 40.0 + body_bytes * (4.0 / 1024)
    for spec in specs:
        key = spec.key
        if isinstance(key, rsa.RSAPrivateKey):
            bits = key.key_size
            us += _RSA_US.get(bits, 2000.0 * (bits / 4096) ** 3)
        else:
            us += 60.0
    return us


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
        sign_fn: SignFn = sign,
        workers: int = 2,
        offload_above_us: float = OFFLOAD_ABOVE_US,
    ) -> None:
        self._clock = clock
        self.stats = stats
        self.table = table
        self._sign = sign_fn
        self._offload_above_us = offload_above_us
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
        try:
            if estimate_us(what.specs, len(body)) <= self._offload_above_us:
                signatures = self._sign(fields, body, what.specs, int(now))
            else:
                loop = asyncio.get_running_loop()
                signatures = await loop.run_in_executor(
                    self._pool, self._sign, fields, body, what.specs, int(now)
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


def _names(specs: Sequence[SignSpec]) -> str:
    return ",".join(s.selector for s in specs)
