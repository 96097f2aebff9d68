"""The DKIM acceptance step: sign once, at acceptance, before the 250 (DESIGN §12).

Runs in the ``DKIM`` stage of the end-of-data pipeline (transport/acceptance.py),
after modules, milters and the submission From: check, so it signs the bytes that
are spooled and later sent - never again per delivery attempt.  Only mail from a
trusted network (``relay.trusted_networks``) or an authenticated client
(``auth_user``) is signed: anyone else could have Empath sign their forgeries.

The private-key work runs on a small thread pool, not on the event loop: measured
here (bench/dkim, a loaded 2-core VM) an RSA-2048 signature with its
canonicalisation costs 0.45-1.8 ms, over the ~0.5 ms a session's turn may take, and
``cryptography`` releases the GIL while OpenSSL signs, so other sessions go on
meanwhile.  A signing failure answers ``451 4.3.0`` (the client retries; nothing is
spooled) and counts ``empath_dkim_signatures_total{result="error"}``.

The key table is swapped whole (:meth:`DkimSigner.install`) on reload and after a
rotation step; a message in progress keeps the table it started with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Final

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
    ) -> None:
        self._clock = clock
        self.stats = stats
        self.table = table
        self._sign = sign_fn
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
        try:
            loop = asyncio.get_running_loop()
            signatures = await loop.run_in_executor(
                self._pool, self._sign, fields, message.body, what.specs, int(now)
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
