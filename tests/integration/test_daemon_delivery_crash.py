"""SIGKILL while deliveries are in flight, then restart: no accepted message is lost.

The first destination (``smtp-sink -W .:10``) takes each message's content but holds
the reply to the final ``.``, so the daemon is killed with deliveries mid-DATA and
more units still waiting for a connection slot.  The restarted daemon is pointed at
a prompt sink; every message the daemon answered 250 must arrive at one of the two
sinks (duplicates are allowed: at-least-once).
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.daemon import Daemon, Submitter
from tests.helpers import wait_for
from tests.sink import SinkMessage, SmtpSink

SENDER = "sender@origin.test"
MARKER = re.compile(rb"^Subject: crash-test (\d+)\r$", re.MULTILINE)


def markers(messages: list[SinkMessage]) -> list[int]:
    """The message numbers in complete dumps.  A dump without its marker is a transaction
    cut short by the kill (or one still being written): not a delivery."""
    return [int(found.group(1)) for m in messages if (found := MARKER.search(m.body))]


def test_sigkill_during_delivery_then_restart_delivers_every_accepted_message(
    tmp_path: Path,
) -> None:
    n = 30
    with SmtpSink(dump=True, delays=(".:10",)) as stalled, SmtpSink(dump=True) as prompt:
        daemon = Daemon(
            tmp_path / "empath",
            overrides={
                "delivery": {
                    "domains": {
                        "dest.test": {
                            "mx_override": f"127.0.0.1:{stalled.port}",
                            "max_connections": 20,
                        }
                    }
                }
            },
        )
        daemon.start()
        try:
            accepted: dict[str, int] = {}
            with Submitter(daemon.smtp_port) as s:
                for i in range(n):
                    body = f"From: {SENDER}\nSubject: crash-test {i}\n\nmessage {i}\n"
                    accepted[s.send(SENDER, [f"r{i}@dest.test"], body)] = i
            # Deliveries are mid-DATA: the sink has whole messages it has not answered.
            stalled.wait_messages(1, timeout=10)
            daemon.kill()
            acked_before = {d["fields"]["message_id"] for d in daemon.logs("Delivered")}
            assert len(acked_before) < n, "everything was delivered before the kill"

            daemon.config["delivery"]["domains"]["dest.test"]["mx_override"] = (
                f"127.0.0.1:{prompt.port}"
            )
            daemon.start()
            (recovered,) = daemon.logs("Spool recovered")[-1:]
            assert n - len(acked_before) == recovered["fields"]["messages"]

            def all_arrived() -> bool:
                got = set(markers(stalled.messages())) | set(markers(prompt.messages()))
                return set(accepted.values()) <= got

            wait_for(all_arrived, timeout=20, what="every accepted message at a sink")

            def delivered_ids() -> set[str]:
                return {d["fields"]["message_id"] for d in daemon.logs("Delivered")}

            wait_for(lambda: set(accepted) <= delivered_ids(), timeout=10, what="Delivered logs")
            assert set(accepted) == delivered_ids()
            for msg, i in _pairs(prompt):
                assert (f"r{i}@dest.test",) == msg.recipients
                assert msg.body.endswith(f"\r\n\r\nmessage {i}\r\n".encode())
        finally:
            daemon.stop()


def _pairs(sink: SmtpSink) -> list[tuple[SinkMessage, int]]:
    msgs = sink.messages()
    numbers = markers(msgs)
    assert len(msgs) == len(numbers), "a message without its marker"
    return list(zip(msgs, numbers, strict=True))
