"""The config schema and loader: defaults, aliases, map-as-struct, options, type and
range errors with file:line:column and key path, discovery, rendering, properties."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from empath.config.checks import system_fqdn
from empath.config.load import (
    discover_config_path,
    format_key_path,
    load_config,
    loads_config,
    render_config,
)
from empath.config.model import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ClusterConfig,
    Config,
    DomainConfig,
    DomainRateLimit,
    ListenerConfig,
    ListenerExtension,
    TlsFiles,
    split_host_port,
)
from empath.config.ron import dumps
from empath.errors import ConfigError

DEV_CONFIG = Path(__file__).resolve().parents[2] / "empath.config.ron"

# Every key of DESIGN §2, none at its default.
FULL_CONFIG = """\
Empath (
  hostname: "mx.example.com",
  smtp_controller: (
    listeners: [ (
      socket: "[::]:2525",
      context: { "service": "smtp", "zone": "dmz" },
      timeouts: ( command_secs: 301, data_init_secs: 121, data_block_secs: 181,
                  data_termination_secs: 601, connection_secs: 1801 ),
      extensions: [ { "size": 1048576 },
                    { "starttls": { "certificate": "/etc/ssl/c.pem", "key": "/etc/ssl/k.pem" } } ],
      max_connections: 999, max_connections_per_ip: 49, max_recipients: 99,
    ), (
      socket: "0.0.0.0:25",
    ) ],
    relay: ( trusted_networks: ["10.0.0.0/8", "192.168.1.1/24"],
             accepted_domains: ["Example.ORG"] ),
    hop_limit: 30,
  ),
  spool: ( type: "Memory", path: "/srv/spool" ),
  delivery: (
    max_concurrent_deliveries: 16,
    max_attempts: 10, base_retry_delay_secs: 30, max_retry_delay_secs: 3600,
    retry_jitter_factor: 0.5, message_expiration_secs: 86400, failed_retention_secs: 0,
    scan_interval_secs: 15, process_interval_secs: 5,
    accept_invalid_certs: true,
    smtp_timeouts: ( connect_secs: 31, ehlo_secs: 32, starttls_secs: 33, mail_from_secs: 34,
                     rcpt_to_secs: 35, data_secs: 121, quit_secs: 11,
                     attempt_secs: 900 ),
    dns: ( nameservers: ["127.0.0.1:5353", "::1"], timeout_secs: 2.5, cache_size: 50,
           min_cache_ttl_secs: 1, max_cache_ttl_secs: 60, negative_ttl_secs: 30,
           serve_stale_secs: 600 ),
    domains: { "Example.com": ( mx_override: "127.0.0.1:2526", require_tls: true,
                                accept_invalid_certs: Some(false), max_connections: 10,
                                rate_limit: 100 ) },
    rate_limit: ( messages_per_second: 15.0, burst_size: 30,
                  domain_limits: { "slow-domain.com": ( messages_per_second: 5, burst_size: 10 ),
                                   "other.com": ( messages_per_second: 0.5 ) } ),
    circuit_breaker: ( failure_threshold: 3, failure_window_secs: 120, timeout_secs: 600,
                       success_threshold: 2 ),
  ),
  dsn: ( enabled: false, reporting_mta: Some("relay.example.com"),
         postmaster: "bounces@example.com", delay_warning_secs: 7200 ),
  control_socket: "/run/empath/control.sock",
  control_auth: (
    enabled: true,
    token_hashes: ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],
  ),
  metrics: ( enabled: false, max_domain_cardinality: 50, rate_window_secs: 60,
             endpoint: "https://otel.example.com:4318/v1/metrics", push_interval_secs: 5 ),
  health: ( enabled: false, listen_address: "[::1]:9090", max_queue_size: 500 ),
  audit: ( enabled: false, redact_sender: true, redact_recipients: true,
           redact_message_content: false ),
  modules: [],
  log: ( level: "debug", format: "text" ),
  cluster: ( redis_url: "redis://127.0.0.1:6379/0" ),
)
"""


def load(text: str) -> Config:
    return loads_config(text, file="empath.config.ron")


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text)
    return info.value


# --- defaults ---------------------------------------------------------------------


def test_empty_struct_gives_spec_defaults() -> None:
    """`Empath ()` loads as DESIGN §2's defaults, equal to Config()."""
    config = load("Empath ()")
    assert Config() == config
    assert system_fqdn() == config.hostname
    listener = config.smtp_controller.listeners[0]
    assert ("::", 1025) == (listener.host, listener.port)
    assert 300.0 == listener.timeouts.command_secs
    assert (1000, 50, 100) == (
        listener.max_connections,
        listener.max_connections_per_ip,
        listener.max_recipients,
    )
    assert DEFAULT_MAX_MESSAGE_BYTES == listener.max_message_bytes == 26214400
    assert listener.tls is None
    assert ("127.0.0.0/8", "::1/128") == config.smtp_controller.relay.trusted_networks
    assert ("File", "/var/spool/empath") == (config.spool.type, config.spool.path)
    d = config.delivery
    assert (64, 25, 60.0, 86400.0, 0.2) == (
        d.max_concurrent_deliveries,
        d.max_attempts,
        d.base_retry_delay_secs,
        d.max_retry_delay_secs,
        d.retry_jitter_factor,
    )
    assert (432000.0, 604800.0, 30.0, 10.0) == (
        d.message_expiration_secs,
        d.failed_retention_secs,
        d.scan_interval_secs,
        d.process_interval_secs,
    )
    assert 30.0 == d.smtp_timeouts.connect_secs
    assert 10.0 == d.smtp_timeouts.quit_secs
    assert ((), 5.0, 10000) == (d.dns.nameservers, d.dns.timeout_secs, d.dns.cache_size)
    assert (10.0, 20) == (d.rate_limit.messages_per_second, d.rate_limit.burst_size)
    assert (5, 60.0, 300.0, 1) == (
        d.circuit_breaker.failure_threshold,
        d.circuit_breaker.failure_window_secs,
        d.circuit_breaker.timeout_secs,
        d.circuit_breaker.success_threshold,
    )
    assert (True, None, None, 14400.0) == dataclasses.astuple(config.dsn)
    assert "/run/empath/empath.sock" == config.control_socket
    assert (False, ()) == dataclasses.astuple(config.control_auth)
    assert ("127.0.0.1", 8080) == (config.health.host, config.health.port)
    assert ("info", "json") == (config.log.level, config.log.format)
    assert config.cluster is None


def test_secs_fields_are_floats_even_when_written_as_integers() -> None:
    """Integers are accepted where a number of seconds is expected, and stored as float."""
    config = load("(delivery: (base_retry_delay_secs: 5))")
    assert 5.0 == config.delivery.base_retry_delay_secs
    assert isinstance(config.delivery.base_retry_delay_secs, float)


def test_full_config_sets_every_key() -> None:
    """A config using every DESIGN §2 key binds each one."""
    c = load(FULL_CONFIG)
    assert "mx.example.com" == c.hostname
    first, second = c.smtp_controller.listeners
    assert ("::", 2525) == (first.host, first.port)
    assert {"service": "smtp", "zone": "dmz"} == first.context
    assert (301.0, 121.0, 181.0, 601.0, 1801.0) == dataclasses.astuple(first.timeouts)
    assert 1048576 == first.max_message_bytes
    assert TlsFiles(certificate="/etc/ssl/c.pem", key="/etc/ssl/k.pem") == first.tls_files
    assert (999, 49, 99) == (
        first.max_connections,
        first.max_connections_per_ip,
        first.max_recipients,
    )
    assert ("0.0.0.0", 25) == (second.host, second.port)
    relay = c.smtp_controller.relay
    assert ("10.0.0.0/8", "192.168.1.1/24") == relay.trusted_networks
    assert ("example.org",) == relay.accepted_domains
    assert 30 == c.smtp_controller.hop_limit
    assert ipaddress.ip_network("192.168.1.0/24") == relay.ip_networks()[1]
    assert ("Memory", "/srv/spool") == (c.spool.type, c.spool.path)
    d = c.delivery
    assert (16, 10, 30.0, 3600.0, 0.5, 86400.0, 0.0, 15.0, 5.0, True) == (
        d.max_concurrent_deliveries,
        d.max_attempts,
        d.base_retry_delay_secs,
        d.max_retry_delay_secs,
        d.retry_jitter_factor,
        d.message_expiration_secs,
        d.failed_retention_secs,
        d.scan_interval_secs,
        d.process_interval_secs,
        d.accept_invalid_certs,
    )
    assert (31.0, 32.0, 33.0, 34.0, 35.0, 121.0, 11.0, 900.0) == dataclasses.astuple(
        d.smtp_timeouts
    )
    assert (("127.0.0.1:5353", "::1"), 2.5, 50, 1.0, 60.0, 30.0, 600.0) == dataclasses.astuple(
        d.dns
    )
    assert (("127.0.0.1", 5353), ("::1", 53)) == d.dns.nameserver_addresses()
    assert {
        "example.com": DomainConfig(
            mx_override="127.0.0.1:2526",
            require_tls=True,
            accept_invalid_certs=False,
            max_connections=10,
            rate_limit=100,
        )
    } == d.domains
    assert ("127.0.0.1", 2526) == d.domain_config("EXAMPLE.com").mx_address()
    assert (15.0, 30) == (d.rate_limit.messages_per_second, d.rate_limit.burst_size)
    assert {
        "slow-domain.com": DomainRateLimit(messages_per_second=5.0, burst_size=10),
        "other.com": DomainRateLimit(messages_per_second=0.5, burst_size=None),
    } == d.rate_limit.domain_limits
    assert (3, 120.0, 600.0, 2) == dataclasses.astuple(d.circuit_breaker)
    assert (False, "relay.example.com", "bounces@example.com", 7200.0) == dataclasses.astuple(c.dsn)
    assert "bounces@example.com" == c.postmaster_address
    assert "relay.example.com" == c.reporting_mta
    assert "/run/empath/control.sock" == c.control_socket
    assert c.control_auth.enabled
    assert 1 == len(c.control_auth.token_hashes)
    assert (
        False,
        50,
        60.0,
        "https://otel.example.com:4318/v1/metrics",
        5.0,
    ) == dataclasses.astuple(c.metrics)
    assert (False, "[::1]:9090", 500) == dataclasses.astuple(c.health)
    assert ("::1", 9090) == (c.health.host, c.health.port)
    assert (False, True, True, False) == dataclasses.astuple(c.audit)
    assert () == c.modules
    assert ("debug", "text") == (c.log.level, c.log.format)
    assert ClusterConfig(redis_url="redis://127.0.0.1:6379/0") == c.cluster


def test_dev_config_loads() -> None:
    """The repository's empath.config.ron loads with the dev settings the README promises."""
    c = load_config(DEV_CONFIG)
    listener = c.smtp_controller.listeners[0]
    assert ("127.0.0.1", 1025) == (listener.host, listener.port)
    assert ("127.0.0.0/8", "::1/128") == c.smtp_controller.relay.trusted_networks
    assert ("File", "./spool") == (c.spool.type, c.spool.path)
    assert "./empath.sock" == c.control_socket
    assert "127.0.0.1:8080" == c.health.listen_address
    assert "json" == c.log.format
    assert str(DEV_CONFIG) == c.source_path


# --- accepted spellings -------------------------------------------------------------------


def test_smtp_is_an_alias_for_smtp_controller() -> None:
    """`smtp:` is accepted for `smtp_controller:`."""
    config = load('(smtp: (listeners: [ (socket: "127.0.0.1:2525") ]))')
    assert 2525 == config.smtp_controller.listeners[0].port


def test_alias_and_name_together_is_an_error() -> None:
    """Giving both `smtp` and `smtp_controller` is refused at the second key."""
    err = error_of("(\n  smtp: (),\n  smtp_controller: (),\n)")
    assert (3, 3, "smtp_controller") == (err.line, err.column, err.path)
    assert "also given as 'smtp'" in err.detail


def test_structs_may_be_written_as_maps_with_string_keys() -> None:
    """`delivery: { "max_attempts": 25 }` and `listeners: [ { "socket": ... } ]` load."""
    config = load(
        '(delivery: { "max_attempts": 7, "smtp_timeouts": { "connect_secs": 3 } },\n'
        ' smtp_controller: { "listeners": [ { "socket": "[::]:1025", "max_recipients": 5 } ] })'
    )
    assert 7 == config.delivery.max_attempts
    assert 3.0 == config.delivery.smtp_timeouts.connect_secs
    assert 5 == config.smtp_controller.listeners[0].max_recipients


def test_maps_may_be_written_as_structs() -> None:
    """A map-typed key also accepts an anonymous struct (`context: (service: "smtp")`)."""
    config = load('(smtp: (listeners: [ (context: (service: "smtp")) ]))')
    assert {"service": "smtp"} == config.smtp_controller.listeners[0].context


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [("None", None), ("Some(true)", True), ("true", True), ("Some(false)", False)],
)
def test_options_accept_none_some_and_bare_values(spelling: str, expected: bool | None) -> None:
    """Option keys take None, Some(x) or a bare x."""
    config = load(f'(delivery: (domains: {{ "a.com": (accept_invalid_certs: {spelling}) }}))')
    assert expected == config.delivery.domain_config("a.com").accept_invalid_certs


@pytest.mark.parametrize("spelling", ['"Memory"', "Memory"])
def test_enum_values_accept_string_or_bare_variant(spelling: str) -> None:
    """`type: "Memory"` and `type: Memory` both select the memory spool."""
    assert "Memory" == load(f"(spool: (type: {spelling}))").spool.type


def test_cluster_accepts_none_some_and_bare_struct() -> None:
    """cluster: None | Some((redis_url: ...)) | (redis_url: ...)."""
    assert load("(cluster: None)").cluster is None
    for text in ['(redis_url: "redis://h")', 'Some((redis_url: "redis://h"))']:
        assert ClusterConfig(redis_url="redis://h") == load(f"(cluster: {text})").cluster


def test_top_level_struct_name_is_optional() -> None:
    """The top-level struct may be named `Empath` or anonymous."""
    assert load('Empath (hostname: "a.b")') == load('(hostname: "a.b")')


# --- errors ---------------------------------------------------------------------------------


def test_wrong_type_error_names_file_line_column_and_key_path() -> None:
    """A float where an integer is expected is reported at the value with a quoted path."""
    text = 'Empath (\n  delivery: (\n    domains: { "gmail.com": ( rate_limit: 1.5 ) },\n  ),\n)\n'
    err = error_of(text)
    assert (
        'empath.config.ron:3:43: delivery.domains."gmail.com".rate_limit: expected an integer'
        == str(err)
    )


def test_unknown_key_is_an_error_with_a_suggestion() -> None:
    """Typos never fall back to defaults: the unknown key is reported with a close match."""
    err = error_of("(delivery: (\n    max_atempts: 3))")
    assert (2, 5, "delivery.max_atempts") == (err.line, err.column, err.path)
    assert "unknown key (did you mean 'max_attempts'?)" == err.detail


def test_unknown_key_without_close_match_lists_known_keys() -> None:
    """With no close match the error lists the keys that are allowed."""
    err = error_of("(log: (zzz: 1))")
    assert "unknown key; known keys: level, format" == err.detail


def test_source_path_is_not_a_config_key() -> None:
    """Internal attributes cannot be set from the file."""
    assert "unknown key" in error_of('(source_path: "x")').detail


ERROR_CASES: list[tuple[str, str, str]] = [
    ("(hostname: 5)", "hostname", "expected a string"),
    ('(hostname: Some("x"))', "hostname", "expected a string"),
    ('(hostname: "bad host")', "hostname", "is not a valid host name"),
    ("(delivery: (max_attempts: 2.0))", "delivery.max_attempts", "expected an integer"),
    ("(delivery: (max_attempts: true))", "delivery.max_attempts", "expected an integer"),
    ("(delivery: (max_attempts: 0))", "delivery.max_attempts", "must be greater than 0"),
    (
        '(delivery: (base_retry_delay_secs: "1"))',
        "delivery.base_retry_delay_secs",
        "expected a number",
    ),
    (
        "(delivery: (accept_invalid_certs: 1))",
        "delivery.accept_invalid_certs",
        "expected a boolean",
    ),
    (
        "(delivery: (retry_jitter_factor: 1.01))",
        "delivery.retry_jitter_factor",
        "must be between 0 and 1",
    ),
    (
        "(delivery: (retry_jitter_factor: -0.1))",
        "delivery.retry_jitter_factor",
        "must be between 0 and 1",
    ),
    (
        "(delivery: (smtp_timeouts: (connect_secs: 0)))",
        "delivery.smtp_timeouts.connect_secs",
        "must be greater than 0",
    ),
    (
        "(delivery: (smtp_timeouts: (connect_secs: inf)))",
        "delivery.smtp_timeouts.connect_secs",
        "must be greater than 0",
    ),
    (
        "(delivery: (smtp_timeouts: (connect_secs: NaN)))",
        "delivery.smtp_timeouts.connect_secs",
        "must be greater than 0",
    ),
    (
        "(smtp: (listeners: [ (timeouts: (command_secs: -1)) ]))",
        "smtp.listeners[0].timeouts.command_secs",
        "must be greater than 0",
    ),
    (
        "(delivery: (base_retry_delay_secs: 100, max_retry_delay_secs: 10))",
        "delivery.base_retry_delay_secs",
        "must not exceed max_retry_delay_secs",
    ),
    (
        "(delivery: (dns: (min_cache_ttl_secs: 100, max_cache_ttl_secs: 10)))",
        "delivery.dns.min_cache_ttl_secs",
        "must not exceed max_cache_ttl_secs",
    ),
    (
        '(delivery: (dns: (nameservers: ["127.0.0.1:99999"])))',
        "delivery.dns.nameservers[0]",
        "port must be",
    ),
    (
        '(delivery: (dns: (nameservers: ["a b"])))',
        "delivery.dns.nameservers[0]",
        "not a valid host",
    ),
    (
        '(delivery: (dns: (nameservers: "127.0.0.1")))',
        "delivery.dns.nameservers",
        "expected a list",
    ),
    (
        '(delivery: (domains: { "a.com": (mx_override: "[nope]:25") }))',
        'delivery.domains."a.com".mx_override',
        "not an IPv6 address",
    ),
    ('(delivery: (domains: [ "a.com" ]))', "delivery.domains", "expected a map"),
    (
        '(delivery: (domains: { "A.com": (), "a.COM": () }))',
        'delivery.domains."a.COM"',
        "duplicate key (keys are case-insensitive)",
    ),
    ("(delivery: (domains: { 1: () }))", "delivery.domains", "map keys must be strings"),
    (
        '(delivery: (rate_limit: (domain_limits: { "x.com": (burst_size: 3) })))',
        'delivery.rate_limit.domain_limits."x.com"',
        "missing required key 'messages_per_second'",
    ),
    (
        '(smtp: (listeners: [ (socket: "127.0.0.1") ]))',
        "smtp.listeners[0].socket",
        "expected host:port",
    ),
    ('(smtp: (listeners: [ (socket: "::1:99999") ]))', "smtp.listeners[0].socket", "[addr]:port"),
    (
        '(smtp: (listeners: [ (extensions: [ { "auth": true } ]) ]))',
        "smtp.listeners[0].extensions[0].auth",
        "unknown key",
    ),
    (
        '(smtp: (listeners: [ (extensions: [ { "starttls": { "key": "k" } } ]) ]))',
        "smtp.listeners[0].extensions[0].starttls",
        "missing required key 'certificate'",
    ),
    (
        '(smtp: (listeners: [ (extensions: [ { "size": -1 } ]) ]))',
        "smtp.listeners[0].extensions[0].size",
        "must be 0 or more",
    ),
    (
        '(smtp: (relay: (trusted_networks: ["10.0.0.0/8", "300.0.0.0/8"])))',
        "smtp.relay.trusted_networks[1]",
        "is not an IP network",
    ),
    ('(smtp: (listeners: ( socket: "x:1" )))', "smtp.listeners", "expected a list"),
    ('(spool: (type: "Disk"))', "spool.type", 'expected one of "File", "Memory"'),
    (
        '(log: (level: "verbose"))',
        "log.level",
        'expected one of "error", "warn", "info", "debug", "trace"',
    ),
    ('(log: (format: "xml"))', "log.format", 'expected one of "json", "text"'),
    ('(dsn: (postmaster: "nobody"))', "dsn.postmaster", "local@domain"),
    ('(control_auth: (token_hashes: ["ABC"]))', "control_auth.token_hashes[0]", "SHA-256"),
    ('(health: (listen_address: "localhost"))', "health.listen_address", "expected host:port"),
    ('(cluster: (redis_url: "http://x"))', "cluster.redis_url", "redis://"),
    ("(cluster: ())", "cluster", "missing required key 'redis_url'"),
    ("(delivery: 5)", "delivery", "expected a struct"),
    ("(delivery: { 5: 1 })", "delivery", "expected a field name"),
    ("[1, 2]", "", "expected a struct"),
]


@pytest.mark.parametrize(("text", "path", "message"), ERROR_CASES)
def test_schema_errors_name_the_key_path(text: str, path: str, message: str) -> None:
    """Every wrong type or out-of-range value raises ConfigError with its key path."""
    err = error_of(text)
    assert path == err.path
    assert message in err.detail
    assert 1 == err.line
    assert 1 <= err.column <= len(text)
    assert str(err).startswith(f"empath.config.ron:1:{err.column}: ")


def test_format_key_path_quotes_non_identifiers() -> None:
    """Path segments that are not identifiers are quoted; indices use brackets."""
    assert 'a.b."c.d"[2].e' == format_key_path(["a", "b", "c.d", 2, "e"])
    assert "" == format_key_path([])


# --- properties of the model -------------------------------------------------------------


@pytest.mark.parametrize(
    ("extensions", "expected"),
    [
        ((), DEFAULT_MAX_MESSAGE_BYTES),
        ((ListenerExtension(size=0),), DEFAULT_MAX_MESSAGE_BYTES),
        ((ListenerExtension(size=1000),), 1000),
        ((ListenerExtension(starttls=TlsFiles("c", "k")),), DEFAULT_MAX_MESSAGE_BYTES),
    ],
)
def test_max_message_bytes(extensions: tuple[ListenerExtension, ...], expected: int) -> None:
    """SIZE comes from the size extension; absent or 0 means 25 MiB."""
    assert expected == ListenerConfig(extensions=extensions).max_message_bytes


@pytest.mark.parametrize(
    ("socket", "host", "port"),
    [
        ("[::]:1025", "::", 1025),
        ("127.0.0.1:1025", "127.0.0.1", 1025),
        ("0.0.0.0:25", "0.0.0.0", 25),
    ],
)
def test_listener_host_and_port(socket: str, host: str, port: int) -> None:
    """The listener socket string splits into bind host and port."""
    listener = ListenerConfig(socket=socket)
    assert (host, port) == (listener.host, listener.port)


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("mx.example.com", 25, ("mx.example.com", 25)),
        ("mx.example.com:2525", 25, ("mx.example.com", 2525)),
        ("[2001:db8::1]:25", None, ("2001:db8::1", 25)),
        ("[::1]", 53, ("::1", 53)),
        ("::1", 53, ("::1", 53)),
    ],
)
def test_split_host_port(text: str, default: int | None, expected: tuple[str, int]) -> None:
    """host[:port] parsing with an optional default port."""
    assert expected == split_host_port(text, default)


@pytest.mark.parametrize("text", ["", ":25", "[::1", "[::1]x", "h:", "h:x", "h:70000", "a b:1"])
def test_split_host_port_rejects(text: str) -> None:
    """Malformed addresses raise ValueError."""
    with pytest.raises(ValueError, match=r"."):
        split_host_port(text, 25)


def test_domain_config_is_case_insensitive_with_defaults() -> None:
    """domain_config() ignores case and a trailing dot, and returns defaults when absent."""
    config = load('(delivery: (domains: { "Gmail.COM": ( max_connections: 3 ) }))')
    assert ("gmail.com",) == tuple(config.delivery.domains)
    assert 3 == config.delivery.domain_config("GMAIL.com.").max_connections
    default = config.delivery.domain_config("other.net")
    assert DomainConfig() == default
    assert (20, None, False, None) == (
        default.max_connections,
        default.rate_limit,
        default.require_tls,
        default.accept_invalid_certs,
    )


def test_rate_limit_for_domain_falls_back_to_global_values() -> None:
    """A domain limit without burst_size uses the global burst; unknown domains the global rate."""
    config = load(
        "(delivery: (rate_limit: (messages_per_second: 8, burst_size: 9, domain_limits: {"
        ' "Slow.com": (messages_per_second: 1.5) })))'
    )
    rl = config.delivery.rate_limit
    assert (1.5, 9) == rl.for_domain("slow.COM")
    assert (8.0, 9) == rl.for_domain("fast.com")


def test_postmaster_address_defaults_to_hostname() -> None:
    """dsn.postmaster None means postmaster@<hostname>; reporting_mta None means hostname."""
    config = load('(hostname: "mx.example.net")')
    assert "postmaster@mx.example.net" == config.postmaster_address
    assert "mx.example.net" == config.reporting_mta
    spec_spelling = load('(hostname: "h.example", dsn: (postmaster: "postmaster@<hostname>"))')
    assert "postmaster@h.example" == spec_spelling.postmaster_address


# --- loading, discovery, rendering ----------------------------------------------------------


def test_render_config_loads_back_equal() -> None:
    """The effective config printed by --check-config loads back to an equal Config."""
    for text in [FULL_CONFIG, DEV_CONFIG.read_text(encoding="utf-8"), "()"]:
        config = load(text)
        rendered = render_config(config)
        assert "\nEmpath (\n" in rendered
        assert config == load(rendered)


def test_load_config_records_source_path(tmp_path: Path) -> None:
    """load_config remembers which file it read (absolute path)."""
    path = tmp_path / "e.ron"
    path.write_text('(hostname: "h.example")', encoding="utf-8")
    config = load_config(path)
    assert str(path) == config.source_path
    assert f"// read from {path}" in render_config(config)


def test_load_config_error_names_the_file(tmp_path: Path) -> None:
    """Errors from load_config carry the file name it was given."""
    path = tmp_path / "bad.ron"
    path.write_text("(\n  log: (level: 3),\n)", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:2:16: log.level: expected one of" in str(info.value)


def test_load_config_missing_and_non_utf8_files(tmp_path: Path) -> None:
    """An unreadable file and invalid UTF-8 (with its position) are ConfigErrors."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.ron")
    path = tmp_path / "latin1.ron"
    path.write_bytes(b'(\n  hostname: "caf\xe9")')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (2, 17, "not valid UTF-8") == (info.value.line, info.value.column, info.value.detail)


def test_discovery_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--config beats $EMPATH_CONFIG beats ./empath.config.ron beats /etc/empath/."""
    cli, env_file, local, etc = (tmp_path / n for n in ("cli.ron", "env.ron", "local", "etc"))
    for p in (cli, env_file, local, etc):
        p.write_text("()", encoding="utf-8")
    env = {"EMPATH_CONFIG": str(env_file)}
    candidates = (local, etc)
    assert cli == discover_config_path(str(cli), env, candidates=candidates)
    assert env_file == discover_config_path(None, env, candidates=candidates)
    assert local == discover_config_path(None, {}, candidates=candidates)
    local.unlink()
    assert etc == discover_config_path(None, {"EMPATH_CONFIG": ""}, candidates=candidates)


def test_discovery_defaults_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --config or $EMPATH_CONFIG, ./empath.config.ron is used."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empath.config.ron").write_text("()", encoding="utf-8")
    assert Path("empath.config.ron") == discover_config_path(None, {})


def test_named_config_that_is_missing_is_an_error(tmp_path: Path) -> None:
    """A missing --config or $EMPATH_CONFIG file is an error, never a fall-through."""
    local = tmp_path / "local.ron"
    local.write_text("()", encoding="utf-8")
    with pytest.raises(ConfigError, match="named by --config does not exist"):
        discover_config_path(str(tmp_path / "nope.ron"), {}, candidates=(local,))
    with pytest.raises(ConfigError, match=r"named by \$EMPATH_CONFIG is not a file"):
        discover_config_path(None, {"EMPATH_CONFIG": str(tmp_path)}, candidates=(local,))


def test_discovery_lists_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When nothing is found the error lists every place tried, in order."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        discover_config_path(None, {}, candidates=(Path("empath.config.ron"), tmp_path / "etc.ron"))
    assert (
        "no configuration file found; tried --config (not given), $EMPATH_CONFIG (not set), "
        f"./empath.config.ron, {tmp_path / 'etc.ron'}"
    ) in str(info.value)


# --- hypothesis ---------------------------------------------------------------------------

_secs = st.one_of(st.integers(1, 10**6), st.floats(0.001, 1e6))
_count = st.integers(1, 10**6)
_domain = st.from_regex(r"[a-z0-9]{1,10}(\.[a-z]{2,5}){1,2}", fullmatch=True)
_generated = st.fixed_dictionaries(
    {
        "hostname": st.from_regex(
            r"[a-z]([a-z0-9-]{0,9}[a-z0-9])?(\.[a-z]{2,6}){0,2}", fullmatch=True
        ),
        "delivery": st.fixed_dictionaries(
            {
                "max_attempts": _count,
                "base_retry_delay_secs": st.floats(0.001, 86400),
                "retry_jitter_factor": st.floats(0, 1),
                "accept_invalid_certs": st.booleans(),
                "domains": st.dictionaries(
                    _domain,
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "mx_override": st.one_of(st.none(), st.just("127.0.0.1:2526")),
                            "require_tls": st.booleans(),
                            "accept_invalid_certs": st.one_of(st.none(), st.booleans()),
                            "max_connections": _count,
                            "rate_limit": st.one_of(st.none(), _count),
                        },
                    ),
                    max_size=3,
                ),
            }
        ),
        "smtp_controller": st.fixed_dictionaries(
            {
                "listeners": st.lists(
                    st.fixed_dictionaries(
                        {
                            "socket": st.builds(
                                "{}:{}".format,
                                st.sampled_from(["127.0.0.1", "[::]", "[::1]", "0.0.0.0"]),
                                st.integers(0, 65535),
                            ),
                            "max_recipients": _count,
                            "context": st.dictionaries(st.text(max_size=8), st.text(max_size=8)),
                        }
                    ),
                    min_size=1,
                    max_size=3,
                )
            }
        ),
        "log": st.fixed_dictionaries(
            {
                "level": st.sampled_from(["error", "warn", "info", "debug", "trace"]),
                "format": st.sampled_from(["json", "text"]),
            }
        ),
    }
)


@given(_generated)
def test_generated_configs_round_trip_through_ron(value: dict[str, Any]) -> None:
    """Configs generated as Python values → dumps → load give back the same values."""
    config = load(dumps(value, name="Empath"))
    assert value["hostname"] == config.hostname
    d = value["delivery"]
    assert d["max_attempts"] == config.delivery.max_attempts
    assert float(d["base_retry_delay_secs"]) == config.delivery.base_retry_delay_secs
    assert d["retry_jitter_factor"] == config.delivery.retry_jitter_factor
    assert d["accept_invalid_certs"] == config.delivery.accept_invalid_certs
    assert {k: DomainConfig(**v) for k, v in d["domains"].items()} == config.delivery.domains
    listeners = config.smtp_controller.listeners
    assert [ListenerConfig(**item) for item in value["smtp_controller"]["listeners"]] == list(
        listeners
    )
    assert (value["log"]["level"], value["log"]["format"]) == (config.log.level, config.log.format)
    assert config == load(render_config(config))


@given(st.data())
def test_mutated_full_config_raises_only_config_error(data: st.DataObject) -> None:
    """Corrupting a full config never raises anything but ConfigError, positioned in the text."""
    text = FULL_CONFIG
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(text)))
        if data.draw(st.booleans()):
            text = text[:at] + text[at + data.draw(st.integers(1, 4)) :]
        else:
            text = text[:at] + data.draw(st.sampled_from([*'()[]{}:,"0.-_aZ ', "None"])) + text[at:]
    try:
        load(text)
    except ConfigError as err:
        lines = text.split("\n")
        assert 1 <= err.line <= len(lines)
        assert 1 <= err.column <= len(lines[err.line - 1]) + 1
