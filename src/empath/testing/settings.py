"""Settings for tests, derived from the config model's defaults (its one source).

A test that needs a component's settings takes the defaults the daemon would
derive from an empty config and changes only what it is about, so no number is
written down twice.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from empath.clock import Clock
from empath.config.derive import Settings, derive, routing_settings
from empath.config.derive import listener_spec as _listener_spec
from empath.config.model import Config, ListenerConfig, SmtpControllerConfig
from empath.delivery.attempt import AttemptSettings
from empath.dns.cache import CacheLimits
from empath.policy.breaker import BreakerSettings
from empath.queue.scheduler import SchedulerSettings
from empath.smtp.server import ServerConfig
from empath.transport.listener import ListenerSpec
from empath.transport.listener import server_config as _server_config
from empath.transport.outbound import OutboundTimeouts
from empath.transport.pool import ConnectionPool


def listener_spec(**changes: Any) -> ListenerSpec:
    """A listener as ``ListenerConfig()`` derives it, with ``changes`` applied; its
    label is its ``host:port`` unless ``name`` is given."""
    derived = _listener_spec(
        ListenerConfig(),
        "localhost",
        hop_limit=SmtpControllerConfig().hop_limit,
        postmaster="postmaster@localhost",
    )
    return replace(derived, **{"name": "", **changes})


def cache_limits(**changes: Any) -> CacheLimits:
    """The DNS cache limits of ``Config()``, with ``changes`` applied."""
    return replace(routing_settings(Config(hostname="localhost")).cache, **changes)


def server_config(hostname: str = "localhost", **changes: Any) -> ServerConfig:
    """The SMTP state machine's settings as ``Config(hostname=hostname)`` derives them
    for a listener without TLS, with ``changes`` applied."""
    config = Config(hostname=hostname)
    spec = _listener_spec(
        ListenerConfig(),
        hostname,
        hop_limit=config.smtp_controller.hop_limit,
        postmaster=config.postmaster_address,
    )
    return replace(_server_config(spec, tls_available=False), **changes)


def _defaults(hostname: str = "localhost") -> Settings:
    return derive(Config(hostname=hostname))


def breaker_settings(**changes: Any) -> BreakerSettings:
    """The circuit breaker settings of ``Config()``, with ``changes`` applied."""
    return replace(_defaults().policy.breaker, **changes)


def attempt_settings(hostname: str = "relay.test", **changes: Any) -> AttemptSettings:
    """An attempt's settings as ``Config(hostname=hostname)`` derives them."""
    return replace(_defaults(hostname).runner.attempt, **changes)


def outbound_timeouts(**changes: Any) -> OutboundTimeouts:
    """The outbound client's deadlines of ``Config()``, with ``changes`` applied."""
    return replace(_defaults().runner.attempt.timeouts, **changes)


def connection_pool(clock: Clock | None = None, **changes: Any) -> ConnectionPool:
    """A pool with the settings of ``Config()`` (``changes`` applied), timed by ``clock``."""
    return ConnectionPool(replace(_defaults().pool, **changes), clock=clock)


def scheduler_settings(**changes: Any) -> SchedulerSettings:
    """The scheduler settings of ``Config()``, with ``changes`` applied."""
    return replace(_defaults().scheduler, **changes)
