"""The composition root: config → objects → one running daemon.

Why this module is longer than 600 lines: it is the composition root (DESIGN §1): every
component is built and wired here, including reload and the background loops, so wiring
is read in one file.

Everything long-lived is built here and nowhere else (no module singletons),
from the settings ``config/derive.py`` derives: the spool, the delivery policy
state, scheduler, DNS router, connection pool and runner, the SMTP listeners, the
control socket and the health endpoint - and the :class:`Supervisor` that owns
every background task they start.  Signals are wired here too:
SIGTERM/SIGINT stop gracefully (a second one exits at once; every message that
got a 250 is already durable, so nothing accepted is lost either way), SIGHUP
reloads the settings that can change without a restart.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from empath.clock import Clock, SystemClock
from empath.compiled import compiled_modules
from empath.config.derive import derive
from empath.config.load import load_config
from empath.config.model import Config
from empath.config.reload import ReloadMetrics, plan_reload
from empath.control.commands import ReloadRecord, command_table
from empath.control.server import ControlServer, ControlSocketInUse
from empath.dkim.metrics import DkimMetrics
from empath.dkim.service import DkimService
from empath.dkim.signer import DkimStats
from empath.dns.mx import MxRouter, OwnListeners, build_router
from empath.dns.resolver import DnsResolver
from empath.errors import ConfigError, EmpathError
from empath.logs import flush as flush_logs
from empath.logs import (
    get_logger,
    redacted_fields,
    set_level,
    set_redaction,
    setup_logging,
)
from empath.modules.events import delivery_event
from empath.modules.host import ModuleHost, ModuleStats
from empath.modules.step import ModulesStep
from empath.observability.health import Check, HealthServer, ReadinessInputs, readiness_checks
from empath.observability.metrics import (
    EmpathCollector,
    build_registry,
    renderer,
    summarise_queue,
)
from empath.observability.operator import OperatorMetrics
from empath.policy.breaker import BreakerTransition
from empath.policy.state import LocalPolicyState, PolicySettings
from empath.queue.runner import DeliveryRunner
from empath.queue.scheduler import Scheduler
from empath.queue.suspend import FILE_NAME as SUSPENDED_FILE
from empath.queue.suspend import Suspensions
from empath.spool.journal import DIR_NAME as JOURNAL_DIR
from empath.spool.journal import MessageJournal
from empath.spool.model import MessageState, UnitState
from empath.spool.store import Spool
from empath.stats import DomainLabels, RunnerStats, Window
from empath.submission.metrics import AuthMetrics, AuthStats
from empath.supervisor import Supervisor
from empath.textsafe import redact_url
from empath.transport.acceptance import AcceptancePipeline, AcceptanceStep
from empath.transport.listener import ListenerSpec, SmtpServerGroup, pin_process
from empath.transport.pool import ConnectionPool

if TYPE_CHECKING:
    from empath.cluster.node import ClusterNode
    from empath.cluster.state import SharedPolicyState
    from empath.observability.otlp import OtlpPusher
    from empath.submission.authenticator import Authenticator
    from empath.submission.shared import SharedAuthCounters

log = get_logger("config", __name__)
_breaker_log = get_logger("delivery", "empath.policy.breaker")
SHUTDOWN_GRACE_S = 30.0
GC_THRESHOLD0 = 20_000  # allocations between collections of the youngest generation
QUEUE_SIZES_CACHE_S = 5.0
PRESSURE_POLL_S = 1.0  # how often the compactor looks at the spool's free space


class App:
    """One daemon.  ``await App(config).serve()`` runs until a stop signal."""

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        # Verified TLS uses the system trust store (OpenSSL honours SSL_CERT_FILE).
        self._stop = asyncio.Event()
        self._stop_count = 0
        self._exit_code = 0
        self.supervisor = Supervisor(on_crash=self._on_crash)
        self._queue_sizes_cache: tuple[float, dict[str, int]] | None = None
        self.spool = self._build_spool()
        settings = derive(config)
        self.cluster: ClusterNode | None = None
        self.policy: LocalPolicyState | SharedPolicyState
        if config.cluster is not None:
            self.policy = self._build_shared_policy(settings.policy)
        else:
            self.policy = LocalPolicyState(
                self.clock, settings.policy, on_transition=self._on_breaker
            )
        self.scheduler = Scheduler(self.policy, self.clock, settings.scheduler)
        file_spool = config.spool.type != "Memory"
        self.suspensions = Suspensions(
            self.clock,
            os.path.join(config.spool.path, SUSPENDED_FILE) if file_spool else None,
        )
        self.scheduler.suspended = self.suspensions.until
        self.last_compaction: tuple[float, int] | None = None
        self.breaker_transitions: dict[str, int] = {}
        self.resolver = DnsResolver(settings.dns, clock=self.clock)
        self.router: MxRouter = build_router(
            self.resolver,
            settings.routing,
            clock=self.clock,
            rng=random.Random(),
            own=OwnListeners((lc.host, lc.port) for lc in config.smtp_controller.listeners),
            track=self.supervisor.track,
        )
        self.pool = ConnectionPool(
            settings.pool,
            clock=self.clock,
            spawn=self.supervisor.spawn,
        )
        self.runner_stats = RunnerStats(DomainLabels(config.metrics.max_domain_cardinality))
        self.runner = DeliveryRunner(
            spool=self.spool,
            scheduler=self.scheduler,
            router=self.router,
            pool=self.pool,
            retry=settings.retry,
            settings=settings.runner,
            clock=self.clock,
            spawn=self.supervisor.spawn,
            stats=self.runner_stats,
            journal=MessageJournal(
                os.path.join(config.spool.path, JOURNAL_DIR) if file_spool else None,
                config.delivery.failed_retention_secs,
                self.clock,
            ),
        )
        self.suspensions.on_change(self.runner.wake)
        sync_before_state = getattr(self.spool, "sync_before_state", None)
        if sync_before_state is not None:  # history as durable as the queue (DESIGN §3)
            sync_before_state(self.runner.journal.sync)
        if config.cluster is not None:
            self._build_cluster_node()
        self.auth_stats = AuthStats()
        self.authenticators = self._build_authenticators(config)
        self.listeners = SmtpServerGroup(
            list(settings.listeners),
            settings.relay,
            self.spool,
            self.runner.submit,
            clock=self.clock,
            audit=config.audit.enabled,
            redact_sender=config.audit.redact_sender,
            authenticators=self.authenticators,
        )
        # DESIGN §14: a module that cannot be loaded fails start-up here (ConfigError)
        self.module_stats = ModuleStats()
        self.modules = self._build_modules(config)
        self.listeners.set_modules(self.modules)
        self.runner.on_outcome = self._delivery_event
        # DKIM (DESIGN §12): checks every key now - a bad one fails start-up naming it
        self.dkim = DkimService(
            config, self.clock, DkimStats(self.runner_stats.domains), self.resolver.txt
        )
        self.listeners.set_acceptance(self._acceptance_for)
        self.metrics = EmpathCollector(
            settings=settings.metrics,
            clock=self.clock,
            queue=self.spool,
            in_flight=self.runner.in_flight_keys,
            runner=self.runner_stats,
            policy=self.policy,
            listeners=self.listeners.stats,
            dns_cache=self.router.cache,
            dns_lookups=self.resolver.stats,
        )
        from empath.cluster.metrics import ClusterMetrics, StandaloneMetrics

        self.metrics.add_source(
            StandaloneMetrics() if self.cluster is None else ClusterMetrics(self.cluster)
        )
        from empath.modules.metrics import ModuleMetrics

        self.metrics.add_source(ModuleMetrics(self.module_stats))
        self.metrics.add_source(DkimMetrics(self.dkim))
        self.metrics.add_source(ReloadMetrics(lambda: len(self.pending_restart)))
        self.metrics.add_source(AuthMetrics(self.auth_stats))
        self.metrics.add_source(OperatorMetrics(self.suspensions, self.breaker_transitions))
        self.registry = build_registry(self.metrics)
        self.started_at = time.time()
        self.last_reload: ReloadRecord | None = None
        # DNS cache hits/misses over the recent window, for `system status` (sampled by
        # _sample_loop too, so a first read after a quiet hour is not the lifetime figure)
        self._dns_window = Window(
            config.metrics.rate_window_secs, self.clock.monotonic(), 2, max_samples=60
        )
        # changes read from the file that only a restart applies (config/reload.py)
        self.pending_restart: tuple[str, ...] = ()
        self.control = ControlServer(
            config.control_socket,
            command_table(self),
            auth_enabled=config.control_auth.enabled,
            token_hashes=config.control_auth.token_hashes,
            busy=self._smtp_busy,
            clock=self.clock,
        )
        self.health: HealthServer | None = None
        if config.health.enabled:
            host, _, port = config.health.listen_address.rpartition(":")
            self.health = HealthServer(
                host.strip("[]"),
                int(port),
                self.readiness,
                renderer(self.metrics) if config.metrics.enabled else None,
            )
        self.otlp: OtlpPusher | None = None
        if config.metrics.enabled and config.metrics.endpoint:
            from empath.observability.otlp import OtlpPusher

            self.otlp = OtlpPusher(
                self.registry,
                config.metrics.endpoint,
                config.metrics.push_interval_secs,
                service_instance=config.hostname,
                clock=self.clock,
            )

    def _build_authenticators(self, config: Config) -> dict[str, Authenticator]:
        """DESIGN §13: one Authenticator per users file of the submission listeners (a
        users file that does not load stops the start with its file:line)."""
        out: dict[str, Authenticator] = {}
        listeners = [lc for lc in config.smtp_controller.listeners if lc.auth is not None]
        if not listeners:
            return out
        from empath.submission.authenticator import Authenticator

        for lc in listeners:
            assert lc.auth is not None
            if lc.auth.users_file not in out:
                out[lc.auth.users_file] = Authenticator(
                    lc.auth,
                    clock=self.clock,
                    stats=self.auth_stats,
                    shared=self._shared_auth_counters(config, lc.auth.limits.window_secs),
                    spawn=self.supervisor.spawn,
                )
        return out

    @staticmethod
    def _shared_auth_counters(config: Config, window_s: float) -> SharedAuthCounters | None:
        """Cluster mode: AUTH failures and blocks counted across nodes (DESIGN §13)."""
        cc = config.cluster
        if cc is None:
            return None
        from empath.cluster.backend import RedisBackend
        from empath.submission.shared import SharedAuthCounters

        backend = RedisBackend(cc.redis_url, cc.key_prefix, cc.timeout_ms / 1000.0)
        return SharedAuthCounters(backend, window_s)

    def _build_shared_policy(self, policy: PolicySettings) -> SharedPolicyState:
        """Cluster mode (DESIGN §11): the policy state lives in Redis."""
        import secrets

        from empath.cluster.backend import RedisBackend
        from empath.cluster.state import SharedPolicyState

        cc = self.config.cluster
        assert cc is not None
        backend = RedisBackend(cc.redis_url, cc.key_prefix, cc.timeout_ms / 1000.0)
        return SharedPolicyState(
            backend,
            node_id=cc.node_id,
            instance=secrets.token_hex(4),
            settings=policy,
            lease_s=cc.lease_secs,
            on_transition=self._on_breaker,
            clock=self.clock,
            spawn=self.supervisor.spawn,
        )

    def _build_cluster_node(self) -> None:
        from empath.cluster.node import ClusterNode
        from empath.cluster.state import SharedPolicyState

        cc = self.config.cluster
        assert cc is not None and isinstance(self.policy, SharedPolicyState)
        self.policy.set_waker(self.runner.wake)
        self.cluster = ClusterNode(
            self.policy,
            self.policy.backend,
            node_id=cc.node_id,
            heartbeat_s=cc.heartbeat_secs,
            lease_s=cc.lease_secs,
            queue_sizes=self.queue_sizes,
            in_flight=lambda: self.scheduler.in_flight,
            suspensions=self.suspensions,
            clock=self.clock,
        )

    def queue_sizes(self) -> Mapping[str, int]:
        """Units by status (DESIGN §6 statuses) for the cluster heartbeat, at most every 5 s."""
        now = time.monotonic()
        cached = self._queue_sizes_cache
        if cached is not None and now - cached[0] < QUEUE_SIZES_CACHE_S:
            return cached[1]
        summary = summarise_queue(
            self.spool.index, (), set(self.runner.in_flight_keys()), time.time(), 0
        )
        sizes = {status.value: n for status, n in summary.sizes.items()}
        self._queue_sizes_cache = (now, sizes)
        return sizes

    async def cluster_status(self) -> dict[str, Any] | None:
        """``empathctl cluster status``: this node's view and every node's heartbeat;
        None without ``cluster``."""
        if self.cluster is None or self.config.cluster is None:
            return None
        from empath.cluster.backend import RedisUnavailableError
        from empath.cluster.node import cluster_status

        node = self.cluster
        cc = self.config.cluster
        data: dict[str, Any] = {
            "node_id": cc.node_id,
            "redis_url": redact_url(cc.redis_url),
            "redis_up": node.redis_up and not node.state.fallback,
            "fallback": node.state.fallback,
            "node_count": node.state.node_count,
            "nodes": [],
            "error": None,
        }
        try:
            nodes = await cluster_status(node.backend, cc.heartbeat_secs)
        except RedisUnavailableError as exc:
            data["error"] = str(exc)
        else:
            data["nodes"] = [n.to_json() for n in nodes]
        return data

    def smtp_busy(self) -> bool:
        """Any SMTP session open: long operator views yield to mail (control/ops.py)."""
        return self._smtp_busy()

    def _smtp_busy(self) -> bool:
        """Any SMTP session open (the control server yields to mail then)."""
        return any(s.connections_active for s in self.listeners.stats.values())

    def _build_spool(self) -> Spool:
        if self.config.spool.type == "Memory":
            from empath.spool.memory import MemorySpool

            return MemorySpool()
        from empath.spool.fs import FileSpool

        cfg = self.config.spool
        return FileSpool(
            Path(cfg.path),
            clock=self.clock,
            segment_bytes=cfg.segment_bytes,
            track=self.supervisor.track,
            commit_delay_us=cfg.commit_delay_us,
            preformat=cfg.preformat,
        )

    # -- signals and reload ---------------------------------------------------

    def _on_breaker(self, t: BreakerTransition) -> None:
        _breaker_log.log(t.log_level, t.message, **t.log_fields())
        self.breaker_transitions[t.new.value] = self.breaker_transitions.get(t.new.value, 0) + 1

    def _on_crash(self, name: str, _exc: BaseException) -> None:
        """An essential background task died (the supervisor logged it): stop
        gracefully and exit 1, so the service manager restarts a whole daemon."""
        self._exit_code = 1
        log.error("Essential task crashed; shutting down", task=name)
        self._stop.set()

    def request_stop(self, signame: str = "") -> None:
        self._stop_count += 1
        if self._stop_count > 1:
            log.warn(
                "Second stop signal: exiting at once (accepted mail is durable)", signal=signame
            )
            os._exit(1)
        log.info("Shutting down", signal=signame)
        self._stop.set()

    def reload(self) -> str | None:
        """SIGHUP / `config reload`: apply what can change while running, keep the rest.

        The file is read and checked whole first; on any error nothing changes.  Else
        every reloadable part is applied (config/reload.py) and the running config
        becomes the *applied* one - never the file's, so the changes that wait for a
        restart stay visible (WARN log, `system status`, `config check`, the
        ``empath_config_restart_pending`` gauge) until the daemon restarts.
        Returns None on success, else the error text.
        """
        path = self.config.source_path
        try:
            if path is None:
                raise ConfigError("the running config was not loaded from a file")
            new = load_config(path)
            plan = plan_reload(self.config, new)
            settings = derive(plan.applied)
            dkim_keys = self.dkim.prepare(plan.applied)  # every key loaded and checked first
            modules = self._build_modules(plan.applied)
            for auth in self.authenticators.values():
                auth.check()  # DESIGN §13: a broken users file is refused with file:line
        except (ConfigError, ValueError) as exc:
            return self._reload_failed(str(exc))
        try:  # first: it builds the new resolver before changing anything
            self.resolver.reconfigure(settings.dns)
        except ConfigError as exc:
            self.supervisor.spawn(modules.close(), name="modules-close-unused")
            return self._reload_failed(str(exc))
        applied = plan.applied
        old_modules, self.modules = self.modules, modules
        self.modules.start(self.supervisor.spawn)
        self.listeners.set_modules(modules)
        self.supervisor.spawn(old_modules.close(), name="modules-close-old")
        self.policy.reconfigure(settings.policy)
        self.scheduler.reconfigure(settings.scheduler)
        self.router.reconfigure(settings.routing)
        self.runner.reconfigure(settings.retry, settings.runner)
        self.pool.reconfigure(settings.pool)
        self.listeners.reconfigure(
            settings.relay, audit=applied.audit.enabled, redact_sender=applied.audit.redact_sender
        )
        set_level(applied.log.level)
        set_redaction(redacted_fields(applied.audit.redact_sender, applied.audit.redact_recipients))
        self.control.configure_auth(applied.control_auth.enabled, applied.control_auth.token_hashes)
        self.dkim.apply(dkim_keys)
        self.config = applied
        self.listeners.set_acceptance(self._acceptance_for)  # steps built from the new config
        self.pending_restart = plan.pending
        self.last_reload = ReloadRecord(time.time(), True, changes=plan.changes)
        if plan.pending:
            log.warn(
                "Config reloaded; some changes wait for a restart",
                path=str(path),
                applied=len(plan.changes),
                pending_restart=list(plan.pending_keys),
            )
        else:
            log.info("Config reloaded", path=str(path), applied=len(plan.changes))
        return None

    def _reload_failed(self, error: str) -> str:
        log.error("Config reload failed; keeping the old config", error=error)
        self.last_reload = ReloadRecord(time.time(), False, error)
        return error

    # -- modules (DESIGN §14) -------------------------------------------------------

    def _build_modules(self, config: Config) -> ModuleHost:
        """Load every ``modules`` entry (ConfigError naming the one that fails)."""
        from empath.modules.loader import ModuleContext, build_host

        context = ModuleContext(resolver=self.resolver, hostname=config.hostname)
        file = config.source_path or "<config>"
        return build_host(config.modules, context, self.module_stats, self.clock, file=file)

    def _delivery_event(self, msg: MessageState, unit: UnitState) -> None:
        if not self.modules.wants_delivery_events:
            return
        self.modules.delivery_event(delivery_event(msg, unit))

    # -- end-of-data acceptance steps (transport/acceptance.py) -----------------

    def _acceptance_for(self, spec: ListenerSpec) -> AcceptancePipeline | None:
        """The one place config becomes end-of-data steps, per listener; called at
        start and again on reload.  No step → None → the streaming fast path."""
        steps: list[AcceptanceStep] = []
        if self.modules.has_data:  # Stage.MODULES: Python modules and milters (DESIGN §14)
            steps.append(ModulesStep(self.modules))
        if spec.auth is not None:  # Stage.SUBMISSION: header From: ownership (DESIGN §13)
            from empath.submission.fromcheck import HeaderFromCheck

            steps.append(HeaderFromCheck(self.authenticators[spec.auth.users_file]))
        if self.dkim.enabled:
            steps.append(self.dkim.signer)  # Stage.DKIM: signing (DESIGN §12)
        if not steps:
            return None
        return AcceptancePipeline(tuple(steps), timeout_s=spec.data_termination_timeout_s)

    # -- health ---------------------------------------------------------------

    def readiness(self) -> list[Check]:
        usage = self.spool.usage()
        return readiness_checks(
            ReadinessInputs(
                listeners_bound=self.listeners.check_sockets(),
                spool_writable=self._spool_writable(),
                spool_free_ratio=usage.free_bytes / usage.total_bytes if usage.total_bytes else 1.0,
                heartbeat_age_s=self.runner.heartbeat_age_s(),
                pending_units=self.scheduler.backlog(self.config.health.max_queue_size),
                max_queue_size=self.config.health.max_queue_size,
            )
        )

    def _spool_writable(self) -> bool:
        """The spool directory accepts a new file: not on a read-only filesystem
        (remounted after I/O errors, say), not immutable, writable for this user.  The
        probe file is created and removed at once, never synced (recovery ignores the
        spool's top directory, so a leftover one is harmless)."""
        if self.config.spool.type == "Memory":
            return True
        path = self.config.spool.path
        probe = os.path.join(path, ".ready-probe")
        try:
            if os.statvfs(path).f_flag & os.ST_RDONLY:
                return False
            os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600))
            os.unlink(probe)
        except OSError:
            return False
        return True

    # -- run ------------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            # First, so a second daemon on the same socket stops before touching anything.
            self.control.bind()
        except (ControlSocketInUse, OSError) as exc:
            log.error("Startup failed: control socket", error=str(exc))
            return 1
        try:
            report = await self.spool.open()
        except (OSError, EmpathError) as exc:  # e.g. "... spool filesystem is full"
            log.error("Startup failed", error=str(exc), path=self.config.spool.path)
            await self.control.close()
            return 1
        get_logger("spool", __name__).info(
            "Spool recovered",
            messages=report.messages,
            records=report.records,
            quarantined=report.quarantined,
            left_in_place=report.deferred,
            missing=report.missing,
            seconds=round(report.seconds, 3),
        )
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.request_stop, name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.suspensions.load()
        self.runner.start()
        self.modules.start(self.supervisor.spawn)
        if self.cluster is not None:
            self.cluster.start(self.supervisor.spawn)
        try:
            await self.listeners.start()
            if self.health is not None:
                await self.health.start()
            await self.control.start()
            if self.otlp is not None:
                self.otlp.start(self.supervisor.spawn)
        except (OSError, EmpathError) as exc:
            log.error("Startup failed", error=str(exc))
            await self._shutdown()
            return 1
        self.supervisor.spawn(self._compact_loop(), name="empath-compactor", essential=True)
        self.supervisor.spawn(self._sample_loop(), name="empath-window-sampler")
        compiled = compiled_modules()
        self.supervisor.spawn(self.dkim.check_loop(), name="empath-dkim-dns-check")
        settle_heap()
        log.info(
            "Empath ready",
            hostname=self.config.hostname,
            listeners=[f"{h}:{p}" for h, p in self.listeners.addresses],
            startup_s=round(time.monotonic() - started, 3),
            compiled=bool(compiled),
            compiled_modules=len(compiled),
        )
        await self._stop.wait()
        await self._shutdown()
        log.info("Stopped", exit_code=self._exit_code)
        return self._exit_code

    async def _shutdown(self) -> None:
        await self.control.close()
        await self.listeners.shutdown(SHUTDOWN_GRACE_S)
        for auth in self.authenticators.values():
            await auth.aclose()
        await self.runner.drain()
        await self.modules.close()
        if self.cluster is not None:
            await self.cluster.stop()
        if self.otlp is not None:
            await self.otlp.close()
        if self.health is not None:
            await self.health.close()
        await self.supervisor.shutdown()
        self.dkim.close()
        await self.spool.close()

    async def compact_now(self, *, include_active: bool = False) -> int:
        """Reclaim spool space (the periodic loop; `empathctl spool compact` includes the
        active segment)."""
        freed = await self.spool.compact(include_active=include_active)
        self.last_compaction = (time.time(), freed)
        return freed

    def dns_recent(self) -> tuple[float, int, int]:
        """DNS cache (span covered, hits, misses) over about ``metrics.rate_window_secs``
        (since the start while the daemon is younger than that)."""
        cache = self.router.cache
        now = self.clock.monotonic()
        hits, misses = self._dns_window.delta(now, (cache.hits, cache.misses))
        return now - self._dns_window.base_at, hits, misses

    async def _sample_loop(self) -> None:
        """Sample the recent-window counters a sixtieth of a window apart, whether or not
        anybody reads them (a window only knows the samples it was given)."""
        while True:
            await self.clock.sleep(self._dns_window.window_s / 60)
            self.dns_recent()

    async def _compact_loop(self) -> None:
        """Compact every ``compact_interval_secs``, and within a second whenever the
        spool is short of space (issue 14, defect 15: a full disk recovers without a
        restart once its dead records are reclaimed)."""
        slog = get_logger("spool", __name__)
        waited = 0.0
        while True:
            interval = self.config.spool.compact_interval_secs
            step = min(interval, PRESSURE_POLL_S)
            await self.clock.sleep(step)
            waited += step
            try:
                if waited < interval and not self.spool.under_pressure():
                    continue
                waited = 0.0
                await self.compact_now()
            except Exception:
                slog.exception("Spool compaction failed")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def settle_heap() -> None:
    """Once started: move what start-up built (modules, config, the recovered queue) out
    of the cyclic GC's reach (``gc.freeze``) and collect the youngest generation less
    often.  Each accepted message allocates ~50 tracked objects, so the default
    threshold of 700 ran a collection every dozen messages on the event loop (3.5 % of
    its CPU during ingest, issue 20), and every full collection walked the whole
    recovered queue again.  Reference counting still frees everything acyclic at
    once; cycles wait a little longer."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])


def run(config: Config) -> int:
    setup_logging(
        config.log.level,
        config.log.format,
        redacted=redacted_fields(config.audit.redact_sender, config.audit.redact_recipients),
    )
    if config.cpu is not None:
        try:
            pin_process(config.cpu)
        except OSError as exc:
            log.error("Startup failed: cannot run on CPU", cpu=config.cpu, error=str(exc))
            flush_logs()
            return 1
        log.info("Pinned to one CPU", cpu=config.cpu)
    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            try:
                app = App(config)
            except ConfigError as exc:
                log.error("Startup failed: modules", error=str(exc))
                return 1
            return runner.run(app.serve())
    finally:
        flush_logs()
