"""SIGTERM drains in-flight deliveries and persists the outcome; retry units can be made due now."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from empath.app import App
from empath.config.load import loads_config
from empath.queue.index import UnitKey
from empath.spool.model import UnitStatus
from tests.daemon import Daemon, ThreadedPeer, submit, to_ron
from tests.helpers import free_port, wait_for


def test_sigterm_waits_for_an_in_flight_delivery_and_it_is_not_repeated(tmp_path: Path) -> None:
    """A delivery whose final reply is slow completes during shutdown; after restart it is gone."""
    with ThreadedPeer({"delay_secs": {"data_end": 2.0}}) as peer:
        daemon = Daemon(
            tmp_path / "d",
            {"delivery": {"domains": {"slow.test": {"mx_override": peer.address}}}},
        )
        daemon.start()
        msg_id = submit(daemon.smtp_port, "s@origin.test", ["r@slow.test"], "Subject: d\n\nx\n")
        # wait until the peer has the body and is sitting on its reply
        wait_for(
            lambda: any("DATA" in c.upper() for s in peer.sessions() for c in s.commands),
            10,
            what="the delivery to reach DATA",
        )
        assert not peer.delivered()
        assert daemon.proc is not None
        daemon.signal(15)
        assert 0 == daemon.proc.wait(40)
        daemon.stop()  # already exited: closes the log
        assert 1 == len(peer.delivered())
        assert daemon.logs("Delivered", message_id=msg_id)

        # restart on the same spool: nothing is left to send again
        daemon.start()
        try:
            assert 200 == daemon.http_status("/health/ready")
            assert not daemon.logs("Delivery runner started", units=1)
        finally:
            daemon.stop()
        assert 1 == len(peer.delivered())


def test_process_now_makes_a_waiting_retry_due_at_once(tmp_path: Path) -> None:
    """A unit waiting an hour for its retry is attempted immediately after process_now()."""
    dead = free_port()
    config = loads_config(
        to_ron(
            {
                "hostname": "empath.test",
                "smtp_controller": {"listeners": [{"socket": f"127.0.0.1:{free_port()}"}]},
                "spool": {"type": "Memory"},
                "delivery": {
                    "base_retry_delay_secs": 3600,
                    "retry_jitter_factor": 0.0,
                    "domains": {"later.test": {"mx_override": f"127.0.0.1:{dead}"}},
                },
                "health": {"enabled": False},
                "control_socket": str(tmp_path / "sock"),
            }
        )
    )

    async def scenario() -> None:
        app = App(config)
        serving = asyncio.create_task(app.serve())
        try:
            await _process_now_scenario(app, dead)
        finally:  # a failed assertion must not leave the listener's socket behind
            app.request_stop("test")
            assert 0 == await serving

    asyncio.run(scenario())


async def _process_now_scenario(app: App, dead: int) -> None:
    while not app.listeners.bound:
        await asyncio.sleep(0.01)
    host, port = app.listeners.addresses[0]
    await asyncio.to_thread(_send, host, port)
    msg = await _wait_for_status(app, UnitStatus.RETRY)
    first = msg.units[0]
    assert 1 == first.attempts
    assert first.next_attempt_at > app.clock.now() + 3000
    assert 0.0 <= app.runner.heartbeat_age_s() < 2.0
    # The spool shows RETRY as soon as the outcome is written; the runner puts the
    # unit back in the schedule once that write is durable.  process_now() (like
    # `postqueue -f`) leaves a unit that is still in flight alone, so wait for that.
    key = UnitKey(msg.id, first.domain)
    for _ in range(500):
        if key in app.scheduler and not app.scheduler.is_in_flight(key):
            break
        await asyncio.sleep(0.01)

    with peer_on(dead):
        assert 1 == app.runner.process_now()
        while len(app.spool):
            await asyncio.sleep(0.02)


def _send(host: str, port: int) -> None:
    with smtplib.SMTP(host, port) as client:
        client.sendmail("s@origin.test", ["r@later.test"], b"Subject: p\r\n\r\nnow\r\n")


async def _wait_for_status(app: App, status: UnitStatus):  # type: ignore[no-untyped-def]
    for _ in range(500):
        for msg in app.spool.messages():
            if msg.units and msg.units[0].status is status:
                return msg
        await asyncio.sleep(0.02)
    raise AssertionError(f"no unit reached {status}")


class peer_on:  # noqa: N801 - used as a context manager
    """A scripted peer bound to the port that was dead until now."""

    def __init__(self, port: int) -> None:
        self.peer = ThreadedPeer(port=port)

    def __enter__(self) -> ThreadedPeer:
        return self.peer.start()

    def __exit__(self, *exc: object) -> None:
        self.peer.stop()
