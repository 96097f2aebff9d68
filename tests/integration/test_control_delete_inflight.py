"""`queue delete [--bounce]` of a message whose delivery attempt is in flight (issue 14 #4):
the delete waits for the attempt, so what the MX took is logged, counted and never bounced,
and only what is still pending is deleted (and bounced)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import empath.queue.runner as runner_module
from empath.app import App
from empath.config.load import loads_config
from tests.ctl import ctl
from tests.daemon import Daemon, ThreadedPeer, parked_overrides, submit, to_ron
from tests.helpers import free_port, wait_for

SENDER = "ops@origin.test"
BODY = "Subject: delete me\n\nhello\n"


def _in_data(peer: ThreadedPeer) -> bool:
    """The peer has the message's content and sits on its end-of-data reply."""
    return any("DATA" in s.commands for s in peer.sessions())


def test_delete_bounce_of_an_in_flight_message_bounces_only_what_the_mx_did_not_take(
    tmp_path: Path,
) -> None:
    parked = parked_overrides("gone.test")
    with ThreadedPeer({"delay_secs": {"data_end": 1.5}}) as mx, ThreadedPeer() as origin:
        domains = {
            **parked["delivery"]["domains"],
            "slow.test": {"mx_override": mx.address},
            "origin.test": {"mx_override": origin.address},
        }
        overrides = {"delivery": {**parked["delivery"], "domains": domains}}
        with Daemon(tmp_path / "d", overrides) as d:
            msg_id = submit(d.smtp_port, SENDER, ["a@slow.test", "b@gone.test"], BODY)
            wait_for(lambda: _in_data(mx), what="the attempt in flight at end of data")
            out = ctl(d, "--json", "queue", "delete", msg_id, "--bounce", "--yes")
            assert 0 == out.returncode, out.stderr
            # The attempt is on record: a Delivered line, counted in the metrics.
            (line,) = d.logs("Delivered", message_id=msg_id)
            assert "slow.test" == line["fields"]["domain"]
            metrics = d.http_get("/metrics")
            assert 'empath_delivery_attempts_total{domain="slow.test",smtp_code="250"' in (
                metrics.replace('status="delivered",', "")
            )
            # The DSN names only the recipient that was still pending.
            (dsn,) = origin.wait_delivered(1)
            text = dsn.body.decode(errors="replace")
            assert "b@gone.test" in text
            assert "a@slow.test" not in text
            reply = json.loads(out.stdout)
            assert ["a@slow.test"] == reply["delivered"]  # the MX took it meanwhile
            assert reply["dsn_id"]
            assert [] == d.logs("Message deleted during delivery")
            assert 1 == len(mx.delivered())


def test_delete_without_bounce_of_a_message_the_attempt_delivers_says_so(tmp_path: Path) -> None:
    with ThreadedPeer({"delay_secs": {"data_end": 1.5}}) as mx:
        overrides = {"delivery": {"domains": {"slow.test": {"mx_override": mx.address}}}}
        with Daemon(tmp_path / "d", overrides) as d:
            msg_id = submit(d.smtp_port, SENDER, ["a@slow.test"], BODY)
            wait_for(lambda: _in_data(mx), what="the attempt in flight at end of data")
            out = ctl(d, "queue", "delete", msg_id, "--yes")
            assert 0 == out.returncode, out.stderr
            assert f"not deleted: {msg_id} was delivered by the attempt in flight" in out.stdout
            assert d.logs("Delivered", message_id=msg_id)
            assert d.logs("Message delivered before the operator's delete", message_id=msg_id)
            assert [] == d.logs("Message deleted by the operator", message_id=msg_id)


def test_bounce_by_filter_waits_for_the_attempt_and_bounces_nothing_it_delivered(
    tmp_path: Path,
) -> None:
    parked = parked_overrides("gone.test")
    with ThreadedPeer({"delay_secs": {"data_end": 1.5}}) as mx, ThreadedPeer() as origin:
        domains = {
            **parked["delivery"]["domains"],
            "slow.test": {"mx_override": mx.address},
            "origin.test": {"mx_override": origin.address},
        }
        overrides = {"delivery": {**parked["delivery"], "domains": domains}}
        with Daemon(tmp_path / "d", overrides) as d:
            msg_id = submit(d.smtp_port, SENDER, ["a@slow.test", "b@gone.test"], BODY)
            wait_for(lambda: _in_data(mx), what="the attempt in flight at end of data")
            out = ctl(d, "--json", "queue", "bounce", "--domain", "slow.test", "--yes")
            assert 0 == out.returncode, out.stderr
            assert 0 == json.loads(out.stdout)["dsns"]  # a@slow.test was delivered meanwhile
            (line,) = d.logs("Delivered", message_id=msg_id)
            assert "slow.test" == line["fields"]["domain"]
            listed = ctl(d, "--json", "queue", "list").stdout.splitlines()
            assert ["gone.test"] == [json.loads(x)["domain"] for x in listed]  # still queued


def test_a_delete_that_outwaits_the_attempt_is_done_when_the_attempt_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, with the wait cut to 0.2 s: the delete answers "pending"; when the slow
    attempt ends, the message is deleted and only the still-pending recipient bounced."""
    monkeypatch.setattr(runner_module, "DELETE_WAIT_S", 0.2)
    closed = free_port()
    with ThreadedPeer({"delay_secs": {"data_end": 1.5}}) as mx:
        config = loads_config(
            to_ron(
                {
                    "hostname": "empath.test",
                    "smtp_controller": {"listeners": [{"socket": f"127.0.0.1:{free_port()}"}]},
                    "spool": {"type": "Memory"},
                    "delivery": {
                        "base_retry_delay_secs": 3600,
                        "domains": {
                            "slow.test": {"mx_override": mx.address},
                            "gone.test": {"mx_override": f"127.0.0.1:{closed}"},
                        },
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
                while not app.listeners.bound:
                    await asyncio.sleep(0.01)
                _host, port = app.listeners.addresses[0]
                msg_id = await asyncio.to_thread(
                    submit, port, SENDER, ["a@slow.test", "b@gone.test"], BODY
                )
                while not _in_data(mx):
                    await asyncio.sleep(0.02)
                done = await app.runner.delete(msg_id, bounce=True)
                assert (True, None) == (done.pending, done.dsn_id)
                assert msg_id in {m.id for m in app.spool.messages()}  # not yet
                for _ in range(250):  # the attempt ends after 1.5 s
                    if msg_id not in {m.id for m in app.spool.messages()}:
                        break
                    await asyncio.sleep(0.02)
                left = list(app.spool.messages())
                assert [] == [m for m in left if m.id == msg_id]
                (dsn,) = [m for m in left if m.envelope.is_dsn]
                assert (SENDER,) == dsn.envelope.recipients
                body = await app.spool.read_body(dsn.id)
                assert b"b@gone.test" in body and b"a@slow.test" not in body
                assert 1 == len(mx.delivered())
            finally:
                app.request_stop("test")
                assert 0 == await serving

        asyncio.run(scenario())
