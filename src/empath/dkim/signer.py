"""The DKIM acceptance step: sign once, at acceptance, before the 250 (DESIGN §12).

Runs in the ``DKIM`` stage of the end-of-data pipeline (transport/acceptance.py),
after modules, milters and the submission From: check, so it signs the bytes that
are spooled and later sent - never again per delivery attempt.  Only mail from a
trusted network (``relay.trusted_networks``) or an authenticated client
(``auth_user``) is signed: anyone else could have Empath sign their forgeries.

Where the work runs: the per-message Python (choosing the domain and selectors,
canonicalising, hashing the signed fields: dkim/sign.py, compiled with mypyc) on the
event loop; RSA's private-key operation (~0.25 ms of CPU for RSA-2048) on one key
thread (:class:`KeyThread`; ``cryptography`` releases the GIL while OpenSSL signs, so
it uses the second core), which takes the jobs queued since its last pass as one
batch and answers them with one loop wake-up; Ed25519's (~30 µs) on the loop, while
the key thread makes the RSA one.  A body over 64 KiB is canonicalised and hashed on
a pool thread too (about 4 µs per KiB: a 5 MiB body would hold the loop ~20 ms).
Measured (bench/dkim, compiled build, quiet 2-vCPU VM, docs/bench.md "DKIM signing on
a quiet machine"): a 2-thread pool with one hand-over per message cost the loop more
than the key operations it moved; the batching thread relays dual-signed mail ~35 %
faster than it did.  Ed25519 alone stays on the loop: moving its key operation to the
thread did not lower the loop's CPU per message (the hand-over costs as much as the
~30 µs it saves).
A signing failure answers ``451 4.3.0`` (the client retries; nothing is spooled) and
counts ``empath_dkim_signatures_total{result="error"}``.

The key table is swapped whole (:meth:`DkimSigner.install`) on reload and after a
rotation step; a message in progress keeps the table it started with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import threading
from collections.abc import Callable, Sequence
from typing import Final

from empath.clock import Clock
from empath.dkim.policy import EMPTY_TABLE, KeyTable, plan
from empath.dkim.sign import SignSpec, Unsigned, key_op, prepare, signature_field
from empath.logs import get_logger
from empath.smtp.replies import Reply
from empath.stats import DomainLabels, Histogram
from empath.transport.acceptance import AcceptedMessage, HeaderField, Stage

log = get_logger("smtp", __name__)

R_SIGN_FAILED: Final = Reply.of(451, "4.3.0", "DKIM signing failed, try again later")
DURATION_BUCKETS_S: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

KeyOp = Callable[[Unsigned], bytes]

# Canonicalising and hashing cost about 4 µs per KiB on a quiet core: past 64 KiB
# (~0.25 ms) the whole signature is made on the pool, not only the key operation.
INLINE_BODY_BYTES: Final = 64 * 1024
ED25519: Final = "ed25519-sha256"


class Where(enum.Enum):
    """Where one message's signing work runs (module doc)."""

    ALL_ON_LOOP = "all-on-loop"  # Ed25519 only (~30 µs of CPU): cheaper than a hand-over
    KEY_IN_POOL = "key-in-pool"  # on the loop but RSA's key operation: on the key thread
    ALL_IN_POOL = "all-in-pool"  # big body: everything in the pool


def where(specs: Sequence[SignSpec], body_bytes: int) -> Where:
    if body_bytes > INLINE_BODY_BYTES:
        return Where.ALL_IN_POOL
    if all(s.algorithm == ED25519 for s in specs):
        return Where.ALL_ON_LOOP
    return Where.KEY_IN_POOL


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[list[bytes]]", Sequence[Unsigned]]
_Done = tuple["asyncio.Future[list[bytes]]", list[bytes] | None, Exception | None]


class KeyThread:
    """One thread making private-key signatures in batches.

    The event loop queues a message's key operations and awaits a future; the thread
    takes every job queued since its last pass, signs them (OpenSSL releases the GIL
    while it works, so this runs on the other core), and hands all the results back
    with one ``call_soon_threadsafe``.  Under load that is one wake-up of each side per
    batch, not per message: a thread pool's per-call hand-over cost the loop more than
    the Ed25519 operation it moved (module doc)."""

    __slots__ = ("_closed", "_jobs", "_key_op", "_lock", "_thread", "_wake")

    def __init__(self, op: KeyOp) -> None:
        self._key_op = op
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: list[_Job] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    def sign(self, pending: Sequence[Unsigned]) -> asyncio.Future[list[bytes]]:
        """The raw signatures of ``pending``, in order (a future of the running loop)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[bytes]] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the DKIM key thread is closed")
            self._jobs.append((loop, fut, pending))
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="dkim-keys",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            elif len(self._jobs) == 1:
                self._wake.notify()
        return fut

    def close(self) -> None:
        """Let the thread finish what is queued and end."""
        with self._lock:
            self._closed = True
            self._wake.notify()

    def _main(self) -> None:
        op = self._key_op
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if not self._jobs:
                    return
                jobs, self._jobs = self._jobs, []
            by_loop: dict[asyncio.AbstractEventLoop, list[_Done]] = {}
            for loop, fut, pending in jobs:
                done: _Done
                try:
                    done = (fut, [op(u) for u in pending], None)
                except Exception as exc:
                    done = (fut, None, exc)
                by_loop.setdefault(loop, []).append(done)
            for loop, results in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, results)
                except RuntimeError:  # that loop is closed: nobody waits any more
                    pass


def _deliver(results: list[_Done]) -> None:
    for fut, signatures, exc in results:
        if fut.done():  # cancelled: the pipeline timed out
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            assert signatures is not None
            fut.set_result(signatures)


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
    ) -> None:
        self._clock = clock
        self.stats = stats
        self.table = table
        self._key_op = key_op_fn
        self._where = decide
        self._keys = KeyThread(key_op_fn)
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
                signatures = self._sign_all(fields, body, what.specs, now_s)
            elif place is Where.KEY_IN_POOL:
                signatures = await self._sign_split(fields, body, what.specs, now_s)
            else:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        1, thread_name_prefix="dkim-big"
                    )
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
        op = self._key_op
        return [signature_field(u, op(u)) for u in prepare(fields, body, specs, now)]

    async def _sign_split(
        self, fields: Sequence[bytes], body: bytes, specs: Sequence[SignSpec], now: int
    ) -> list[bytes]:
        """Canonicalise and hash here; RSA on the key thread while Ed25519 signs here."""
        pending = prepare(fields, body, specs, now)
        fut = self._keys.sign([u for u in pending if u.spec.algorithm != ED25519])
        op = self._key_op
        try:
            ed = [op(u) for u in pending if u.spec.algorithm == ED25519]
        except BaseException:
            fut.cancel()  # nobody will await it
            raise
        rsa_sigs = iter(await fut)
        ed_sigs = iter(ed)
        out = []
        for u in pending:
            is_ed = u.spec.algorithm == ED25519
            out.append(signature_field(u, next(ed_sigs if is_ed else rsa_sigs)))
        return out


def _names(specs: Sequence[SignSpec]) -> str:
    return ",".join(s.selector for s in specs)
