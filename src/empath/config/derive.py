"""Config → the settings objects the components take, in one place.

Theory of operation
-------------------
The config model (``empath.config.model``) is the one source of every default.
Components never read the config and keep no defaults of their own for what the
config sets: each takes a small frozen settings object of its own shape (a
listener's :class:`ListenerSpec`, the scheduler's :class:`SchedulerSettings`, the
runner's :class:`RunnerSettings`, ...).  :func:`derive` builds all of them from one
:class:`Config`; the composition root passes them in at startup and, on SIGHUP,
derives again from the new file and hands each reloadable component its part
through ``reconfigure(settings)``.  Deriving is pure and raises ``ValueError``
(or ``ConfigError``) for a value a component cannot take, before anything is
changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from empath.config.model import Config, ListenerConfig, SmtpTimeouts
from empath.delivery.attempt import AttemptSettings
from empath.dns.cache import CacheLimits
from empath.dns.mx import RoutingSettings
from empath.dns.resolver import DnsSettings
from empath.observability.metrics import MetricsSettings
from empath.policy.breaker import BreakerSettings
from empath.policy.ratelimit import RateLimit, resolve_limits
from empath.policy.retry import RetryPolicy
from empath.policy.state import PolicySettings
from empath.queue.runner import DomainPolicy, RunnerSettings
from empath.queue.scheduler import (
    MAX_UNITS_PER_TICK,
    PARKED_RECHECK_S,
    PRUNE_INTERVAL_S,
    SchedulerSettings,
)
from empath.smtp.relay import RelayPolicy
from empath.transport.listener import ListenerAuthSpec, ListenerSpec
from empath.transport.outbound import OutboundTimeouts
from empath.transport.pool import PoolSettings

# Idle pooled connections close after this long (not a config key).  In cluster mode
# a connection lease must outlive the pooled connection, so they close sooner:
# empath.cluster.state.CLUSTER_POOL_IDLE_S.
POOL_IDLE_S = 10.0


@dataclass(frozen=True, slots=True)
class Settings:
    """Every component's settings, derived from one config."""

    listeners: tuple[ListenerSpec, ...]
    relay: RelayPolicy
    policy: PolicySettings
    scheduler: SchedulerSettings
    dns: DnsSettings
    routing: RoutingSettings
    retry: RetryPolicy
    runner: RunnerSettings
    pool: PoolSettings
    metrics: MetricsSettings


def derive(config: Config) -> Settings:
    smtp = config.smtp_controller
    return Settings(
        listeners=tuple(
            listener_spec(
                lc,
                config.hostname,
                hop_limit=smtp.hop_limit,
                postmaster=config.postmaster_address,
                cpu=config.cpu,
            )
            for lc in smtp.listeners
        ),
        relay=RelayPolicy(tuple(smtp.relay.trusted_networks), tuple(smtp.relay.accepted_domains)),
        policy=policy_settings(config),
        scheduler=scheduler_settings(config),
        dns=DnsSettings(config.delivery.dns.nameservers, config.delivery.dns.timeout_secs),
        routing=routing_settings(config),
        retry=retry_policy(config),
        runner=runner_settings(config),
        pool=pool_settings(config),
        metrics=MetricsSettings(
            config.metrics.max_domain_cardinality, config.metrics.rate_window_secs
        ),
    )


def listener_spec(
    cfg: ListenerConfig,
    hostname: str,
    *,
    hop_limit: int,
    postmaster: str,
    cpu: int | None = None,
) -> ListenerSpec:
    tls = cfg.tls_files
    t = cfg.timeouts
    return ListenerSpec(
        host=cfg.host,
        port=cfg.port,
        hostname=hostname,
        max_message_bytes=cfg.max_message_bytes,
        max_recipients=cfg.max_recipients,
        max_connections=cfg.max_connections,
        max_connections_per_ip=cfg.max_connections_per_ip,
        command_timeout_s=t.command_secs,
        data_init_timeout_s=t.data_init_secs,
        data_block_timeout_s=t.data_block_secs,
        data_termination_timeout_s=t.data_termination_secs,
        connection_timeout_s=t.connection_secs,
        tls_cert=tls.certificate if tls else None,
        tls_key=tls.key if tls else None,
        name=cfg.socket,
        reuse_port=cfg.reuse_port,
        hop_limit=hop_limit,
        postmaster=postmaster,
        tls_implicit=cfg.tls is not None and cfg.tls.mode == "implicit",
        auth=(
            ListenerAuthSpec(cfg.auth.users_file, cfg.auth.required, tuple(cfg.auth.mechanisms))
            if cfg.auth is not None
            else None
        ),
        incoming_cpu=cpu if cfg.reuse_port else None,
    )


def pool_settings(config: Config) -> PoolSettings:
    idle_s = POOL_IDLE_S
    if config.cluster is not None:
        from empath.cluster.state import CLUSTER_POOL_IDLE_S

        idle_s = CLUSTER_POOL_IDLE_S
    return PoolSettings(max(config.delivery.max_concurrent_deliveries, 1), idle_s)


def policy_settings(config: Config) -> PolicySettings:
    d = config.delivery
    cb = d.circuit_breaker
    rl = d.rate_limit
    return PolicySettings(
        breaker=BreakerSettings(
            cb.failure_threshold, cb.failure_window_secs, cb.timeout_secs, cb.success_threshold
        ),
        default_rate=RateLimit(rl.messages_per_second, rl.burst_size),
        rate_overrides=resolve_limits(
            rl.domain_limits, {name: dc.rate_limit for name, dc in d.domains.items()}
        ),
    )


def scheduler_settings(config: Config) -> SchedulerSettings:
    d = config.delivery
    return SchedulerSettings(
        max_concurrent_deliveries=d.max_concurrent_deliveries,
        max_connections_for=lambda domain: d.domain_config(domain).max_connections,
        parked_recheck_s=PARKED_RECHECK_S,
        max_units_per_tick=MAX_UNITS_PER_TICK,
        prune_interval_s=PRUNE_INTERVAL_S,
    )


def routing_settings(config: Config) -> RoutingSettings:
    dns = config.delivery.dns
    return RoutingSettings(
        cache=CacheLimits(
            dns.cache_size,
            dns.min_cache_ttl_secs,
            dns.max_cache_ttl_secs,
            dns.negative_ttl_secs,
            dns.serve_stale_secs,
        ),
        overrides={
            name: dc.mx_override for name, dc in config.delivery.domains.items() if dc.mx_override
        },
    )


def outbound_timeouts(t: SmtpTimeouts) -> OutboundTimeouts:
    return OutboundTimeouts(
        connect_secs=t.connect_secs,
        ehlo_secs=t.ehlo_secs,
        starttls_secs=t.starttls_secs,
        mail_from_secs=t.mail_from_secs,
        rcpt_to_secs=t.rcpt_to_secs,
        data_secs=t.data_secs,
        quit_secs=t.quit_secs,
        attempt_secs=t.attempt_secs,
    )


def retry_policy(config: Config) -> RetryPolicy:
    d = config.delivery
    return RetryPolicy(
        d.base_retry_delay_secs,
        d.max_retry_delay_secs,
        d.retry_jitter_factor,
        d.max_attempts,
        d.message_expiration_secs,
    )


def runner_settings(config: Config) -> RunnerSettings:
    d = config.delivery

    def domain_policy(domain: str) -> DomainPolicy:
        dc = d.domain_config(domain)
        invalid = (
            d.accept_invalid_certs if dc.accept_invalid_certs is None else dc.accept_invalid_certs
        )
        return DomainPolicy(dc.require_tls, invalid, dc.max_connections)

    return RunnerSettings(
        hostname=config.hostname,
        attempt=AttemptSettings(
            hostname=config.hostname,
            timeouts=outbound_timeouts(d.smtp_timeouts),
            require_tls=False,  # only per domain (DomainPolicy)
            accept_invalid_certs=d.accept_invalid_certs,
        ),
        domain_policy=domain_policy,
        dsn_enabled=config.dsn.enabled,
        reporting_mta=config.dsn.reporting_mta,
        postmaster=config.postmaster_address,
        delay_warning_s=config.dsn.delay_warning_secs,
        failed_retention_s=d.failed_retention_secs,
    )
