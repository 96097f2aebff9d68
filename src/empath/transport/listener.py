"""SMTP listeners: bind sockets, account connections, stop gracefully.

Theory of operation
-------------------
:class:`SmtpServerGroup` owns one asyncio server per :class:`ListenerSpec`.  Each
listener has a :class:`ListenerRuntime` — the settings, spool and counters its
sessions share — and a :class:`ListenerStats` the metrics collector reads at
scrape time (plain integers, no locking: everything runs on the event loop).

Shutdown (DESIGN §10): stop accepting; idle sessions get ``421 4.3.2`` and are
closed; sessions receiving or committing a message may finish it within the
grace period (they get the 421 right after their 250); whatever is left then is
closed.  Commits already started are awaited, so the spool can be closed safely
afterwards.

An ``[::]`` listener is bound dual-stack (IPV6_V6ONLY off), as operators expect
from ``socket: "[::]:1025"``; asyncio's own ``create_server`` would bind IPv6 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from empath.clock import Clock, SystemClock, Timer
from empath.errors import ListenerBindError
from empath.logs import get_logger
from empath.smtp.sasl import AuthOutcome, Credentials
from empath.smtp.server import AuthOffer, RelayPolicy, ServerConfig
from empath.spool.model import MessageState
from empath.spool.store import Spool
from empath.transport.acceptance import AcceptancePipeline
from empath.transport.admission import Admission
from empath.transport.session import SmtpSession

if TYPE_CHECKING:
    from empath.modules.host import ModuleHost

log = get_logger("smtp", __name__)

_RELAY_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class ListenerAuthSpec:
    """A submission listener's SMTP AUTH (its config ``auth:``, built by config/derive.py)."""

    users_file: str  # names the CredentialCheck that verifies the credentials
    required: bool  # no MAIL before AUTH (530 5.7.0)
    mechanisms: tuple[str, ...]


class CredentialCheck(Protocol):
    """What a session asks of a submission listener's authenticator
    (``empath.submission.authenticator.Authenticator``)."""

    def quick(self, creds: Credentials, ip_key: str, peer: str) -> AuthOutcome | None:
        """The answer when no password hash is needed; None: call :meth:`authenticate`."""
        ...

    async def authenticate(self, creds: Credentials, ip_key: str, peer: str) -> AuthOutcome: ...


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One SMTP listener's settings (config/derive.py maps a ListenerConfig onto this)."""

    host: str
    port: int
    hostname: str
    max_message_bytes: int
    max_recipients: int
    max_connections: int
    max_connections_per_ip: int
    command_timeout_s: float
    data_init_timeout_s: float
    data_block_timeout_s: float
    data_termination_timeout_s: float  # bounds the end-of-data acceptance steps
    connection_timeout_s: float
    tls_cert: str | None
    tls_key: str | None
    name: str  # label for metrics/logs; "" means "host:port"
    reuse_port: bool  # SO_REUSEPORT: several processes share the port (DESIGN §11)
    hop_limit: int  # smtp_controller.hop_limit
    postmaster: str  # Config.postmaster_address
    # DESIGN §13 submission: TLS from the first byte (RFC 8314, port 465), SMTP AUTH
    tls_implicit: bool = False
    auth: ListenerAuthSpec | None = None
    # the node's ``cpu`` on a reuse_port listener: SO_INCOMING_CPU (DESIGN §11)
    incoming_cpu: int | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        host = self.host.strip("[]")
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def server_config(spec: ListenerSpec, *, tls_available: bool) -> ServerConfig:
    """The SMTP state machine's settings for a session of this listener."""
    return ServerConfig(
        hostname=spec.hostname,
        max_message_bytes=spec.max_message_bytes,
        max_recipients=spec.max_recipients,
        tls_available=tls_available,
        hop_limit=spec.hop_limit,
        postmaster=spec.postmaster,
        auth=(
            AuthOffer(spec.auth.required, tuple(spec.auth.mechanisms))
            if spec.auth is not None
            else None
        ),
    )


class ListenerStats:
    """Counters for one listener (read by the metrics collector)."""

    __slots__ = (
        "connections_active",
        "connections_total",
        "messages_received",
        "sessions_errored",
        "sessions_total",
    )

    def __init__(self) -> None:
        self.connections_total = 0  # accepted TCP connections (including refused by caps)
        self.connections_active = 0  # open sessions
        self.messages_received = 0  # messages committed to the spool
        self.sessions_errored = 0  # sessions ended by error or timeout
        self.sessions_total = 0  # sessions served (not refused)


class ListenerRuntime:
    """Everything the sessions of one listener share."""

    __slots__ = (
        "_idle",
        "_relay",
        "_relay_cache",
        "_sweeper",
        "_trust_cache",
        "acceptance",
        "admission",
        "audit",
        "auth",
        "clock",
        "label",
        "loop",
        "modules",
        "on_accepted",
        "server_config",
        "sessions",
        "show_sender",
        "shutting_down",
        "spec",
        "spool",
        "ssl_context",
        "stats",
        "tick_s",
    )

    def __init__(
        self,
        spec: ListenerSpec,
        *,
        relay: RelayPolicy,
        spool: Spool,
        on_accepted: Callable[[MessageState], None] | None,
        clock: Clock,
        loop: asyncio.AbstractEventLoop,
        ssl_context: ssl.SSLContext | None,
        audit: bool,
        redact_sender: bool,
    ) -> None:
        self.spec = spec
        self.label = spec.label  # computed once: sessions log it per message
        self._relay = relay
        self._relay_cache: dict[str, Callable[[str], bool]] = {}
        self._trust_cache: dict[str, bool] = {}  # trusts(), per client address
        self.spool = spool
        self.on_accepted = on_accepted
        self.clock = clock
        self.loop = loop
        self.ssl_context = ssl_context
        self.audit = audit
        self.show_sender: Callable[[str], str] = _redact if redact_sender else _same
        self.server_config = server_config(spec, tls_available=ssl_context is not None)
        self.stats = ListenerStats()
        self.admission = Admission(spec.max_connections, spec.max_connections_per_ip)
        self.sessions: set[SmtpSession] = set()
        self.shutting_down = False
        self._idle = asyncio.Event()
        self._idle.set()
        timeouts = (
            spec.command_timeout_s,
            spec.data_init_timeout_s,
            spec.data_block_timeout_s,
            spec.connection_timeout_s,
        )
        self.tick_s = min(5.0, max(0.02, min(timeouts) / 4))
        self._sweeper: Timer | None = None
        # end-of-data steps (acceptance.py); None = the streaming fast path
        self.acceptance: AcceptancePipeline | None = None
        # modules and milters (DESIGN §14); None = no module: sessions never stop for one
        self.modules: ModuleHost | None = None
        # DESIGN §13: checks AUTH credentials on a submission listener (set by the group)
        self.auth: CredentialCheck | None = None

    def admit(self, ip: str) -> bool:
        """One more session from ``ip``, if the listener's caps allow (admission.py)."""
        if not self.admission.admit(ip):
            return False
        self.stats.connections_active = self.admission.active
        return True

    def release(self, ip: str) -> None:
        """An admitted session from ``ip`` ended."""
        self.admission.release(ip)
        self.stats.connections_active = self.admission.active

    def trusts(self, client_ip: str) -> bool:
        """The client is in relay.trusted_networks (for acceptance steps and modules:
        asked up to twice per message, so remembered per address like relay_check)."""
        trusted = self._trust_cache.get(client_ip)
        if trusted is None:
            trusted = self._relay.trusts(client_ip)
            if len(self._trust_cache) >= _RELAY_CACHE_MAX:
                self._trust_cache.clear()
            self._trust_cache[client_ip] = trusted
        return trusted

    def set_relay(self, relay: RelayPolicy) -> None:
        """Reload: new sessions and the next RCPT of open ones use ``relay``."""
        self._relay = relay
        self._relay_cache.clear()
        self._trust_cache.clear()
        for session in list(self.sessions):
            session.relay_changed()

    def relay_check(self, client_ip: str) -> Callable[[str], bool]:
        check = self._relay_cache.get(client_ip)
        if check is None:
            check = self._relay.for_client(client_ip)
            if len(self._relay_cache) >= _RELAY_CACHE_MAX:
                self._relay_cache.clear()
            self._relay_cache[client_ip] = check
        return check

    def session_added(self) -> None:
        if self._sweeper is None:
            self._sweeper = self.clock.call_later(self.tick_s, self._sweep)

    def session_gone(self) -> None:
        if not self.sessions:
            self._idle.set()

    def _sweep(self) -> None:
        """Timeouts of every session, once per tick, while there are sessions."""
        self._sweeper = None
        if not self.sessions:
            return
        now = self.clock.monotonic()
        for session in list(self.sessions):
            session.check_timeout(now)
        if self.sessions:
            self._sweeper = self.clock.call_later(self.tick_s, self._sweep)

    def stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def wait_idle(self) -> None:
        while self.sessions:
            self._idle.clear()
            await self._idle.wait()


def _same(addr: str) -> str:
    return addr


def _redact(addr: str) -> str:
    at = addr.rfind("@")
    return "[REDACTED]" + addr[at:] if at >= 0 else ("[REDACTED]" if addr else "")


def _tls_context(spec: ListenerSpec) -> ssl.SSLContext | None:
    # Built once per listener and shared by all its sessions: the TLS 1.3 session-ticket
    # keys (and TLS 1.2's session cache) live in the context, so a reconnecting client
    # resumes its session only because every connection sees this same object
    # (tests/integration/test_submission_tls.py proves the resumption). Prefer an ECDSA
    # P-256 certificate: its handshake signature costs a fraction of RSA-2048's
    # (docs/bench.md).
    if not spec.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # One TLS 1.3 ticket per handshake, not OpenSSL's two: a mail program reconnects
    # with one session at a time, and each ticket costs the server ~20 µs of CPU and the
    # client as much to read (docs/bench.md, issue 18's benchmark).
    ctx.num_tickets = 1
    try:
        ctx.load_cert_chain(spec.tls_cert, spec.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ListenerBindError(
            f"listener {spec.label}: cannot load TLS certificate {spec.tls_cert}: {exc}"
        ) from exc
    return ctx


def pin_process(cpu: int) -> None:
    """Run every thread of this process, and every thread it starts later, on ``cpu`` only
    (config ``cpu``, DESIGN §11).  Raises OSError if the CPU is not available to us."""
    for tid in sorted(os.listdir("/proc/self/task")):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), {cpu})


def steer_to_cpu(server: asyncio.Server, cpu: int) -> None:
    """SO_INCOMING_CPU on a SO_REUSEPORT listener: of the nodes sharing the port, the
    kernel (Linux >= 6.2) hands a new connection to the one whose listener names the CPU
    that processed its SYN, and hashes as before when none does.  A node pinned to that
    CPU then handles the connection where the kernel already has it: no wake-up of
    another core, the socket stays in one core's cache (DESIGN §11, docs/bench.md)."""
    for sock in server.sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_INCOMING_CPU, cpu)


def _dual_stack_socket(port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class SmtpServerGroup:
    """All SMTP listeners of the daemon; see module doc."""

    def __init__(
        self,
        specs: Sequence[ListenerSpec],
        relay: RelayPolicy,
        spool: Spool,
        on_accepted: Callable[[MessageState], None] | None = None,
        *,
        clock: Clock | None = None,
        audit: bool = True,
        redact_sender: bool = False,
        backlog: int = 1024,
        authenticators: Mapping[str, CredentialCheck] | None = None,
    ) -> None:
        self._specs = tuple(specs)
        self._relay = relay
        self._spool = spool
        self._on_accepted = on_accepted
        self._clock: Clock = clock or SystemClock()
        self._audit = audit
        self._redact_sender = redact_sender
        self._backlog = backlog
        self._servers: list[asyncio.Server] = []
        self._runtimes: list[ListenerRuntime] = []
        self.stats: dict[str, ListenerStats] = {}
        self._acceptance: Callable[[ListenerSpec], AcceptancePipeline | None] | None = None
        self._modules: ModuleHost | None = None
        self.authenticators: Mapping[str, CredentialCheck] = authenticators or {}

    def set_modules(self, host: ModuleHost | None) -> None:
        """Install the modules (at start and on reload); sessions keep the set they
        started with, new sessions get this one."""
        self._modules = host if host else None
        for rt in self._runtimes:
            rt.modules = self._modules

    def reconfigure(self, relay: RelayPolicy, *, audit: bool, redact_sender: bool) -> None:
        """Reload (SIGHUP): relay access (open sessions included: a revoked network
        relays no further recipient) and the audit settings.  The listening sockets and
        per-listener limits stay as started (config/reload.py: restart-only)."""
        self._relay = relay
        self._audit = audit
        self._redact_sender = redact_sender
        for rt in self._runtimes:
            rt.audit = audit
            rt.show_sender = _redact if redact_sender else _same
            rt.set_relay(relay)

    def set_acceptance(
        self, pipeline_for: Callable[[ListenerSpec], AcceptancePipeline | None] | None
    ) -> None:
        """Install the end-of-data steps per listener (at start and on reload); sessions
        use the new pipeline from their next message on."""
        self._acceptance = pipeline_for
        for rt in self._runtimes:
            rt.acceptance = pipeline_for(rt.spec) if pipeline_for is not None else None

    @property
    def bound(self) -> bool:
        """Every listener is bound, serving, and its socket is still listening (for
        /health/ready).  The kernel is asked (``SO_ACCEPTCONN``): a listening socket
        destroyed behind our back (``ss -K``, issue 14 defect 6) leaves the server
        object "serving" on a socket that refuses every connection."""
        return bool(self._servers) and all(
            server.is_serving() and server.sockets and all(_listening(s) for s in server.sockets)
            for server in self._servers
        )

    def check_sockets(self) -> bool:
        """:attr:`bound`, for readiness; a listener whose socket is no longer listening
        is also closed (once, logged at ERROR): the event loop would otherwise keep
        polling the dead socket, and only a restart binds it again."""
        for server in self._servers:
            if server.is_serving() and not all(_listening(s) for s in server.sockets):
                names = [str(s.getsockname()) for s in server.sockets]
                log.error(
                    "SMTP listening socket lost (destroyed outside the daemon); listener "
                    "closed, readiness fails until a restart",
                    sockets=names,
                )
                server.close()
        return self.bound

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) actually bound, one per listener (useful with port 0)."""
        out = []
        for server in self._servers:
            if server.sockets:  # none once closed (a listening socket lost, see below)
                name = server.sockets[0].getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    def sessions(self) -> list[SmtpSession]:
        """The open sessions of every listener (call on the event loop's thread)."""
        return [session for rt in self._runtimes for session in rt.sessions]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for spec in self._specs:
                rt = ListenerRuntime(
                    spec,
                    relay=self._relay,
                    spool=self._spool,
                    on_accepted=self._on_accepted,
                    clock=self._clock,
                    loop=loop,
                    ssl_context=_tls_context(spec),
                    audit=self._audit,
                    redact_sender=self._redact_sender,
                )
                if self._acceptance is not None:
                    rt.acceptance = self._acceptance(spec)
                rt.modules = self._modules
                if spec.auth is not None:
                    rt.auth = self.authenticators[spec.auth.users_file]
                server = await self._bind(loop, spec, rt)
                self._servers.append(server)
                if spec.incoming_cpu is not None:
                    steer_to_cpu(server, spec.incoming_cpu)
                self._runtimes.append(rt)
                self.stats[spec.label] = rt.stats
                log.info("SMTP listener started", listener=spec.label,
                         tls=rt.ssl_context is not None, implicit_tls=spec.tls_implicit,
                         auth=spec.auth is not None)  # fmt: skip
        except BaseException:
            for server in self._servers:
                server.close()
            self._servers.clear()
            raise

    async def _bind(
        self, loop: asyncio.AbstractEventLoop, spec: ListenerSpec, rt: ListenerRuntime
    ) -> asyncio.Server:
        host = spec.host.strip("[]")

        def factory() -> SmtpSession:
            return SmtpSession(rt)

        # RFC 8314 §3.3: on an implicit-TLS port the TLS handshake comes first; the
        # session starts (and greets) once it completed.
        ssl_ctx = rt.ssl_context if spec.tls_implicit else None
        handshake_s = spec.command_timeout_s if ssl_ctx is not None else None
        try:
            if host in ("::", ""):
                sock = _dual_stack_socket(spec.port, self._backlog, spec.reuse_port)
                return await loop.create_server(
                    factory, sock=sock, ssl=ssl_ctx, ssl_handshake_timeout=handshake_s
                )
            return await loop.create_server(
                factory,
                host,
                spec.port,
                reuse_address=True,
                reuse_port=spec.reuse_port or None,
                backlog=self._backlog,
                ssl=ssl_ctx,
                ssl_handshake_timeout=handshake_s,
            )
        except OSError as exc:
            raise ListenerBindError(
                f"cannot listen on {spec.label} ({host or '::'}:{spec.port}): {exc.strerror or exc}"
            ) from exc

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting, 421 idle sessions, let messages in flight finish, close the rest."""
        for server in self._servers:
            server.close()
        for rt in self._runtimes:
            rt.shutting_down = True
            for session in list(rt.sessions):
                session.shutdown()
        waits = [rt.wait_idle() for rt in self._runtimes]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), grace_s)
            except TimeoutError:
                log.warn("Shutdown grace period over, closing remaining SMTP sessions",
                         sessions=sum(len(rt.sessions) for rt in self._runtimes))  # fmt: skip
        pending: list[asyncio.Future[Any]] = []
        for rt in self._runtimes:
            for session in list(rt.sessions):
                task = session.pending_task
                if task is not None:
                    pending.append(task)
                session.force_close()
        if pending:
            await asyncio.wait(pending, timeout=max(1.0, grace_s))
        for rt in self._runtimes:
            rt.stop_sweeper()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
        log.info("SMTP listeners stopped")


def _listening(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:  # closed under us
        return False
