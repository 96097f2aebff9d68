"""The configuration schema (DESIGN §2): frozen dataclasses with their defaults.

Why this module is longer than 600 lines: it is the whole schema in one place (every
section an operator can write, with its default and check), so a key is found by reading
one file; splitting it by section would scatter the defaults DESIGN §2 lists together.

Theory of operation
-------------------
Each class is one RON struct; its attribute names are exactly the RON keys, so
``config.delivery.smtp_timeouts.connect_secs`` reads the value written at
``delivery: ( smtp_timeouts: ( connect_secs: ... ) )``. The binder in
``empath.config.load`` walks these classes generically through their type
hints (``int``, ``float``, ``str``, ``bool``, ``Literal[...]``, ``X | None``,
``tuple[X, ...]`` for lists, ``Mapping[str, X]`` for maps, nested dataclasses),
so adding a key is adding one annotated attribute here.

Per-field rules live in the field metadata, built with :func:`~empath.config.checks.rule`
(the checks themselves are in ``empath.config.checks``):

* ``check`` — a function of the bound value returning an error message or None
  (``must be greater than 0``), reported at the value's line:column;
* ``check_each`` — the same, applied to every element of a list or value of a map;
* ``aliases`` — other accepted key names (``smtp`` for ``smtp_controller``);
* ``lower_keys`` — map keys are domains: lower-cased, trailing dot removed;
* ``ron=False`` — not a config key at all (``Config.source_path``).

Cross-field rules are the :class:`CrossChecked` protocol: a
``consistency_errors()`` method returning ``(field name, message)`` pairs.
Durations are ``*_secs`` floats (an integer in the file is accepted); counts are
ints (a float in the file is an error).

Constructing these classes directly (tests, the composition root) performs no
validation: only configs read through the loader are checked.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from empath.config.checks import (
    CrossChecked,
    at_least,
    fraction,
    host_optional_port,
    http_url,
    ip_network,
    mailbox,
    non_empty,
    non_negative,
    normalise_domain,
    positive,
    required,
    rule,
    sha256_hex,
    socket_address,
    split_host_port,
    system_fqdn,
    valid_hostname,
    valid_redis_url,
)
from empath.config.dkim import DkimConfig
from empath.modules.api import OnError
from empath.spool.store import SEGMENT_BYTES

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AuditConfig",
    "AuthLimits",
    "AuthQuotas",
    "CircuitBreakerConfig",
    "ClusterConfig",
    "Config",
    "ControlAuthConfig",
    "CrossChecked",
    "DeliveryConfig",
    "DkimConfig",
    "DnsConfig",
    "DomainConfig",
    "DomainRateLimit",
    "DsnConfig",
    "HealthConfig",
    "ListenerAuth",
    "ListenerConfig",
    "ListenerExtension",
    "ListenerTimeouts",
    "ListenerTls",
    "LogConfig",
    "MetricsConfig",
    "ModuleConfig",
    "ModuleTimeouts",
    "RateLimitConfig",
    "RelayConfig",
    "SmtpControllerConfig",
    "SmtpTimeouts",
    "SpoolConfig",
    "TlsFiles",
    "normalise_domain",
    "split_host_port",
]

DEFAULT_MAX_MESSAGE_BYTES: Final = 26_214_400  # 25 MiB, DESIGN §2 listener "size"

LogLevel = Literal["error", "warn", "info", "debug", "trace"]
LogFormat = Literal["json", "text"]
SpoolType = Literal["File", "Memory"]


# --- SMTP controller ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenerTimeouts:
    """RFC 5321 §4.5.3.2 server timeouts, in seconds."""

    command_secs: float = rule(300.0, check=positive)
    data_init_secs: float = rule(120.0, check=positive)
    data_block_secs: float = rule(180.0, check=positive)
    data_termination_secs: float = rule(600.0, check=positive)
    connection_secs: float = rule(1800.0, check=positive)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for STARTTLS."""

    certificate: str = required(check=non_empty)
    key: str = required(check=non_empty)


@dataclass(frozen=True, slots=True)
class ListenerExtension:
    """One element of ``extensions: [ { "size": N }, { "starttls": {...} } ]``."""

    size: int | None = rule(None, check=non_negative)
    starttls: TlsFiles | None = None


# --- submission (DESIGN §13): listener ``tls:`` and ``auth:`` ----------------------


TlsMode = Literal["starttls", "implicit"]


def _some(value: tuple[str, ...]) -> str | None:
    return None if value else "must not be empty"


AuthMechanismName = Literal["PLAIN", "LOGIN"]


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """``tls: ( mode: "starttls" | "implicit", certificate, key )``: ``implicit`` is
    RFC 8314 submission over TLS (port 465): the handshake comes before the greeting."""

    certificate: str = required(check=non_empty)
    key: str = required(check=non_empty)
    mode: TlsMode = "starttls"


@dataclass(frozen=True, slots=True)
class AuthLimits:
    """Brute-force limits (DESIGN §13; the trade-off is in docs/RUNBOOKS.md).

    Failures are counted in a sliding window of ``window_secs`` per client IP (IPv6
    by /64) and per login name.  An IP over ``max_failures_per_ip`` gets ``454 4.7.0``
    for ``block_secs``.  A login over ``max_failures_per_login`` is slowed down, not
    locked out: each further failed attempt waits ``delay_secs`` more (up to
    ``max_delay_secs``) before its 535, while a right password is never delayed."""

    window_secs: float = rule(600.0, check=positive)
    max_failures_per_ip: int = rule(10, check=positive)
    block_secs: float = rule(900.0, check=positive)
    max_failures_per_login: int = rule(5, check=positive)
    delay_secs: float = rule(1.0, check=non_negative)
    max_delay_secs: float = rule(10.0, check=non_negative)


@dataclass(frozen=True, slots=True)
class AuthQuotas:
    """Per-user defaults (a user's entry in the users file may override them);
    0 means unlimited."""

    messages_per_hour: int = rule(1000, check=non_negative)
    recipients_per_message: int = rule(100, check=non_negative)


@dataclass(frozen=True, slots=True)
class ListenerAuth:
    """``auth: ( required: true, users_file: "/etc/empath/users" )``: SMTP AUTH on this
    listener, under TLS only."""

    users_file: str = required(check=non_empty)
    required: bool = True  # MAIL before AUTH → 530 5.7.0
    mechanisms: tuple[AuthMechanismName, ...] = rule(("PLAIN", "LOGIN"), check=_some)
    # successful verifications remembered this long (0: verify every time)
    cache_secs: float = rule(300.0, check=non_negative)
    limits: AuthLimits = field(default_factory=AuthLimits)
    quotas: AuthQuotas = field(default_factory=AuthQuotas)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    socket: str = rule("[::]:1025", check=socket_address)
    context: Mapping[str, str] = field(default_factory=dict)
    timeouts: ListenerTimeouts = field(default_factory=ListenerTimeouts)
    extensions: tuple[ListenerExtension, ...] = ()
    max_connections: int = rule(1000, check=positive)
    max_connections_per_ip: int = rule(50, check=positive)
    max_recipients: int = rule(100, check=positive)
    # SO_REUSEPORT: several Empath nodes on one host share this port (DESIGN §11)
    reuse_port: bool = False
    tls: ListenerTls | None = None  # DESIGN §13 (starttls or implicit); or extensions' starttls
    auth: ListenerAuth | None = None  # DESIGN §13: a submission listener

    def consistency_errors(self) -> list[tuple[str, str]]:
        errors: list[tuple[str, str]] = []
        if self.tls is not None and any(e.starttls is not None for e in self.extensions):
            errors.append(("tls", "give the certificate either in tls or in extensions.starttls"))
        if self.auth is not None and self.tls_files is None:
            errors.append(("auth", "needs tls: AUTH is offered only under TLS"))
        return errors

    @property
    def max_message_bytes(self) -> int:
        """The SIZE limit: the last ``size`` extension, or 25 MiB when absent or 0."""
        size = 0
        for ext in self.extensions:
            if ext.size is not None:
                size = ext.size
        return size or DEFAULT_MAX_MESSAGE_BYTES

    @property
    def tls_files(self) -> TlsFiles | None:
        """The TLS certificate and key, when configured (``tls`` or ``starttls``)."""
        if self.tls is not None:
            return TlsFiles(self.tls.certificate, self.tls.key)
        for ext in self.extensions:
            if ext.starttls is not None:
                return ext.starttls
        return None

    @property
    def host(self) -> str:
        """Address to bind, brackets removed (``"::"`` for ``"[::]:1025"``)."""
        return split_host_port(self.socket)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.socket)[1]


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Who may relay: clients in ``trusted_networks`` anywhere, others only to
    ``accepted_domains`` (lower-cased)."""

    trusted_networks: tuple[str, ...] = rule(("127.0.0.0/8", "::1/128"), check_each=ip_network)
    accepted_domains: tuple[str, ...] = rule((), check_each=valid_hostname)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "accepted_domains", tuple(normalise_domain(d) for d in self.accepted_domains)
        )

    def ip_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``trusted_networks`` parsed (compute once at start-up, not per command)."""
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.trusted_networks)


def _default_listeners() -> tuple[ListenerConfig, ...]:
    return (ListenerConfig(),)


@dataclass(frozen=True, slots=True)
class SmtpControllerConfig:
    listeners: tuple[ListenerConfig, ...] = field(default_factory=_default_listeners)
    relay: RelayConfig = field(default_factory=RelayConfig)
    # DESIGN §3 loops: more Received: header fields than this → 554 5.4.6 (Postfix's
    # hopcount_limit, same default).
    hop_limit: int = rule(50, check=positive)

    def consistency_errors(self) -> list[tuple[str, str]]:
        # Listeners naming one users file share its users, failure counters and cache.
        seen: dict[str, ListenerAuth] = {}
        for lc in self.listeners:
            if lc.auth is None:
                continue
            other = seen.setdefault(lc.auth.users_file, lc.auth)
            if other.limits != lc.auth.limits or other.cache_secs != lc.auth.cache_secs:
                return [("listeners", f"listeners using users_file {lc.auth.users_file!r} "
                         "must have the same auth limits and cache_secs")]  # fmt: skip
        return []


# --- spool -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    """``File`` is the durable on-disk store; ``Memory`` is for tests only."""

    type: SpoolType = "File"
    path: str = rule("/var/spool/empath", check=non_empty)
    # The log rotates to a new segment file at this size; compaction frees whole segments.
    segment_bytes: int = rule(SEGMENT_BYTES, check=lambda v: at_least(v, 64 * 1024))
    compact_interval_secs: float = rule(30.0, check=positive)
    # Group commit delay: the writer may hold a small batch open this long for more
    # records while they are arriving fast (spool/commit_delay.py); 0 writes at once.
    commit_delay_us: int = rule(0, check=lambda v: None if 0 <= v <= 1000 else "must be 0 to 1000")
    # New segments are written full of zeros beforehand by a helper thread, so group
    # commits overwrite blocks instead of appending (spool/preformat.py); false: appended.
    preformat: bool = True


# --- delivery ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmtpTimeouts:
    """Outbound client timeouts per command, in seconds."""

    connect_secs: float = rule(30.0, check=positive)
    ehlo_secs: float = rule(30.0, check=positive)
    starttls_secs: float = rule(30.0, check=positive)
    mail_from_secs: float = rule(30.0, check=positive)
    rcpt_to_secs: float = rule(30.0, check=positive)
    data_secs: float = rule(120.0, check=positive)
    quit_secs: float = rule(10.0, check=positive)
    # The cap on one whole attempt (connect → last reply of the transaction); None:
    # the sum of the phase timeouts above with data counted twice (content, then the
    # reply to the final dot) - 400 s with the defaults.
    attempt_secs: float | None = rule(None, check=positive)


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """``nameservers`` empty means the system resolver; entries are "host" or "host:port"."""

    nameservers: tuple[str, ...] = rule((), check_each=host_optional_port)
    timeout_secs: float = rule(5.0, check=positive)
    cache_size: int = rule(10_000, check=non_negative)
    min_cache_ttl_secs: float = rule(60.0, check=non_negative)
    max_cache_ttl_secs: float = rule(3600.0, check=non_negative)
    negative_ttl_secs: float = rule(300.0, check=non_negative)
    # RFC 8767 serve-stale: an expired answer is still used for this long while the
    # resolver fails (timeouts, SERVFAIL); 0 turns it off.
    serve_stale_secs: float = rule(86400.0, check=non_negative)

    def nameserver_addresses(self) -> tuple[tuple[str, int], ...]:
        """``(host, port)`` pairs, port 53 when not written."""
        return tuple(split_host_port(ns, 53) for ns in self.nameservers)

    def consistency_errors(self) -> list[tuple[str, str]]:
        if self.min_cache_ttl_secs > self.max_cache_ttl_secs:
            return [("min_cache_ttl_secs", "must not exceed max_cache_ttl_secs")]
        return []


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """Per-recipient-domain settings; ``rate_limit`` is messages per minute."""

    mx_override: str | None = rule(None, check=host_optional_port)
    require_tls: bool = False
    accept_invalid_certs: bool | None = None
    max_connections: int = rule(20, check=positive)
    rate_limit: int | None = rule(None, check=positive)

    def mx_address(self) -> tuple[str, int] | None:
        """``mx_override`` as ``(host, port)``, port 25 when not written."""
        if self.mx_override is None:
            return None
        return split_host_port(self.mx_override, 25)


_DEFAULT_DOMAIN: Final = DomainConfig()


@dataclass(frozen=True, slots=True)
class DomainRateLimit:
    messages_per_second: float = required(check=positive)
    burst_size: int | None = rule(None, check=positive)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Token buckets: a global default and per-domain overrides (keys lower-cased)."""

    messages_per_second: float = rule(10.0, check=positive)
    burst_size: int = rule(20, check=positive)
    domain_limits: Mapping[str, DomainRateLimit] = rule(factory=dict, lower_keys=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain_limits", _lower_keys(self.domain_limits))

    def for_domain(self, domain: str) -> tuple[float, int]:
        """Effective ``(messages_per_second, burst_size)`` for a recipient domain."""
        limit = self.domain_limits.get(normalise_domain(domain))
        if limit is None:
            return self.messages_per_second, self.burst_size
        burst = self.burst_size if limit.burst_size is None else limit.burst_size
        return limit.messages_per_second, burst


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    failure_threshold: int = rule(5, check=positive)
    failure_window_secs: float = rule(60.0, check=positive)
    timeout_secs: float = rule(300.0, check=positive)
    success_threshold: int = rule(1, check=positive)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    max_concurrent_deliveries: int = rule(64, check=positive)
    max_attempts: int = rule(25, check=positive)
    base_retry_delay_secs: float = rule(60.0, check=positive)
    max_retry_delay_secs: float = rule(86_400.0, check=positive)
    retry_jitter_factor: float = rule(0.2, check=fraction)
    message_expiration_secs: float = rule(432_000.0, check=positive)
    failed_retention_secs: float = rule(604_800.0, check=non_negative)
    scan_interval_secs: float = rule(30.0, check=positive)
    process_interval_secs: float = rule(10.0, check=positive)
    accept_invalid_certs: bool = False
    smtp_timeouts: SmtpTimeouts = field(default_factory=SmtpTimeouts)
    dns: DnsConfig = field(default_factory=DnsConfig)
    domains: Mapping[str, DomainConfig] = rule(factory=dict, lower_keys=True)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", _lower_keys(self.domains))

    def domain_config(self, domain: str) -> DomainConfig:
        """Settings for a recipient domain (case-insensitive); defaults when not listed."""
        return self.domains.get(normalise_domain(domain), _DEFAULT_DOMAIN)

    def consistency_errors(self) -> list[tuple[str, str]]:
        if self.base_retry_delay_secs > self.max_retry_delay_secs:
            return [("base_retry_delay_secs", "must not exceed max_retry_delay_secs")]
        return []


def _lower_keys(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {normalise_domain(k): v for k, v in mapping.items()}


# --- the rest ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DsnConfig:
    """Bounces (RFC 3464). ``postmaster``/``reporting_mta`` None mean derived from hostname."""

    enabled: bool = True
    reporting_mta: str | None = rule(None, check=valid_hostname)
    postmaster: str | None = rule(None, check=mailbox)
    delay_warning_secs: float = rule(14_400.0, check=non_negative)


@dataclass(frozen=True, slots=True)
class ControlAuthConfig:
    """``token_hashes`` are lowercase hex SHA-256 digests of the accepted tokens."""

    enabled: bool = False
    token_hashes: tuple[str, ...] = rule((), check_each=sha256_hex)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``endpoint``: an OTLP/HTTP collector the metrics are pushed to every
    ``push_interval_secs`` (None: only the ``/metrics`` scrape)."""

    enabled: bool = True
    max_domain_cardinality: int = rule(1000, check=positive)
    rate_window_secs: float = rule(300.0, check=positive)
    endpoint: str | None = rule(None, check=http_url, secret=True)
    push_interval_secs: float = rule(15.0, check=positive)


@dataclass(frozen=True, slots=True)
class HealthConfig:
    enabled: bool = True
    listen_address: str = rule("127.0.0.1:8080", check=socket_address)
    max_queue_size: int = rule(10_000, check=positive)

    @property
    def host(self) -> str:
        return split_host_port(self.listen_address)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen_address)[1]


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """``redact_message_content``: kept for the original's files.  Audit lines never
    carry message content (subject, headers, body) whatever its value."""

    enabled: bool = True
    redact_sender: bool = False
    redact_recipients: bool = False
    redact_message_content: bool = True


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = "info"
    format: LogFormat = "json"


@dataclass(frozen=True, slots=True)
class ModuleTimeouts:
    """How long one call into a module may take (DESIGN §14).  Python modules use
    ``command_secs`` for the connection-stage hooks and delivery events and
    ``end_of_message_secs`` for ``on_data``; milters use all three, as Postfix's
    ``milter_connect_timeout``, ``milter_command_timeout`` and ``milter_content_timeout``."""

    connect_secs: float = rule(10.0, check=positive)
    command_secs: float = rule(30.0, check=positive)
    end_of_message_secs: float = rule(120.0, check=positive)


ModuleType = Literal["Python", "Milter", "SharedLibrary"]
ModuleOnError = OnError  # the modules' own type (empath.modules.api)


def _milter_address(value: str) -> str | None:
    if value.startswith("unix:"):
        return None if value[5:] else "unix: needs a socket path (unix:/run/milter.sock)"
    if value.startswith("inet:"):
        rest = value[5:]
        if "@" in rest:  # Postfix also writes inet:port@host
            port_text, _, host = rest.partition("@")
            rest = f"{host}:{port_text}"
        try:
            split_host_port(rest)
        except ValueError as exc:
            return str(exc)
        return None
    return 'expected "inet:HOST:PORT" or "unix:/path/to.sock"'


@dataclass(frozen=True, slots=True)
class ModuleConfig:
    """One entry of ``modules`` (DESIGN §14), applied in order.

    ``type: "Python"`` loads ``name`` (``package.module:Factory``) and calls the
    factory once with ``arguments`` (a map, or a list of strings as in the original's
    entries).  ``type: "Milter"`` connects to ``address`` (``inet:HOST:PORT`` or
    ``unix:PATH``); ``name`` is then only its label in metrics and status.
    ``SharedLibrary`` (the Rust original's native modules) is refused, naming the two
    replacements.  ``on_error`` decides what a timeout, an exception or an
    unreachable milter means: ``tempfail`` (451 4.7.1), ``reject`` (550 5.7.1) or
    ``accept`` (carry on as if the module had said nothing)."""

    type: ModuleType = required(check=non_empty)  # noqa: RUF009 (a str Literal, immutable)
    name: str | None = None
    arguments: Any = None
    address: str | None = rule(None, check=_milter_address)
    timeouts: ModuleTimeouts = field(default_factory=ModuleTimeouts)
    on_error: ModuleOnError = "tempfail"

    @property
    def label(self) -> str:
        """The ``module``/``milter`` label of metrics and status lines."""
        if self.name:
            return self.name
        return self.address or self.type

    def consistency_errors(self) -> list[tuple[str, str]]:
        if self.type == "SharedLibrary":
            return [
                (
                    "type",
                    f"SharedLibrary module {self.name!r}: native modules of the Rust "
                    "implementation cannot be loaded by this Empath; write it as a "
                    'Python module (type: "Python", name: "package.module:Factory") or '
                    'run it as a milter (type: "Milter", address: "inet:HOST:PORT"), '
                    "or remove this entry from modules",
                )
            ]
        if self.type == "Python":
            if not self.name or ":" not in self.name:
                return [("name", 'a Python module needs name: "package.module:Factory"')]
            if self.address is not None:
                return [("address", "only a Milter has an address")]
            if self.arguments is not None and not isinstance(self.arguments, dict | list):
                return [("arguments", "expected a map or a list")]
        if self.type == "Milter":
            if self.address is None:
                return [("address", 'a Milter needs address: "inet:HOST:PORT" or "unix:PATH"')]
            if self.arguments is not None:
                return [("arguments", "a Milter takes no arguments")]
        return []


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """DESIGN §11: per-destination policy shared by several nodes through Redis.

    ``node_id`` names this node in heartbeats and ``empathctl cluster status``; the
    default is the host name, so nodes sharing a host must each set their own.
    """

    redis_url: str = required(check=valid_redis_url, secret=True)
    node_id: str = rule(factory=socket.gethostname, check=non_empty)
    key_prefix: str = "empath:"
    timeout_ms: int = rule(250, check=positive)  # per Redis call; then local fallback
    lease_secs: float = rule(15.0, check=positive)  # connection lease life, renewed while held
    heartbeat_secs: float = rule(1.0, check=positive)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole ``empath.config.ron`` (top-level struct, conventionally named ``Empath``)."""

    hostname: str = rule(factory=system_fqdn, check=valid_hostname)
    smtp_controller: SmtpControllerConfig = field(
        default_factory=SmtpControllerConfig, metadata={"aliases": ("smtp",)}
    )
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dsn: DsnConfig = field(default_factory=DsnConfig)
    # Not /tmp (DESIGN §1's first default): any local user could create /tmp/empath.sock
    # and collect empathctl's token, and the shipped unit's PrivateTmp hid it.  The
    # unit's RuntimeDirectory=empath creates /run/empath for the daemon's user.
    control_socket: str = rule("/run/empath/empath.sock", check=non_empty)
    control_auth: ControlAuthConfig = field(default_factory=ControlAuthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    log: LogConfig = field(default_factory=LogConfig)
    cluster: ClusterConfig | None = None
    # DESIGN §11: pin this node to one CPU (read at start); its reuse_port listeners then
    # take the connections the kernel handles on that CPU (SO_INCOMING_CPU)
    cpu: int | None = rule(None, check=non_negative)
    modules: tuple[ModuleConfig, ...] = ()
    dkim: DkimConfig = field(default_factory=DkimConfig)  # DESIGN §12 (config/dkim.py)
    # where the config was read from; not a RON key
    source_path: str | None = field(default=None, compare=False, metadata={"ron": False})

    @property
    def postmaster_address(self) -> str:
        """Envelope/From address of bounces: ``dsn.postmaster`` or ``postmaster@<hostname>``."""
        if self.dsn.postmaster is None:
            return f"postmaster@{self.hostname}"
        # DESIGN §2 writes the default as "postmaster@<hostname>"; honour it verbatim.
        return self.dsn.postmaster.replace("<hostname>", self.hostname)

    @property
    def reporting_mta(self) -> str:
        """The DSN Reporting-MTA name: ``dsn.reporting_mta`` or the hostname."""
        return self.dsn.reporting_mta or self.hostname
