"""config/derive.py: every component's settings come from the config, in one place."""

from __future__ import annotations

from empath.config.derive import derive
from empath.config.load import loads_config
from empath.config.model import Config, DomainConfig
from empath.control.client import DEFAULT_SOCKET
from empath.dns.cache import CacheLimits
from empath.policy.ratelimit import RateLimit
from empath.queue.runner import DomainPolicy
from empath.testing.settings import outbound_timeouts
from empath.transport.outbound import OutboundTimeouts

CONFIG = """
Empath (
  hostname: "mx.example.org",
  smtp_controller: ( listeners: [ ( socket: "127.0.0.1:2525", max_recipients: 7,
                                    extensions: [ { "size": 5000 } ] ) ] ),
  delivery: (
    max_concurrent_deliveries: 8, max_attempts: 3, failed_retention_secs: 60,
    accept_invalid_certs: true,
    smtp_timeouts: ( connect_secs: 3 ),
    dns: ( nameservers: ["127.0.0.1:5353"], timeout_secs: 2, cache_size: 10 ),
    domains: { "Slow.Example": ( max_connections: 2, rate_limit: 60, require_tls: true,
                                 accept_invalid_certs: false, mx_override: "127.0.0.1:2526" ) },
  ),
  dsn: ( delay_warning_secs: 100 ),
)
"""


def test_every_part_is_the_configs_value() -> None:
    s = derive(loads_config(CONFIG))
    (listener,) = s.listeners
    assert ("127.0.0.1", 2525, "mx.example.org") == (
        listener.host,
        listener.port,
        listener.hostname,
    )
    assert (5000, 7) == (listener.max_message_bytes, listener.max_recipients)
    assert 8 == s.scheduler.max_concurrent_deliveries == s.pool.max_per_key
    assert 2 == s.scheduler.max_connections_for("slow.example")
    assert 20 == s.scheduler.max_connections_for("other.example") == DomainConfig().max_connections
    assert {"slow.example": RateLimit(1.0, 1)} == dict(s.policy.rate_overrides)  # 60/minute
    assert (("127.0.0.1:5353",), 2.0) == (s.dns.nameservers, s.dns.timeout_s)
    assert CacheLimits(10, 60.0, 3600.0, 300.0) == s.routing.cache
    assert {"slow.example": "127.0.0.1:2526"} == dict(s.routing.overrides)
    assert 3 == s.retry.max_attempts
    r = s.runner
    assert (60.0, 100.0, "postmaster@mx.example.org") == (
        r.failed_retention_s,
        r.delay_warning_s,
        r.postmaster,
    )
    assert outbound_timeouts(connect_secs=3) == r.attempt.timeouts
    assert r.attempt.tls_ca_file is None  # only tests add trust anchors
    assert DomainPolicy(True, False, 2) == r.domain_policy("slow.example")
    assert DomainPolicy(False, True, 20) == r.domain_policy("other.example")


def test_the_defaults_are_the_config_models() -> None:
    s = derive(Config(hostname="h.example"))
    (listener,) = s.listeners
    assert 26_214_400 == listener.max_message_bytes
    assert 604_800.0 == s.runner.failed_retention_s
    assert 64 == s.scheduler.max_concurrent_deliveries
    assert OutboundTimeouts(30.0, 30.0, 30.0, 30.0, 30.0, 120.0, 10.0, None) == (
        s.runner.attempt.timeouts
    )


def test_components_with_a_copy_of_a_default_agree_with_the_model() -> None:
    """empathctl keeps the control socket's default as a literal (it must start without
    importing the config model); it is the model's value."""
    assert Config().control_socket == DEFAULT_SOCKET


def test_derived_settings_carry_the_models_limits() -> None:
    s = derive(Config(hostname="h.example"))
    assert (Config().smtp_controller.hop_limit, "postmaster@h.example") == (
        s.listeners[0].hop_limit,
        s.listeners[0].postmaster,
    )
    assert Config().metrics.max_domain_cardinality == s.metrics.max_domain_cardinality
    assert Config().delivery.circuit_breaker.failure_threshold == s.policy.breaker.failure_threshold
