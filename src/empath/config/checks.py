"""Field rules for the configuration schema: the :func:`rule` field builder, the
value checks it takes (``positive``, ``valid_hostname``, ``socket_address`` ...)
and the small parsers they share (:func:`split_host_port`).

``empath.config.model`` declares the structs with these; ``empath.config.load``
runs them while binding (see the model's docstring for the metadata keys).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
import socket
from collections.abc import Callable
from dataclasses import field
from typing import Any, Final, Protocol, runtime_checkable

Check = Callable[[Any], "str | None"]


@runtime_checkable
class CrossChecked(Protocol):
    """A config struct with rules across its fields (checked after binding)."""

    def consistency_errors(self) -> list[tuple[str, str]]:
        """``(field name, message)`` for each rule the values break."""
        ...


# --- field rules -------------------------------------------------------------


def rule(
    default: Any = None,
    *,
    factory: Callable[[], Any] | None = None,
    check: Check | None = None,
    check_each: Check | None = None,
    aliases: tuple[str, ...] = (),
    lower_keys: bool = False,
    secret: bool = False,
) -> Any:
    """A dataclass field with a default (or ``factory``) and binder metadata.
    ``secret``: a URL that may carry a password, shown only through
    :func:`empath.textsafe.redact_url`."""
    metadata = {
        "check": check,
        "check_each": check_each,
        "aliases": aliases,
        "lower_keys": lower_keys,
        "secret": secret,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def required(*, check: Check | None = None, secret: bool = False) -> Any:
    """A field the config must give (no default)."""
    return field(metadata={"check": check, "secret": secret})


def positive(value: float) -> str | None:
    if not math.isfinite(value) or value <= 0:
        return "must be greater than 0"
    return None


def at_least(value: int, low: int) -> str | None:
    return None if value >= low else f"must be at least {low}"


def non_negative(value: float) -> str | None:
    if not math.isfinite(value) or value < 0:
        return "must be 0 or more"
    return None


def fraction(value: float) -> str | None:
    if not 0.0 <= value <= 1.0:
        return "must be between 0 and 1"
    return None


def non_empty(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    return None


_HOSTNAME: Final = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")


def valid_hostname(value: str) -> str | None:
    if not _HOSTNAME.fullmatch(value):
        return f"{value!r} is not a valid host name"
    return None


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``"[::]:1025"`` → ``("::", 1025)``; ``"mx.example.com"`` → ``(host, default_port)``.

    Raises ValueError with a readable message when the text is malformed or the
    port is missing and there is no default.
    """
    host: str
    port_text: str | None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"{text!r}: missing ']' after an IPv6 address")
        host, rest = text[1:close], text[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"{text!r}: write IPv6 addresses with a port as [addr]:port") from None
        host, port_text = text, None
    else:
        host, _, port_text = text.partition(":")
        port_text = port_text if ":" in text else None
    is_ipv6 = ":" in host
    if not host or (not is_ipv6 and valid_hostname(host) is not None):
        raise ValueError(f"{text!r}: not a valid host name or address")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: expected host:port")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def _address_check(default_port: int | None) -> Check:
    def check(value: str) -> str | None:
        try:
            split_host_port(value, default_port)
        except ValueError as exc:
            return str(exc)
        return None

    return check


socket_address = _address_check(None)
host_optional_port = _address_check(0)


def ip_network(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"{value!r} is not an IP network (e.g. 10.0.0.0/8 or ::1/128)"
    return None


def sha256_hex(value: str) -> str | None:
    if re.fullmatch(r"[0-9a-f]{64}", value) is None:
        return "must be a lowercase hex SHA-256 digest (64 characters)"
    return None


def mailbox(value: str) -> str | None:
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        return f"{value!r} is not an address of the form local@domain"
    return None


def http_url(value: str) -> str | None:
    if not value.startswith(("http://", "https://")) or len(value.split("//", 1)[1]) == 0:
        return "must be an http:// or https:// URL"
    return None


def valid_redis_url(value: str) -> str | None:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        return "must be a redis://, rediss:// or unix:// URL"
    return None


def normalise_domain(domain: str) -> str:
    """Lower-case and drop the trailing root dot: ``"Gmail.COM."`` → ``"gmail.com"``."""
    return domain.lower().rstrip(".")


@functools.cache
def system_fqdn() -> str:
    """The machine's fully qualified name (``socket.getfqdn()``), looked up once."""
    return socket.getfqdn() or "localhost"
