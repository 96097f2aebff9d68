"""One delivery attempt of one unit: walk the route, send once, classify per recipient.

Theory of operation
-------------------
:func:`attempt_delivery` gets the unit's route (MX targets in the order routing
chose, each with its addresses), the envelope, the recipients still pending and
the body.  It takes a pooled connection to the first target when one is idle,
else opens one, trying **every address of every target in order** and moving
on after:

* a connect failure or timeout, a TLS failure (``require_tls``), a 4xx greeting
  or EHLO refusal (DESIGN §4: "Try the next MX host/address on connect failure,
  timeout or 4xx greeting");
* a **5xx greeting** as well.  Decision (as Postfix's ``smtp_skip_5xx_greeting``
  default): a server that will not talk to us at all says nothing about the
  recipients, so the next MX gets its chance.  Only when *every* host failed
  permanently is the unit-level error permanent; one temporary failure among
  them makes it temporary.

The first host that completes the session setup takes the transaction, and its
per-recipient verdicts are final for this attempt (no other MX is tried for a
4xx RCPT: that is the runner's retry).

Two small recoveries keep reuse and opportunistic TLS safe:

* a reused connection that dies before answering anything was stale (closed by
  the server while idle); the message is sent again on a fresh connection;
* a failed *opportunistic* TLS handshake is retried once in plaintext on the
  same address (as Postfix does), because unverified TLS is only ever a bonus.

The result has one :class:`~empath.delivery.classify.RecipientOutcome` per
recipient, the MX that was used and, when no recipient was delivered, a
unit-level error (Temporary or Permanent) for the runner, the circuit breaker and
attempt history.

Not frozen, against the house style: ``_Sent`` (one per delivery attempt). Why, and what
stands in for frozen: DESIGN §15.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from empath.delivery.classify import (
    AttemptResult,
    HostFailure,
    OutcomeKind,
    RecipientOutcome,
    outcome_from_reply,
)
from empath.errors import (
    DeliveryError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
    TlsHandshakeError,
)
from empath.logs import get_logger
from empath.smtp.client import LocalVerdict, OutboundTransaction, TransactionResult
from empath.smtp.replies import Reply
from empath.spool.model import Envelope
from empath.transport.outbound import (
    BodySource,
    OutboundConnection,
    OutboundTimeouts,
    PoolKey,
    TlsMode,
    tls_mode_for,
)
from empath.transport.pool import ConnectionPool

log = get_logger("delivery", __name__)


class RouteTarget(Protocol):
    """One MX host to try: its name, port and resolved addresses (in order)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def addresses(self) -> Sequence[str]: ...


@dataclass(frozen=True, slots=True)
class Target:
    """A plain :class:`RouteTarget`; empty ``addresses`` means "connect by name"."""

    host: str
    port: int = 25
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AttemptSettings:
    """What an attempt needs from the config (global merged with the domain's)."""

    hostname: str  # our EHLO name
    timeouts: OutboundTimeouts
    require_tls: bool
    accept_invalid_certs: bool
    tls_ca_file: str | None = None  # extra trust anchors (tests, private CAs)
    pool_wait_s: float = 30.0  # longest wait for a free pooled connection


def _outcomes(result: TransactionResult, mx: str) -> tuple[RecipientOutcome, ...]:
    out = []
    refused = result.refused_at_rcpt
    for i, (address, verdict) in enumerate(result.verdicts):
        if isinstance(verdict, Reply):
            out.append(outcome_from_reply(address, verdict, mx, at_rcpt=i in refused))
        else:
            out.append(_local_outcome(address, verdict, mx))
    return tuple(out)


def _local_outcome(address: str, verdict: LocalVerdict, mx: str) -> RecipientOutcome:
    kind = OutcomeKind.PERMANENT if verdict.permanent else OutcomeKind.TEMPORARY
    return RecipientOutcome(address, kind, None, verdict.enhanced, verdict.text, mx)


def _unit_error(outcomes: tuple[RecipientOutcome, ...], mx: str) -> DeliveryError | None:
    """None when something was delivered; else the first temporary (or permanent) outcome."""
    if any(o.delivered for o in outcomes):
        return None
    pick = next((o for o in outcomes if o.temporary), outcomes[0])
    cls = PermanentDeliveryError if pick.permanent else TemporaryDeliveryError
    return cls(pick.diagnostic, code=pick.code, enhanced=pick.enhanced, mx=mx)


def _all_failed_error(failures: list[HostFailure]) -> DeliveryError:
    if not failures:
        return TemporaryDeliveryError("no MX host to deliver to", enhanced="4.4.4")
    if all(f.error.permanent for f in failures):
        return failures[0].error
    return next(f.error for f in reversed(failures) if not f.error.permanent)


def _stale(result: TransactionResult) -> bool:
    return not result.replied and all(isinstance(v, LocalVerdict) for _, v in result.verdicts)


@dataclass(slots=True, init=False, unsafe_hash=True)  # not frozen: see the module doc
class _Sent:
    """One transaction's result and the facts of the connection that carried it."""

    result: TransactionResult
    tls: bool
    tls_session: tuple[str, str]
    address: str
    reused: bool

    # written out (init=False): compiled, it runs natively (module doc)
    def __init__(
        self,
        result: TransactionResult,
        tls: bool,
        tls_session: tuple[str, str],
        address: str,
        reused: bool,
    ) -> None:
        self.result = result
        self.tls = tls
        self.tls_session = tls_session
        self.address = address
        self.reused = reused


def _opener(
    pool: ConnectionPool, key: PoolKey, address: str, settings: AttemptSettings
) -> Callable[[], Awaitable[OutboundConnection]]:
    def open_connection() -> Awaitable[OutboundConnection]:
        return OutboundConnection.open(
            key,
            address=address,
            local_hostname=settings.hostname,
            timeouts=settings.timeouts,
            tls_contexts=pool.tls_contexts,
            clock=pool.clock,
            tls_ca_file=settings.tls_ca_file,
        )

    return open_connection


async def _transact(
    pool: ConnectionPool,
    key: PoolKey,
    address: str,
    settings: AttemptSettings,
    txn: OutboundTransaction,
    body: BodySource,
) -> _Sent:
    """One transaction over a pooled connection of ``key``.  A pooled session that died
    while idle (nothing but local verdicts, no reply) is closed and the transaction
    sent once more on a freshly opened one."""
    opener = _opener(pool, key, address, settings)
    sent = await _transact_once(pool, key, address, settings, txn, body, opener, fresh=False)
    if sent is None:
        sent = await _transact_once(pool, key, address, settings, txn, body, opener, fresh=True)
        assert sent is not None, "a fresh connection is never stale"
    return sent


async def _transact_once(
    pool: ConnectionPool,
    key: PoolKey,
    address: str,
    settings: AttemptSettings,
    txn: OutboundTransaction,
    body: BodySource,
    opener: Callable[[], Awaitable[OutboundConnection]],
    *,
    fresh: bool,
) -> _Sent | None:
    """One try over a checked-out connection; None when a reused one was stale (closed)."""
    conn = await pool.checkout(key, opener, wait_s=settings.pool_wait_s, fresh=fresh)
    try:
        result = await conn.send(txn, body)
        sent = None
        if conn.reused and _stale(result):
            conn.close()
        else:
            sent = _Sent(
                result, conn.tls_active, conn.tls_session, conn.peer_address or address, conn.reused
            )
    except BaseException:
        pool.release(conn, failed=True)
        raise
    pool.release(conn)
    return sent


async def attempt_delivery(
    targets: Sequence[RouteTarget],
    envelope: Envelope,
    recipients: Sequence[str],
    body: BodySource,
    *,
    settings: AttemptSettings,
    pool: ConnectionPool,
) -> AttemptResult:
    """Try to hand ``recipients`` of the message to the first willing target.

    Never raises for remote or network trouble: failures are in the result.
    ``body`` is the stored body (bytes) or a factory of async chunk iterators
    (e.g. ``lambda: spool.iter_body(msg_id)``), called once per transaction try.
    """
    rcpts = tuple(recipients)
    txn = OutboundTransaction(
        sender=envelope.sender,
        recipients=rcpts,
        size=envelope.size,
        body_8bit=envelope.body_8bit,
        smtputf8=envelope.smtputf8,
    )
    mode = tls_mode_for(settings.require_tls, settings.accept_invalid_certs)
    failures: list[HostFailure] = []
    for target in targets:
        host = target.host.rstrip(".").lower()
        key = PoolKey(host, target.port, mode)
        for address in tuple(target.addresses) or ("",):
            label = f"{host}[{address or host}]:{target.port}"
            try:
                try:
                    sent = await _transact(pool, key, address, settings, txn, body)
                except TlsHandshakeError as exc:
                    if mode is not TlsMode.OPPORTUNISTIC:
                        raise
                    log.info(
                        "TLS handshake failed, retrying in plaintext", mx=label, error=exc.text
                    )
                    plain = PoolKey(host, target.port, TlsMode.NONE)
                    sent = await _transact(pool, plain, address, settings, txn, body)
            except DeliveryError as exc:
                failures.append(HostFailure(label, exc))
                log.debug("MX host skipped", mx=label, error=exc.text)
                continue
            outcomes = _outcomes(sent.result, host)
            tls_version, tls_cipher = sent.tls_session
            return AttemptResult(
                outcomes=outcomes,
                mx=host,
                address=sent.address,
                port=target.port,
                error=_unit_error(outcomes, host),
                tls=sent.tls,
                tls_version=tls_version,
                tls_cipher=tls_cipher,
                reused=sent.reused,
                failures=tuple(failures),
            )
    return replace(
        AttemptResult.failed(rcpts, _all_failed_error(failures)), failures=tuple(failures)
    )
