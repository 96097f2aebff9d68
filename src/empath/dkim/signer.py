"""The DKIM acceptance step: sign once, at acceptance, before the 250 (DESIGN §12).

Runs in the ``DKIM`` stage of the end-of-data pipeline (transport/acceptance.py),
after modules, milters and the submission From: check, so it signs the bytes that
are spooled and later sent - never again per delivery attempt.  Only mail from a
trusted network (``relay.trusted_networks``) or an authenticated client
(``auth_user``) is signed: anyone else could have Empath sign their forgeries.

Where the work runs: choosing the domain and selectors (dkim/policy.py) on the event
loop; canonicalising, hashing (dkim/sign.py, compiled with mypyc) and the private-key
operations (RSA-2048 ~0.25 ms of CPU, Ed25519 ~30 µs) in the DKIM key process
(dkim/keyproc.py: a child with its own interpreter, fed the header fields and body
through a pipe, one write and one read per event-loop turn for all the messages
finishing in it; it sends back the finished fields).  A body over 64 KiB is
canonicalised, hashed and signed on a pool thread instead (about 4 µs per KiB: a
5 MiB body would hold the key process ~20 ms, and every message behind it).
Measured (bench/dkim, compiled build, 2-vCPU VM, docs/bench.md "DKIM signing: key
process"): a 2-thread pool with one hand-over per message cost the loop thread more
CPU than the key operations it moved (GIL hand-overs); a batching key thread was
better, the key process better again (dual signing ~880 msg/s against ~630 with the
pool, no DKIM ~1,400); Ed25519 on the loop was no cheaper than in the process.
Canonicalising and hashing in the child as well took ~50 µs per dual-signed message
off the loop thread (docs/bench.md "DKIM dual signing").
A signing failure answers ``451 4.3.0`` (the client retries; nothing is spooled) and
counts ``empath_dkim_signatures_total{result="error"}``.

The key table is swapped whole (:meth:`DkimSigner.install`) on reload and after a
rotation step; a message in progress keeps the table it started with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from empath.clock import Clock
from empath.dkim.keyproc import KeyProcess
from empath.dkim.policy import EMPTY_TABLE, KeyTable, Plan, plan
from empath.dkim.sign import SignSpec, Unsigned, key_op, prepare, signature_field
from empath.logs import get_logger
from empath.smtp.replies import Reply
from empath.stats import DomainLabels, Histogram
from empath.transport.acceptance import AcceptedMessage, HeaderField, Later, Stage

log = get_logger("smtp", __name__)

R_SIGN_FAILED: Final = Reply.of(451, "4.3.0", "DKIM signing failed, try again later")
# (not Final: mypyc 1.x left a Final tuple of floats unset in the compiled module)
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

KeyOp = Callable[[Unsigned], bytes]

# Canonicalising and hashing cost about 4 µs per KiB on a quiet core: past 64 KiB
# (~0.25 ms) the whole signature is made on the pool, not only the key operation.
INLINE_BODY_BYTES: Final = 64 * 1024


class Where(enum.Enum):
    """Where one message's signing work runs (module doc)."""

    ALL_ON_LOOP = "all-on-loop"  # everything on the loop (slower; for benches and tests)
    KEY_PROCESS = "key-process"  # everything in the key process
    ALL_IN_POOL = "all-in-pool"  # big body: everything in a pool thread


def where(specs: Sequence[SignSpec], body_bytes: int) -> Where:
    if body_bytes > INLINE_BODY_BYTES:
        return Where.ALL_IN_POOL
    return Where.KEY_PROCESS


class KeyOps(Protocol):
    """Where signatures are made off the loop: :class:`KeyProcess` (the daemon's)."""

    def sign(
        self, fields: Sequence[bytes], body: bytes, specs: Sequence[SignSpec], now: int
    ) -> asyncio.Future[list[bytes]]: ...

    def close(self) -> None: ...


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
        key_op_fn: KeyOp = key_op,
        decide: Callable[[Sequence[SignSpec], int], Where] = where,
        keys: KeyOps | None = None,
    ) -> None:
        self._clock = clock
        self.stats = stats
        self.table = table
        self._key_op = key_op_fn
        self._where = decide
        self._keys: KeyOps = KeyProcess() if keys is None else keys
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # big bodies

    @property
    def enabled(self) -> bool:
        return bool(self.table.domains)

    def install(self, table: KeyTable) -> None:
        self.table = table

    def close(self) -> None:
        self._keys.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, message: AcceptedMessage) -> Reply | None:
        """The step as a coroutine (a pipeline with steps that wait, e.g. milters)."""
        answer = self.run_soon(message)
        if not isinstance(answer, Later):
            return answer
        await asyncio.wait((answer.future,))
        return answer.finish(answer.future)

    def run_soon(self, message: AcceptedMessage) -> Reply | Later | None:
        """The step without a task (acceptance.py ``run_soon``): ``None`` when there is
        nothing to sign, else a :class:`Later` whose future the key process (or the
        big-body pool) finishes; a failure to even start is answered 451 at once."""
        facts = message.facts
        if not facts.trusted and facts.auth_user is None:
            return None
        now = self._clock.now()
        what = plan(self.table, message.header_values("From"), _signatures(message), now)
        if what is None:
            return None
        for sk in what.skipped:
            self.stats.count(what.domain, sk.algorithm, "skipped")
        if not what.specs:
            return None
        started = self._clock.monotonic()
        fields = [f.raw for f in message.headers]
        body = message.body
        now_s = int(now)
        try:
            place = self._where(what.specs, len(body))
            if place is Where.KEY_PROCESS:
                fut = self._keys.sign(fields, body, what.specs, now_s)
            elif place is Where.ALL_ON_LOOP:
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(self._sign_all(fields, body, what.specs, now_s))
            else:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        1, thread_name_prefix="dkim-big"
                    )
                fut = asyncio.get_running_loop().run_in_executor(
                    self._pool, self._sign_all, fields, body, what.specs, now_s
                )
        except Exception as exc:
            return self._failed(message, what, exc)
        return Later(fut, functools.partial(self._finish, message, what, started))

    def _finish(
        self, message: AcceptedMessage, what: Plan, started: float, fut: asyncio.Future[Any]
    ) -> Reply | None:
        """The signatures are made (or failed): prepend them, count, or answer 451."""
        try:
            signatures: list[bytes] = fut.result()
        except (Exception, asyncio.CancelledError) as exc:
            return self._failed(message, what, exc)
        stats = self.stats
        stats.duration.observe(self._clock.monotonic() - started)
        for spec in what.specs:
            stats.count(what.domain, spec.algorithm, "ok", spec.selector)
        # on top, in the configured order (RFC 6376 §5.6: prepended to the header)
        message.headers[:0] = [HeaderField(sig) for sig in signatures]
        message.log_fields["dkim_domain"] = what.domain
        message.log_fields["dkim_selectors"] = _names(what.specs)
        return None

    def _failed(self, message: AcceptedMessage, what: Plan, exc: BaseException) -> Reply:
        for spec in what.specs:
            self.stats.count(what.domain, spec.algorithm, "error")
        log.error(
            "DKIM signing failed, message refused", message_id=message.id,
            dkim_domain=what.domain, dkim_selectors=_names(what.specs),
            error=repr(exc), smtp_code="451", peer=message.facts.peer,
        )  # fmt: skip
        return R_SIGN_FAILED

    def _sign_all(
        self, fields: Sequence[bytes], body: bytes, specs: Sequence[SignSpec], now: int
    ) -> list[bytes]:
        op = self._key_op
        return [signature_field(u, op(u)) for u in prepare(fields, body, specs, now)]


_DKIM_SIGNATURE: Final = b"dkim-signature"


def _signatures(message: AcceptedMessage) -> list[str]:
    """The message's DKIM-Signature values (nearly always none: checked without decoding)."""
    for f in message.headers:
        if f.raw[:14].lower() == _DKIM_SIGNATURE:
            return message.header_values("DKIM-Signature")
    return []


def _names(specs: Sequence[SignSpec]) -> str:
    return ",".join(s.selector for s in specs)
