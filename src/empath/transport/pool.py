"""The outbound connection pool: open SMTP sessions per (MX host, port, TLS mode).

Shaped like httpcore's: a delivery asks for a connection and gets one for the length of
a block, and the pool does the rest::

    async with pool.connection(key, opener) as conn:
        result = await conn.send(transaction, body)

The pool reuses a healthy idle connection of ``key`` (the client starts the next message
with MAIL, or RSET after a failure), or calls ``opener()`` for a new one, or waits - up
to ``wait_s`` of the injected :class:`~empath.clock.Clock` - while ``max_per_key`` are
open.  When the block ends the connection goes back: idle if still usable (closed with
QUIT after ``idle_timeout_s`` unused), closed otherwise, and closed at once if the block
raised.  ``fresh=True`` never reuses (the last pooled one turned out to be dead).

The idle timeout is one timer per connection that is not moved on every use (that
cost a timer and a cancellation per relayed message): it is armed when the connection
goes idle without one, and when it fires it closes the connection only if it has been
idle ``idle_timeout_s`` since its last use; otherwise it is armed again for the rest
(or left off while the connection is in use: its next return arms it).

Which of these happens is one synchronous decision, :func:`decide`, over the key's idle
connections, its open count and the cap; it is unit-tested on its own.  The connections
themselves are :class:`~empath.transport.outbound.OutboundConnection`.

Not frozen, against the house style: ``Reuse`` (one per relayed message). Why, and what
stands in for frozen: DESIGN §15.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from empath.clock import Clock, SystemClock, deadline
from empath.errors import TemporaryDeliveryError
from empath.supervisor import Spawn
from empath.transport.outbound import OutboundConnection, PoolKey, TlsContexts

Opener = Callable[[], Awaitable[OutboundConnection]]


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see the module doc
class Reuse:
    """Hand out the idle connection at ``index`` (after closing the ``stale`` ones)."""

    index: int
    stale: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Open:
    """Open a new connection (after closing the ``stale`` idle ones)."""

    stale: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Wait:
    """The key is at its cap: wait for a connection to come back."""

    stale: tuple[int, ...] = ()


Decision = Reuse | Open | Wait


def decide(idle_usable: Sequence[bool], open_count: int, cap: int, *, fresh: bool) -> Decision:
    """What to do for one request of a key.

    ``idle_usable`` says, oldest first, whether each idle connection can still take a
    message; ``open_count`` counts every connection of the key (idle, in use, being
    opened).  The newest usable idle connection is reused (LIFO: the oldest expire);
    unusable ones are closed whatever happens; a new one is opened only below the cap,
    counting the closed ones as gone.  ``fresh`` skips reuse."""
    stale = tuple(i for i, ok in enumerate(idle_usable) if not ok)
    if not fresh:
        for i in range(len(idle_usable) - 1, -1, -1):
            if idle_usable[i]:
                return Reuse(i, stale)
    if open_count - len(stale) < cap:
        return Open(stale)
    return Wait(stale)


@dataclass(frozen=True, slots=True)
class PoolSettings:
    max_per_key: int  # open connections per key at most (acquirers wait beyond it)
    idle_timeout_s: float  # an idle connection is closed with QUIT after this long


@dataclass(slots=True)
class PoolStats:
    """Counters for tests and metrics."""

    opened: int = 0  # new connections set up successfully
    reused: int = 0  # messages sent over an already open connection
    closed_idle: int = 0  # closed by the idle timeout
    closed: int = 0  # closed for any reason
    in_use: int = 0
    idle: int = 0


@dataclass(slots=True)
class _KeyState:
    idle: list[OutboundConnection] = field(default_factory=list)  # LIFO
    count: int = 0  # open + being opened + in use
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)


class ConnectionPool:
    """Open SMTP sessions per (MX host, port, TLS mode), reused for following messages."""

    def __init__(
        self,
        settings: PoolSettings,
        *,
        tls_contexts: TlsContexts | None = None,
        clock: Clock | None = None,
        spawn: Spawn | None = None,
    ) -> None:
        """``clock`` times the idle timers (virtual in tests); ``spawn`` starts the
        polite QUITs under the daemon's supervisor (a plain task when None)."""
        self.max_per_key = settings.max_per_key
        self.idle_timeout_s = settings.idle_timeout_s
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._spawn = spawn
        self.tls_contexts = tls_contexts or TlsContexts()
        self.stats = PoolStats()
        self._keys: dict[PoolKey, _KeyState] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    def reconfigure(self, settings: PoolSettings) -> None:
        """Reload: a new cap per key (``max_concurrent_deliveries``) and idle timeout;
        waiters look at the cap again when a connection of their key is released."""
        self.max_per_key = settings.max_per_key
        self.idle_timeout_s = settings.idle_timeout_s

    def __repr__(self) -> str:
        st = self.stats
        return (
            f"<ConnectionPool keys={len(self._keys)} open={self.open_count()} "
            f"idle={st.idle} in_use={st.in_use} opened={st.opened} reused={st.reused} "
            f"max_per_key={self.max_per_key} idle_timeout_s={self.idle_timeout_s:g}"
            f"{' closed' if self._closed else ''}>"
        )

    def connection(
        self, key: PoolKey, opener: Opener, *, wait_s: float = 30.0, fresh: bool = False
    ) -> _Lease:
        """A connection of ``key`` for an ``async with`` block (see the module doc);
        ``conn.reused`` says whether it came from the idle list.  Raises
        TemporaryDeliveryError when shutting down or when none frees up within
        ``wait_s``; whatever ``opener`` raises (the slot it took is given back).
        The delivery path uses :meth:`checkout` and :meth:`release` directly."""
        return _Lease(self, key, opener, wait_s, fresh)

    async def checkout(
        self, key: PoolKey, opener: Opener, *, wait_s: float = 30.0, fresh: bool = False
    ) -> OutboundConnection:
        """A connection of ``key``, to be given back with :meth:`release` (as
        :meth:`connection` does for a block)."""
        return await self._checkout(key, opener, wait_s, fresh)

    def release(self, conn: OutboundConnection, *, failed: bool = False) -> None:
        """Give back a checked-out connection: kept idle if still usable, else closed;
        ``failed`` (cancelled, or a bug: its session is in an unknown state) closes it
        without reuse."""
        if failed:
            self._drop(conn)
        else:
            self._checkin(conn)

    async def _checkout(
        self, key: PoolKey, opener: Opener, wait_s: float, fresh: bool
    ) -> OutboundConnection:
        if self._closed:
            raise TemporaryDeliveryError("delivery is shutting down", enhanced="4.3.2")
        st = self._keys.get(key)
        if st is None:
            st = self._keys[key] = _KeyState()
        until = self.clock.monotonic() + wait_s
        while True:
            choice = decide([c.usable for c in st.idle], st.count, self.max_per_key, fresh=fresh)
            if isinstance(choice, Reuse):
                conn = st.idle[choice.index]
            for i in sorted(choice.stale, reverse=True):
                self._close_idle(st, st.idle[i], politely=False)
            if isinstance(choice, Reuse):
                st.idle.remove(conn)
                self.stats.idle -= 1
                self.stats.reused += 1
                self.stats.in_use += 1
                conn.reused = True
                return conn
            if isinstance(choice, Open):
                st.count += 1
                try:
                    conn = await opener()
                except BaseException:
                    st.count -= 1
                    self._wake_one(st)
                    raise
                self.stats.opened += 1
                self.stats.in_use += 1
                conn.reused = False
                return conn
            await self._wait(st, key, until)
            if self._closed:
                raise TemporaryDeliveryError("delivery is shutting down", enhanced="4.3.2")

    async def _wait(self, st: _KeyState, key: PoolKey, until: float) -> None:
        remaining = until - self.clock.monotonic()
        if remaining <= 0:
            raise TemporaryDeliveryError(
                f"all {self.max_per_key} connections to {key.host} are busy",
                enhanced="4.4.5",
                mx=key.host,
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        st.waiters.append(fut)
        try:
            async with deadline(self.clock, remaining):
                await fut
        except TimeoutError:
            pass
        finally:
            with contextlib.suppress(ValueError):
                st.waiters.remove(fut)

    def _checkin(self, conn: OutboundConnection) -> None:
        """The block ended normally: keep the connection idle if healthy, else close it."""
        st = self._keys[conn.key]
        self.stats.in_use -= 1
        if not conn.usable or self._closed:
            self._forget(st, conn)
            self._close_politely(conn)
            self._wake_one(st)
            return
        conn.last_used = self.clock.monotonic()
        st.idle.append(conn)
        self.stats.idle += 1
        if not conn.idle_timer_armed:
            self._arm_idle(conn, self.idle_timeout_s)
        self._wake_one(st)

    def _arm_idle(self, conn: OutboundConnection, seconds: float) -> None:
        conn.set_idle_timer(self.clock.call_later(seconds, lambda: self._expire(conn)))

    def _drop(self, conn: OutboundConnection) -> None:
        """The block raised: close the connection without reusing it."""
        st = self._keys[conn.key]
        self.stats.in_use -= 1
        self._forget(st, conn)
        conn.close()
        self._wake_one(st)

    def idle_count(self, key: PoolKey | None = None) -> int:
        if key is not None:
            st = self._keys.get(key)
            return len(st.idle) if st else 0
        return sum(len(st.idle) for st in self._keys.values())

    def open_count(self, key: PoolKey | None = None) -> int:
        if key is not None:
            st = self._keys.get(key)
            return st.count if st else 0
        return sum(st.count for st in self._keys.values())

    async def close_all(self) -> None:
        """Shutdown: QUIT every idle connection; in-use ones close on release."""
        self._closed = True
        for st in self._keys.values():
            while st.idle:
                conn = st.idle.pop()
                self.stats.idle -= 1
                self._forget(st, conn)
                self._close_politely(conn)
            while st.waiters:
                fut = st.waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # --- internals -----------------------------------------------------------------

    def _expire(self, conn: OutboundConnection) -> None:
        conn.cancel_idle_timer()  # it fired: no longer armed
        st = self._keys.get(conn.key)
        if st is None or conn not in st.idle:
            return  # gone, or in use: its return arms the timer again
        left = conn.last_used + self.idle_timeout_s - self.clock.monotonic()
        if left > 0:  # used again since the timer was armed
            self._arm_idle(conn, left)
            return
        self.stats.closed_idle += 1
        self._close_idle(st, conn, politely=True)
        self._wake_one(st)

    def _close_idle(self, st: _KeyState, conn: OutboundConnection, *, politely: bool) -> None:
        st.idle.remove(conn)
        self.stats.idle -= 1
        self._forget(st, conn)
        if politely:
            self._close_politely(conn)
        else:
            conn.close()

    def _forget(self, st: _KeyState, conn: OutboundConnection) -> None:
        st.count -= 1
        self.stats.closed += 1
        conn.cancel_idle_timer()

    def _close_politely(self, conn: OutboundConnection) -> None:
        if not conn.usable:
            conn.close()
            return
        if self._spawn is not None:
            task = self._spawn(conn.quit(), name=f"empath-quit-{conn.key.host}")
        else:
            task = asyncio.get_running_loop().create_task(conn.quit())  # no daemon: tests
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    def _wake_one(st: _KeyState) -> None:
        while st.waiters:
            fut = st.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return


class _Lease:
    """``async with pool.connection(...) as conn``: checkout on entry, release on exit
    (a plain class: an ``asynccontextmanager`` generator cost ~8 µs per message)."""

    __slots__ = ("_conn", "_fresh", "_key", "_opener", "_pool", "_wait_s")

    def __init__(
        self, pool: ConnectionPool, key: PoolKey, opener: Opener, wait_s: float, fresh: bool
    ) -> None:
        self._pool = pool
        self._key = key
        self._opener = opener
        self._wait_s = wait_s
        self._fresh = fresh
        self._conn: OutboundConnection | None = None

    async def __aenter__(self) -> OutboundConnection:
        self._conn = await self._pool.checkout(
            self._key, self._opener, wait_s=self._wait_s, fresh=self._fresh
        )
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn, failed=exc_type is not None)
