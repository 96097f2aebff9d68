"""What a reload applies and what waits for a restart (issue 14, defect 1)."""

from __future__ import annotations

from dataclasses import replace

from empath.config.model import (
    Config,
    ListenerConfig,
    LogConfig,
    RelayConfig,
    SmtpControllerConfig,
    SpoolConfig,
)
from empath.config.reload import is_reloadable, plan_reload

RUNNING = Config(
    hostname="mx.example",
    smtp_controller=SmtpControllerConfig(
        listeners=(ListenerConfig(socket="127.0.0.1:2525"),),
        relay=RelayConfig(trusted_networks=("127.0.0.0/8",), accepted_domains=("a.test",)),
    ),
    spool=SpoolConfig(path="/var/spool/old"),
    source_path="/etc/empath/empath.config.ron",
)


def test_narrowed_relay_access_is_applied_and_nothing_is_pending() -> None:
    new = replace(
        RUNNING,
        smtp_controller=replace(
            RUNNING.smtp_controller, relay=RelayConfig(trusted_networks=(), accepted_domains=())
        ),
    )
    plan = plan_reload(RUNNING, new)
    assert plan.applied == new
    assert () == plan.pending
    assert any(c.startswith("smtp_controller.relay.trusted_networks:") for c in plan.changes)
    assert any(c.startswith("smtp_controller.relay.accepted_domains:") for c in plan.changes)


def test_restart_only_changes_are_kept_out_of_the_applied_config_and_stay_pending() -> None:
    """The defect: App.reload stored the file's config even for sections it did not
    apply, so the next comparison (config check, status) saw no difference."""
    new = replace(
        RUNNING,
        hostname="other.example",
        smtp_controller=replace(
            RUNNING.smtp_controller, listeners=(ListenerConfig(socket="127.0.0.1:2626"),)
        ),
        spool=SpoolConfig(path="/var/spool/new"),
        log=LogConfig(level="debug", format="text"),
    )
    plan = plan_reload(RUNNING, new)
    assert "/var/spool/old" == plan.applied.spool.path
    assert RUNNING.smtp_controller.listeners == plan.applied.smtp_controller.listeners
    assert "mx.example" == plan.applied.hostname
    assert ("debug", "json") == (plan.applied.log.level, plan.applied.log.format)
    assert {"hostname", "smtp_controller.listeners", "spool.path", "log.format"} == set(
        plan.pending_keys
    )
    assert all("(applies after a restart)" in line for line in plan.pending)
    assert ['log.level: "info" -> "debug"'] == list(plan.changes)
    # reloading the same file again: still pending, nothing new applied
    again = plan_reload(plan.applied, new)
    assert plan.pending == again.pending
    assert () == again.changes
    # the operator reverts the file: nothing pending any more
    reverted = plan_reload(plan.applied, replace(RUNNING, log=LogConfig(level="debug")))
    assert () == reverted.pending


def test_unknown_sections_default_to_restart_only() -> None:
    assert is_reloadable("smtp_controller.relay.trusted_networks")
    assert is_reloadable("delivery.domains.example.com.mx_override")
    assert is_reloadable("health.max_queue_size")
    assert not is_reloadable("health.listen_address")
    assert not is_reloadable("smtp_controller.relay_extra")
    assert not is_reloadable("some_new_section.key")
