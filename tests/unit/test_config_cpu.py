"""Config ``cpu`` (DESIGN §11): a node pinned to one CPU steers only its reuse_port
listeners (SO_INCOMING_CPU); without ``cpu`` nothing changes."""

from __future__ import annotations

import pytest

from empath.config.derive import derive
from empath.config.load import loads_config
from empath.config.reload import plan_reload
from empath.errors import ConfigError

LISTENERS = """listeners: [ ( socket: "127.0.0.1:2525", reuse_port: true ),
                             ( socket: "127.0.0.1:2526" ) ]"""


def test_a_pinned_node_steers_its_reuse_port_listeners_only() -> None:
    config = loads_config(f"Empath( cpu: 1, smtp_controller: ( {LISTENERS} ) )")
    assert config.cpu == 1
    shared, own = derive(config).listeners
    assert (shared.reuse_port, shared.incoming_cpu) == (True, 1)
    assert (own.reuse_port, own.incoming_cpu) == (False, None)


def test_without_cpu_no_listener_is_steered() -> None:
    config = loads_config(f"Empath( smtp_controller: ( {LISTENERS} ) )")
    assert config.cpu is None
    assert [s.incoming_cpu for s in derive(config).listeners] == [None, None]


def test_a_negative_cpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="cpu: must be 0 or more"):
        loads_config("Empath( cpu: -1 )")


def test_a_changed_cpu_waits_for_a_restart() -> None:
    """The pinning and the listeners' steering are set up at start only."""
    plan = plan_reload(loads_config("Empath( cpu: 0 )"), loads_config("Empath( cpu: 1 )"))
    assert plan.applied.cpu == 0
    assert plan.pending_keys == ("cpu",)
