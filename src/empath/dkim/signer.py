"""The DKIM acceptance step: sign once, at acceptance, before the 250 (DESIGN §12).

Runs in the ``DKIM`` stage of the end-of-data pipeline (transport/acceptance.py),
after modules, milters and the submission From: check, so it signs the bytes that
are spooled and later sent - never again per delivery attempt.  Only mail from a
trusted network (``relay.trusted_networks``) or an authenticated client
(``auth_user``) is signed: anyone else could have Empath sign their forgeries.

Where the work runs: choosing the domain and selectors (dkim/policy.py) on the event
loop; canonicalising, hashing (dkim/sign.py, compiled with mypyc) and the private-key
operations (RSA-2048 ~0.25 ms of CPU, Ed25519 ~30 µs) in the DKIM key process
(dkim/keyproc.py: a child with its own interpreter, fed each message through a pipe,
one write per event-loop turn for all the messages finishing in it; it sends back the
finished fields).  A message no step has split goes as received (policy.py
``scan_raw`` reads its ``From:``) and the fields come back joined, to be put in front of
its bytes: nothing is split or re-joined on the loop.  A body over 64 KiB is
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
from empath.dkim.policy import EMPTY_TABLE, KeyTable, Plan, plan, scan_raw
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

    def sign_raw(
        self, raw: bytes, head: int, specs: Sequence[SignSpec], now: int
    ) -> asyncio.Future[bytes]: ...

    def close(self) -> None: ...


class DkimStats:
    """What the signer counts; read by the metrics collector and ``dkim list``."""

    __slots__ = ("_by_selector", "_made", "_signatures", "domains", "duration")

    def __init__(self, domains: DomainLabels) -> None:
        self.domains = domains  # the runner's: one cap for every domain label
        # (domain label, algorithm, result) -> count; result: ok | error | skipped
        self._signatures: dict[tuple[str, str, str], int] = {}
        self.duration = Histogram(DURATION_BUCKETS_S)
        self._by_selector: dict[tuple[str, str], int] = {}  # signatures made, uncapped
        # id(plan) -> messages signed by it not yet added above (one increment per
        # message on the hot path; added up when read)
        self._made: dict[int, _Made] = {}

    @property
    def signatures(self) -> dict[tuple[str, str, str], int]:
        self._add_made()
        return self._signatures

    @property
    def by_selector(self) -> dict[tuple[str, str], int]:
        self._add_made()
        return self._by_selector

    def count(
        self, domain: str, algorithm: str, result: str, selector: str = "", n: int = 1
    ) -> None:
        key = (self.domains(domain), algorithm, result)
        self._signatures[key] = self._signatures.get(key, 0) + n
        if result == "ok":
            ref = (domain, selector)
            self._by_selector[ref] = self._by_selector.get(ref, 0) + n

    def signed(self, plan: Plan) -> None:
        """A message signed with every spec of ``plan``."""
        made = self._made.get(id(plan))
        if made is None or made.plan is not plan:
            if len(self._made) >= 64:  # plans made per message (selector windows)
                self._add_made()
                self._made.clear()
            made = self._made[id(plan)] = _Made(plan)
        made.n += 1

    def _add_made(self) -> None:
        for made in self._made.values():
            if made.n:
                for spec in made.plan.specs:
                    self.count(made.plan.domain, spec.algorithm, "ok", spec.selector, made.n)
                made.n = 0


class _Made:
    __slots__ = ("n", "plan")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan  # kept: its id is not reused while counted
        self.n = 0


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
        decide: Callable[[Sequence[SignSpec], int], Where] | None = None,
        keys: KeyOps | None = None,
    ) -> None:
        self._clock = clock
        self.stats = stats
        self.table = table
        self._key_op = key_op_fn
        self._where = where if decide is None else decide
        self._as_received = decide is None  # a plain message goes to the key process whole
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
        if not self.table.domains:
            return None
        now = self._clock.now()
        raw = message.raw
        scan = None if raw is None or len(raw) > INLINE_BODY_BYTES else scan_raw(raw)
        if scan is not None:  # as received, plain: nothing split on the loop
            what = plan(self.table, scan[1], (), now)
        else:
            what = plan(self.table, message.header_values("From"), _signatures(message), now)
        if what is None:
            return None
        for sk in what.skipped:
            self.stats.count(what.domain, sk.algorithm, "skipped")
        if not what.specs:
            return None
        started = self._clock.monotonic()
        now_s = int(now)
        try:
            if scan is not None and raw is not None and self._as_received:
                fut: asyncio.Future[Any] = self._keys.sign_raw(raw, scan[0], what.specs, now_s)
            else:
                fut = self._start(message, what.specs, now_s)
        except Exception as exc:
            return self._failed(message, what, exc)
        return Later(fut, functools.partial(self._finish, message, what, started))

    def _start(
        self, message: AcceptedMessage, specs: Sequence[SignSpec], now_s: int
    ) -> asyncio.Future[Any]:
        """Sign the split message where :func:`where` says (a future of the fields)."""
        fields = [f.raw for f in message.headers]
        body = message.body
        place = self._where(specs, len(body))
        if place is Where.KEY_PROCESS:
            return self._keys.sign(fields, body, specs, now_s)
        if place is Where.ALL_ON_LOOP:
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(self._sign_all(fields, body, specs, now_s))
            return fut
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dkim-big")
        return asyncio.get_running_loop().run_in_executor(
            self._pool, self._sign_all, fields, body, specs, now_s
        )

    def _finish(
        self, message: AcceptedMessage, what: Plan, started: float, fut: asyncio.Future[Any]
    ) -> Reply | None:
        """The signatures are made (or failed): prepend them, count, or answer 451."""
        try:
            signatures: bytes | list[bytes] = fut.result()
        except (Exception, asyncio.CancelledError) as exc:
            return self._failed(message, what, exc)
        stats = self.stats
        stats.duration.observe(self._clock.monotonic() - started)
        stats.signed(what)
        # on top, in the configured order (RFC 6376 §5.6: prepended to the header)
        if isinstance(signatures, bytes):  # sign_raw: the fields joined, message unsplit
            message.prepend_fields(signatures)
        else:
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
