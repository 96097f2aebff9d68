"""Issue 14, defects 8 and 14: what senders and remote servers choose cannot forge
`queue list` fields for the runbook's pipelines, nor reach the operator's terminal.

A live daemon holds a victim message (parked, in retry) and messages from hostile
senders whose quoted local parts carry ``id: <the victim's id>``, ``domain:
victim.test,``, commas and spaces; a real `smtp-sink` answers 550 so their units
fail.  The runbook's pipelines run verbatim (docs/RUNBOOKS.md) through `bash -c`.
"""

from __future__ import annotations

import json
import smtplib
from pathlib import Path

from tests.ctl import LIST_LINE, ctl, sh
from tests.daemon import Daemon, ThreadedPeer, deep_merge, parked_overrides, queued_id, submit
from tests.sink import SmtpSink

BODY = (
    "From: x@evil.test\r\n"
    "Subject: \x1b]52;c;aGVsbG8=\x07 clipboard \x1b[2J\r\n"
    "\r\n"
    "body \x1b[31mred\x1b[0m \x07 line\r\n"
)


def hostile_senders(victim: str) -> list[str]:
    return [
        f'"x id: {victim} domain: victim.test,"@evil.test',
        '"a, b domain: victim.test, c"@evil.test',
        f'"id: {victim}"@evil.test',
    ]


def test_hostile_senders_cannot_forge_fields_for_the_runbook_pipelines(tmp_path: Path) -> None:
    """The runbook's domain count sees only the real domains, and its delete pipeline
    (`grep -o 'id: [^ ]*' | cut | xargs queue delete --yes`) deletes exactly the failed
    messages, never the victim whose id the senders carry; the sender is still shown,
    escaped, and `--json` gives it back verbatim."""
    with SmtpSink(hard_reject=("RCPT",)) as hard:
        overrides = deep_merge(
            parked_overrides("parked.test", "evil.test"),
            {"delivery": {"domains": {"reject.test": {"mx_override": f"127.0.0.1:{hard.port}"}}}},
        )
        with Daemon(tmp_path / "empath", overrides) as d:
            victim = submit(d.smtp_port, "ops@origin.test", ["v@parked.test"], BODY.encode())
            senders = hostile_senders(victim)
            failed = [submit(d.smtp_port, s, ["u@reject.test"], BODY.encode()) for s in senders]
            d.wait_log("Delivery failed permanently", count=len(failed))

            counts = sh(
                d,
                "empathctl queue list --status failed | grep -o 'domain: [^,]*' "
                "| sort | uniq -c | sort -rn",
                pipefail=True,
            )
            assert 0 == counts.returncode, counts.stderr
            assert [f"{len(failed)} domain: reject.test"] == [
                ln.strip() for ln in counts.stdout.splitlines()
            ]
            listing = ctl(d, "queue", "list", "--status", "failed")
            assert 0 == listing.returncode, listing.stderr
            lines = listing.stdout.splitlines()
            assert len(failed) == len(lines)
            for line in lines:
                assert LIST_LINE.match(line), line
            # The sender is there, with its separators escaped.
            assert any(
                f'from: "x\\x20id:\\x20{victim}\\x20domain:\\x20victim.test\\x2c"@evil.test,' in ln
                for ln in lines
            ), lines

            every = sh(d, "empathctl queue list | grep -o 'domain: [^,]*' | sort -u")
            assert {"domain: reject.test", "domain: parked.test", "domain: evil.test"} >= set(
                every.stdout.splitlines()
            )
            assert "domain: victim.test" not in every.stdout

            as_json = ctl(d, "--json", "queue", "list", "--status", "failed")
            assert sorted(senders) == sorted(
                json.loads(ln)["from"] for ln in as_json.stdout.splitlines()
            )

            deleted = sh(
                d,
                "empathctl queue list --status failed | grep -o 'id: [^ ]*' | cut -d' ' -f2 "
                "| xargs -r -n1 empathctl queue delete --yes",
                pipefail=True,
            )
            assert 0 == deleted.returncode, deleted.stderr
            left = ctl(d, "--json", "queue", "list").stdout.splitlines()
            ids = {json.loads(ln)["id"] for ln in left}
            assert victim in ids
            assert not ids & set(failed)


def test_queue_view_and_logs_escape_controls_from_the_network(tmp_path: Path) -> None:
    """`queue view` shows ESC/BEL in headers and body preview, and C1 controls and
    U+2028 in an SMTPUTF8 sender, as visible escapes; the JSON log keeps every record on
    one line for `str.splitlines` (no raw U+0085/U+2028), and `queue list` lines too."""
    sender = '"c1\u0085\u009b31m\u2028x"@evil.test'
    parked = parked_overrides("parked.test", "evil.test")
    overrides = deep_merge(parked, {"audit": {"enabled": True}})
    with Daemon(tmp_path / "empath", overrides) as d:
        with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=20) as conn:
            conn.ehlo("client.test")
            code, text = conn.mail(sender, ["SMTPUTF8"])
            assert 250 == code, text
            assert 250 == conn.rcpt("r@parked.test")[0]
            code, text = conn.data(BODY.encode())
            assert 250 == code, text
            msg_id = queued_id(text)

        view = ctl(d, "queue", "view", msg_id)
        assert 0 == view.returncode, view.stderr
        out = view.stdout
        for raw in ("\x1b", "\x07", "\u0085", "\u009b", "\u2028"):
            assert raw not in out, repr(raw)
        assert "Subject: \\x1b]52;c;aGVsbG8=\\x07 clipboard \\x1b[2J" in out
        assert "body \\x1b[31mred\\x1b[0m \\x07 line" in out
        assert '"c1\\x85\\x9b31m\\u2028x"@evil.test' in out

        listing = ctl(d, "queue", "list").stdout
        assert 1 == len(listing.splitlines())
        assert "\u2028" not in listing and "\u0085" not in listing
        assert LIST_LINE.match(listing.rstrip("\n")), listing

        as_json = ctl(d, "--json", "queue", "view", msg_id).stdout
        assert "\u2028" not in as_json and "\u0085" not in as_json
        assert sender == json.loads(as_json)["sender"]

        raw_log = d.log_path.read_text(encoding="utf-8")
        records = raw_log.splitlines()
        assert all(r.startswith("{") and r.endswith("}") for r in records if r), [
            r for r in records if r and not (r.startswith("{") and r.endswith("}"))
        ][:3]
        received = [json.loads(r) for r in records if '"Message received"' in r]
        assert [sender] == [r["fields"]["sender"] for r in received]


def test_a_remote_reply_with_terminal_controls_is_shown_escaped(tmp_path: Path) -> None:
    """A real MX whose 451 carries ESC/BEL (an OSC 52 clipboard write) and a C1 CSI:
    `queue view` and `queue list` show them as escapes, the JSON log keeps one line."""
    reply = "451 4.2.0 \x1b]52;c;aGk=\x07 busy \u009b2J try later"
    with ThreadedPeer({"rcpt_default": reply}) as mx:
        overrides = {"delivery": {"domains": {"hostile.test": {"mx_override": mx.address}}}}
        with Daemon(tmp_path / "empath", overrides) as d:
            msg_id = submit(d.smtp_port, "ops@origin.test", ["u@hostile.test"], BODY.encode())
            (deferred,) = d.wait_log("Delivery deferred", message_id=msg_id)
            assert "\x1b]52;c;aGk=\x07" in deferred["fields"]["error"]  # the record keeps it
            view = ctl(d, "queue", "view", msg_id).stdout
            listing = ctl(d, "queue", "list").stdout
            raw_log = d.log_path.read_text(encoding="utf-8")
    assert "\\x1b]52;c;aGk=\\x07 busy \\x9b2J" in view, view
    for out in (view, listing):
        assert "\x1b" not in out and "\x07" not in out and "\u009b" not in out
    assert 1 == len(listing.splitlines())
    assert "\u009b" not in raw_log
    assert all(line.endswith("}") for line in raw_log.splitlines() if line)
