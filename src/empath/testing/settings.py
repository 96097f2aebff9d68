"""Settings for tests, derived from the config model's defaults (its one source).

A test that needs a component's settings takes the defaults the daemon would
derive from an empty config and changes only what it is about, so no number is
written down twice.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from empath.config.derive import listener_spec as _listener_spec
from empath.config.derive import routing_settings
from empath.config.model import Config, ListenerConfig, SmtpControllerConfig
from empath.dns.cache import CacheLimits
from empath.transport.listener import ListenerSpec


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
