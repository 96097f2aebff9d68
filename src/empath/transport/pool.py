"""The outbound connection pool: open SMTP sessions per (MX host, port, TLS mode).

:class:`ConnectionPool` keeps healthy idle connections per key for the next
message (the client starts that one with MAIL, or RSET after a failure), closes
idle ones with QUIT after ``idle_timeout_s`` (a :class:`~empath.clock.Clock`
timer, virtual in tests), caps connections per key (acquirers wait for a free
one) and counts openings and reuses for tests and metrics.  The connections
themselves are :class:`~empath.transport.outbound.OutboundConnection`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass, field

from empath.clock import Clock, SystemClock
from empath.errors import TemporaryDeliveryError
from empath.supervisor import Spawn
from empath.transport.outbound import OutboundConnection, PoolKey, TlsContexts


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

    async def acquire(self, key: PoolKey, wait_s: float = 30.0) -> OutboundConnection | None:
        """An idle healthy connection for ``key``, or None with a slot reserved.

        After None the caller opens a connection and hands it to :meth:`added`,
        or calls :meth:`cancel_slot` if opening failed.  At the per-key cap this
        waits (up to ``wait_s``) for a connection to come back.
        """
        if self._closed:
            raise TemporaryDeliveryError("delivery is shutting down", enhanced="4.3.2")
        st = self._keys.get(key)
        if st is None:
            st = self._keys[key] = _KeyState()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            while st.idle:
                conn = st.idle.pop()
                conn.cancel_idle_timer()
                self.stats.idle -= 1
                if conn.usable:
                    self.stats.reused += 1
                    self.stats.in_use += 1
                    return conn
                self._forget(st, conn)
                conn.close()
            if st.count < self.max_per_key:
                st.count += 1
                return None
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TemporaryDeliveryError(
                    f"all {self.max_per_key} connections to {key.host} are busy",
                    enhanced="4.4.5",
                    mx=key.host,
                )
            fut: asyncio.Future[None] = loop.create_future()
            st.waiters.append(fut)
            try:
                async with asyncio.timeout(remaining):
                    await fut
            except TimeoutError:
                pass
            finally:
                with contextlib.suppress(ValueError):
                    st.waiters.remove(fut)

    def added(self, conn: OutboundConnection) -> None:
        """A connection opened in a slot reserved by :meth:`acquire` is now in use."""
        self.stats.opened += 1
        self.stats.in_use += 1

    def cancel_slot(self, key: PoolKey) -> None:
        st = self._keys[key]
        st.count -= 1
        self._wake_one(st)

    def release(self, conn: OutboundConnection) -> None:
        """Give a connection back after use: kept idle if healthy, else closed."""
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
        conn.set_idle_timer(self.clock.call_later(self.idle_timeout_s, lambda: self._expire(conn)))
        self._wake_one(st)

    def discard(self, conn: OutboundConnection) -> None:
        """Drop an in-use connection without reusing it."""
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
        st = self._keys.get(conn.key)
        if st is None or conn not in st.idle:
            return
        st.idle.remove(conn)
        self.stats.idle -= 1
        self.stats.closed_idle += 1
        self._forget(st, conn)
        self._close_politely(conn)
        self._wake_one(st)

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
