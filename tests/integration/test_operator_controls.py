"""The incident controls (issue 15) end to end: `empathctl` against a live daemon that
relays to real smtp-sinks (accepting, 450, 550, slow), a refusing address and MX hosts
found through a real dnsmasq.

Each test starts its own daemon so what it asserts (attempt counts at the sinks, the
breaker's state) is its own.  Commands are run as operators run them: the installed
`empathctl`, found ./empath.config.ron, plain lines and --json.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from tests.ctl import BIN_DIR, LIST_LINE, ctl, ctl_env, sh
from tests.daemon import Daemon, Submitter, ThreadedPeer, submit
from tests.dnsmasq import DnsRecords, dnsmasq
from tests.helpers import free_port
from tests.sink import SmtpSink

SENDER = "ops@origin.test"
DOWN_MX = "127.0.0.61"  # down.test's MX (port 25): nothing listens until the test starts one


def body(n: int | str, extra: str = "") -> str:
    return f"From: {SENDER}\nSubject: ops {n}\n{extra}\nmessage {n}\n"


def ok(d: Daemon, *args: str) -> str:
    r = ctl(d, *args)
    assert 0 == r.returncode, f"empathctl {' '.join(args)}: {r.stderr}"
    return r.stdout


def js(d: Daemon, *args: str) -> Any:
    return json.loads(ok(d, *args, "--json"))


def route(sink: SmtpSink) -> dict[str, str]:
    return {"mx_override": f"127.0.0.1:{sink.port}"}


def audit_commands(d: Daemon) -> list[str]:
    return [
        str(x["fields"].get("command"))
        for x in d.logs("Control command")
        if x["fields"].get("audit") is True or x.get("fields", {}).get("command")
    ]


# --- breakers ------------------------------------------------------------------------


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[Any]:
    records = DnsRecords(
        mx={"down.test": [(10, "mx.down.test")]}, hosts={"mx.down.test": [DOWN_MX]}
    )
    with dnsmasq(records, tmp_path / "dnsmasq") as server:
        yield server


def test_breaker_list_reset_and_probe_let_mail_through_at_once(tmp_path: Path, dns: Any) -> None:
    """down.test's MX (through dnsmasq) refuses: one failure opens its breaker for an
    hour and later mail waits in its line.  `breaker list` shows it with the error;
    once the MX is back, `breaker reset` delivers the waiting mail at once (no hour);
    after a new trip, `breaker probe` lets one attempt through, which closes it."""
    overrides = {
        "delivery": {
            "dns": {"nameservers": [dns.nameserver], "timeout_secs": 2.0},
            "base_retry_delay_secs": 3600.0,
            "circuit_breaker": {"failure_threshold": 1, "timeout_secs": 3600.0},
        }
    }
    with Daemon(tmp_path / "d", overrides) as d:
        first = submit(d.smtp_port, SENDER, ["a@down.test"], body(1))
        d.wait_log("Circuit breaker OPENED for down.test")
        waiting = [submit(d.smtp_port, SENDER, [f"b{i}@down.test"], body(i)) for i in range(2)]
        listed = ok(d, "breaker", "list")
        line = next(x for x in listed.splitlines() if x.startswith("domain: down.test,"))
        assert "state: Open" in line and "trips: 1" in line, line
        assert re.search(r"reopens: \d{4}-\d\d-\d\dT", line), line
        assert ", error: " in line and "\\x20" in line, line  # escaped like every list field
        (b,) = [x for x in js(d, "breaker", "list")["breakers"] if x["domain"] == "down.test"]
        assert b["reopens_at"] > time.time() + 3000
        assert "refused" in b["last_error"].lower() or "connect" in b["last_error"].lower()
        view = ok(d, "queue", "view", waiting[0])
        assert "waiting: circuit breaker open until" in view, view

        with ThreadedPeer({"hostname": "mx.down.test"}, host=DOWN_MX, port=25) as mx:
            time.sleep(0.5)
            assert [] == mx.delivered()  # still held by the open breaker
            started = time.monotonic()
            out = ok(d, "breaker", "reset", "down.test")
            assert "closed (was Open)" in out
            mx.wait_delivered(2, timeout=5)
            assert time.monotonic() - started < 5
            d.wait_log("Circuit breaker CLOSED for down.test")
            assert first in ok(d, "queue", "list", "--domain", "down.test")  # its retry time
            metrics = d.http_get("/metrics")
            assert 'empath_delivery_circuit_breaker_transitions_total{state="Closed"} 1' in metrics

        # A second trip, then `breaker probe` once the MX is back.
        submit(d.smtp_port, SENDER, ["c@down.test"], body("c"))
        d.wait_log("Circuit breaker OPENED for down.test", count=2)
        parked = submit(d.smtp_port, SENDER, ["d@down.test"], body("d"))
        with ThreadedPeer({"hostname": "mx.down.test"}, host=DOWN_MX, port=25) as mx:
            out = ok(d, "breaker", "probe", "down.test")
            assert "half-open: one attempt goes now" in out
            got = mx.wait_delivered(1, timeout=5)
            assert parked.encode() in got[0].body
            d.wait_log("Circuit breaker CLOSED for down.test", count=2)
        assert "nothing to probe" in ok(d, "breaker", "probe", "down.test")
        commands = audit_commands(d)
        for cmd in ("breaker.list", "breaker.reset", "breaker.probe"):
            assert cmd in commands


# --- hold, suspend, restart -----------------------------------------------------------


def test_held_and_suspended_units_get_no_attempt_across_a_restart_then_flow(
    tmp_path: Path,
) -> None:
    with SmtpSink(dump=True) as sink:
        overrides = {"delivery": {"domains": {"hold.test": route(sink), "susp.test": route(sink)}}}
        d = Daemon(tmp_path / "d", overrides)
        d.start()
        try:
            out = ok(d, "queue", "suspend", "hold.test", "--reason", "drill")
            assert out.startswith("suspended hold.test until resumed")
            ok(d, "queue", "suspend", "susp.test", "--for", "2h", "--reason", "MX migration")
            with Submitter(d.smtp_port) as s:
                held = [s.send(SENDER, [f"h{i}@hold.test"], body(i)) for i in range(3)]
                susp = [s.send(SENDER, [f"s{i}@susp.test"], body(i)) for i in range(2)]
            held_out = js(d, "queue", "hold", "--domain", "hold.test")
            assert (3, 3) == (held_out["units"], held_out["messages"])
            ok(d, "queue", "resume", "hold.test")  # held units stay held
            time.sleep(1.0)
            assert 0 == sink.session_count()
            assert not d.logs("Rate limit exceeded") and not d.logs("delivery deferred")

            d.stop()
            d.start()
            time.sleep(1.5)
            assert 0 == sink.session_count()  # nothing attempted after the restart either
            lines = ok(d, "queue", "list", "--status", "held").splitlines()
            assert sorted(held) == sorted(m["id"] for m in map(LIST_LINE.match, lines) if m)
            stats = js(d, "queue", "stats")
            assert 3 == stats["by_status"]["held"]
            assert 2 == stats["by_status"]["pending"]  # the suspended ones, not the held
            assert ["susp.test"] == [s["domain"] for s in stats["suspended"]]
            assert "Suspended domains: susp.test until " in ok(d, "queue", "stats")
            assert "(MX migration)" in ok(d, "system", "status")
            metrics = d.http_get("/metrics")
            assert 'empath_delivery_domain_suspended{domain="susp.test"} 1.0' in metrics
            assert 'empath_delivery_queue_size{status="held"} 3.0' in metrics
            view = ok(d, "queue", "view", susp[0])
            assert "waiting: domain suspended until " in view and "MX migration" in view
            assert "waiting: held by the operator" in ok(d, "queue", "view", held[0])

            # process-now says what will really happen
            now = js(d, "queue", "process-now")
            assert 0 == now["attempted_now"]
            assert {"held": 3, "suspended": 2} == now["waiting"]
            text = ok(d, "queue", "process-now")
            assert "0 will be attempted now, 5 stay held (3 on hold, 2 domain suspended)" in text
            time.sleep(0.5)
            assert 0 == sink.session_count()

            released = js(d, "queue", "release", "--domain", "hold.test")
            assert 3 == released["units"]
            sink.wait_messages(3)
            assert "was_suspended" in js(d, "queue", "resume", "susp.test")
            sink.wait_messages(5)
            assert not d.logs("Suspended")  # no per-unit line while suspended
            assert "empath_delivery_domain_suspended{" not in d.http_get("/metrics")
        finally:
            d.stop()


def test_held_mail_does_not_expire_or_age_the_queue_and_gets_an_attempt_on_release(
    tmp_path: Path,
) -> None:
    """Postfix's hold semantics: a unit held past message_expiration_secs neither
    expires nor counts in empath_delivery_queue_oldest_seconds; released, it gets its
    attempt (and is delivered) instead of expiring without one."""
    port = free_port()  # refuses until the sink starts on it
    overrides = {
        "delivery": {
            "base_retry_delay_secs": 3600.0,
            "message_expiration_secs": 2.0,
            "circuit_breaker": {"failure_threshold": 1000},
            "domains": {"late.test": {"mx_override": f"127.0.0.1:{port}"}},
        }
    }
    with Daemon(tmp_path / "d", overrides) as d:
        msg = submit(d.smtp_port, SENDER, ["a@late.test"], body(1))
        d.wait_log("Delivery deferred")
        assert 1 == js(d, "queue", "hold", msg)["units"]
        time.sleep(3.0)  # past the 2 s lifetime, held
        metrics = d.http_get("/metrics")
        assert "empath_delivery_queue_oldest_seconds 0.0" in metrics
        assert 'empath_delivery_queue_size{status="pending"} 0.0' in metrics
        assert "status: held" in ok(d, "queue", "list")
        with SmtpSink(port=port, dump=True) as sink:
            assert 1 == js(d, "queue", "release", msg)["units"]
            sink.wait_messages(1, timeout=10)
        assert not d.logs("Delivery expired") and not d.logs("expired")


def test_a_suspension_with_for_ends_by_itself(tmp_path: Path) -> None:
    with (
        SmtpSink() as sink,
        Daemon(tmp_path / "d", {"delivery": {"domains": {"x.test": route(sink)}}}) as d,
    ):
        ok(d, "queue", "suspend", "x.test", "--for", "2s")
        submit(d.smtp_port, SENDER, ["a@x.test"], body(1))
        time.sleep(1.0)
        assert 0 == sink.message_count()
        sink.wait_messages(1, timeout=10)


# --- bulk delete / bounce -------------------------------------------------------------


@pytest.fixture
def deferred(tmp_path: Path) -> Iterator[tuple[Daemon, SmtpSink, dict[str, list[str]]]]:
    """a.test and b.test answer 450 (units in retry for an hour); origin.test and
    other.test take DSNs."""
    with SmtpSink(soft_reject=("RCPT",)) as soft, SmtpSink(dump=True) as dsn:
        overrides = {
            "delivery": {
                "base_retry_delay_secs": 3600.0,
                "domains": {
                    "a.test": route(soft),
                    "b.test": route(soft),
                    "origin.test": route(dsn),
                    "other.test": route(dsn),
                },
                "circuit_breaker": {"failure_threshold": 1000},
            }
        }
        with Daemon(tmp_path / "d", overrides) as d:
            ids: dict[str, list[str]] = {"a": [], "b": [], "ab": [], "other": []}
            with Submitter(d.smtp_port) as s:
                for i in range(3):
                    ids["a"].append(s.send(SENDER, [f"a{i}@a.test"], body(i)))
                    ids["b"].append(s.send(SENDER, [f"b{i}@b.test"], body(i)))
                ids["ab"].append(s.send(SENDER, ["x@a.test", "y@b.test"], body("ab")))
                ids["other"].append(s.send("x@other.test", ["z@a.test"], body("o")))
            d.wait_log("Delivery deferred", count=9)
            yield d, dsn, ids


def unit_ids(d: Daemon, *args: str) -> list[tuple[str, str]]:
    lines = ok(d, "queue", "list", *args).splitlines()
    out = []
    for line in lines:
        m = LIST_LINE.match(line.split(", error: ")[0])
        assert m is not None, line
        out.append((m["id"], m["domain"]))
    return out


def test_bulk_delete_by_filter_is_refused_without_a_terminal_or_yes(
    deferred: tuple[Daemon, SmtpSink, dict[str, list[str]]],
) -> None:
    d, _dsn, ids = deferred
    before = unit_ids(d)
    r = ctl(d, "queue", "delete", "--domain", "a.test")  # stdin is not a terminal
    assert 1 == r.returncode
    assert "add --yes" in r.stderr
    assert before == unit_ids(d)
    r = ctl(d, "queue", "delete", ids["a"][0], "--domain", "a.test")
    assert 2 == r.returncode  # an id and a filter: usage
    # The runbook's single-id form keeps working in a pipe, as written.
    r = sh(d, f"echo {ids['b'][0]} | xargs empathctl queue delete")
    assert 0 == r.returncode, r.stderr
    assert f"deleted {ids['b'][0]}" in r.stdout


def test_bulk_delete_and_bounce_hit_exactly_the_filtered_units(
    deferred: tuple[Daemon, SmtpSink, dict[str, list[str]]],
) -> None:
    d, dsn, ids = deferred
    out = js(d, "queue", "delete", "--domain", "a.test", "--sender", SENDER, "--yes")
    assert (4, 4) == (out["units"], out["messages"])  # a0-a2 and the a.test unit of ab
    left = unit_ids(d)
    assert {(i, "b.test") for i in ids["b"] + ids["ab"]} | {(ids["other"][0], "a.test")} == set(
        left
    )
    assert 0 == dsn.message_count()

    time.sleep(1.1)
    out = js(d, "queue", "bounce", "--domain", "b.test", "--older-than", "1s", "--yes")
    assert 4 == out["units"] and 4 == out["dsns"]
    dsn.wait_messages(4)
    assert {m.recipients for m in dsn.messages()} == {(SENDER,)}
    assert [(ids["other"][0], "a.test")] == unit_ids(d)
    log = js(d, "message", "log", ids["ab"][0])
    assert any(e["event"] == "dsn" for e in log["events"])
    assert "left the queue" in log["status"]


def test_interactive_confirmation_on_a_real_terminal(
    deferred: tuple[Daemon, SmtpSink, dict[str, list[str]]],
) -> None:
    d, _dsn, ids = deferred
    env = ctl_env(d)

    def run(answer: str) -> tuple[str, int]:
        child = pexpect.spawn(
            f"{BIN_DIR}/empathctl",
            ["queue", "delete", "--domain", "b.test"],
            cwd=str(d.workdir),
            env=env,
            encoding="utf-8",
            timeout=30,
        )
        child.expect(r"delete 4 unit\(s\) of 4 message\(s\) \(domain b\.test\)\? \[y/N\] ")
        child.sendline(answer)
        child.expect(pexpect.EOF)
        child.close()
        return str(child.before), int(child.exitstatus or 0)

    text, code = run("n")
    assert 1 == code and "nothing deleted" in text
    assert 4 == len([u for u in unit_ids(d) if u[1] == "b.test"])
    text, code = run("y")
    assert 0 == code and "4 unit(s) of 4 message(s) deleted" in text
    assert [] == [u for u in unit_ids(d) if u[1] == "b.test"]
    assert ids["ab"][0] in {i for i, _ in unit_ids(d)}  # its a.test unit stays


def test_list_lines_with_hostile_senders_keep_the_runbook_counts(
    deferred: tuple[Daemon, SmtpSink, dict[str, list[str]]],
) -> None:
    d, _dsn, _ids = deferred
    hostile = [
        '"x id: 01AAAAAAAAAAAAAAAAAAAAAAAA domain: victim.test,"@evil.test',
        '"a, domain: b.test, status: retry"@evil.test',
    ]
    with Submitter(d.smtp_port) as s:
        for h in hostile:
            s.send(h, ["h@a.test"], body("h"))
    d.wait_log("Delivery deferred", count=11)
    listing = ok(d, "queue", "list")
    assert all(", error: " in line for line in listing.splitlines())
    counts = sh(d, "empathctl queue list | grep -o 'domain: [^,]*' | sort | uniq -c | sort -rn")
    assert {"domain: a.test": 7, "domain: b.test": 4} == {
        x.split(None, 1)[1]: int(x.split()[0]) for x in counts.stdout.splitlines()
    }
    ids = sh(d, "empathctl queue list | grep -o 'id: [^ ]*' | wc -l").stdout.strip()
    assert "11" == ids


# --- summary, view, message log, spool ---------------------------------------------------


def test_queue_summary_shows_a_throttled_domain(tmp_path: Path) -> None:
    with SmtpSink() as sink, SmtpSink(delays=("data:3",)) as slow:
        overrides = {
            "delivery": {
                "domains": {"thr.test": route(sink), "slow.test": route(slow)},
                "rate_limit": {
                    "domain_limits": {"thr.test": {"messages_per_second": 0.5, "burst_size": 1}}
                },
            }
        }
        with Daemon(tmp_path / "d", overrides) as d:
            with Submitter(d.smtp_port) as s:
                for i in range(6):
                    s.send(SENDER, [f"t{i}@thr.test"], body(i))
                s.send(SENDER, ["s@slow.test"], body("s"))
            sink.wait_messages(1)
            data = js(d, "queue", "summary")
            row = next(r for r in data["domains"] if r["domain"] == "thr.test")
            assert row["throttled"] is True and row["rate_per_s"] == 0.5
            assert row["total"] >= 4 and row["ages"][0] == row["total"]
            slow_row = next(r for r in data["domains"] if r["domain"] == "slow.test")
            assert 1 == slow_row["by_status"]["in_progress"] and not slow_row["throttled"]
            text = ok(d, "queue", "summary")
            thr = text.splitlines()[
                text.splitlines().index(
                    next(x for x in text.splitlines() if x.startswith("thr.test"))
                )
                + 1
            ]
            assert "rate 0.5/s burst 1" in thr and "THROTTLED" in thr
            assert "queue.summary" in audit_commands(d)
            top = js(d, "queue", "summary", "--limit", "1")
            assert (["thr.test"], 2) == ([r["domain"] for r in top["domains"]], top["domain_count"])
            assert top["units"] == sum(top["total"]["by_status"].values())
            assert top["units"] == sum(top["total"]["ages"]) >= row["total"] + 1
            text = ok(d, "queue", "summary", "--limit", "1")
            assert re.search(rf"^TOTAL +{top['units']} ", text, flags=re.M), text
            assert "... and 1 more domain(s) with fewer units" in text


def test_view_body_is_escaped_and_message_log_survives_delivery_and_restart(
    tmp_path: Path,
) -> None:
    with SmtpSink(dump=True) as sink, SmtpSink(hard_reject=("RCPT",)) as hard:
        overrides = {
            "delivery": {
                "domains": {"ok.test": route(sink), "bad.test": route(hard)},
                "rate_limit": {
                    "domain_limits": {"ok.test": {"messages_per_second": 0.0001, "burst_size": 1}}
                },
            }
        }
        d = Daemon(tmp_path / "d", overrides)
        d.start()
        try:
            with Submitter(d.smtp_port) as s:
                delivered = s.send(SENDER, ["a@ok.test"], body(1))
                queued = s.send(SENDER, ["b@ok.test"], body(2, "X-Evil: \x1b]52;c;aGk=\x07"))
                failed = s.send(SENDER, ["c@bad.test"], body(3))
            sink.wait_messages(1)
            d.wait_log("Delivery failed permanently")
            raw = ok(d, "queue", "view", queued, "--body")
            assert "X-Evil: \\x1b]52;c;aGk=\\x07" in raw and "\x1b" not in raw
            assert "message 2" in raw and "Subject: ops 2" in raw
            assert "rate limit 0.0001/s" in ok(d, "queue", "view", queued)

            def story(msg_id: str) -> str:
                return ok(d, "message", "log", msg_id)

            text = story(delivered)
            assert "left the queue: delivered" in text
            assert "received from 127.0.0.1" in text and f"from <{SENDER}>" in text
            assert re.search(
                r"attempt ok\.test via 127\.0\.0\.1:\d+ \[127\.0\.0\.1\] tls none", text
            )
            assert "delivered" in text
            text = story(failed)
            assert "DSN (failed)" in text
            d.stop()
            d.start()
            text = story(delivered)
            assert "left the queue: delivered" in text and "attempt ok.test" in text
            assert "DSN (failed)" in story(failed)
            missing = ctl(d, "message", "log", "01AAAAAAAAAAAAAAAAAAAAAAAA")
            assert 1 == missing.returncode
            assert "no message 01AAAAAAAAAAAAAAAAAAAAAAAA" in missing.stderr
        finally:
            d.stop()


def test_spool_status_and_compact(tmp_path: Path) -> None:
    with SmtpSink() as sink:
        overrides = {"delivery": {"domains": {"ok.test": route(sink)}}}
        with Daemon(tmp_path / "d", overrides) as d:
            with Submitter(d.smtp_port) as s:
                for i in range(20):
                    s.send(SENDER, ["a@ok.test"], body(i, "X-Pad: " + "\n p".join(["p" * 500] * 4)))
            sink.wait_messages(20)
            status = js(d, "spool", "status")
            assert status["segments"] and status["log_bytes"] > 40_000
            assert status["reclaimable_bytes"] > 0 and status["free_bytes"] > 0
            text = ok(d, "spool", "status")
            assert "reclaimable" in text and "last compaction: never" in text
            out = js(d, "spool", "compact")
            assert out["freed_bytes"] >= 0
            after = js(d, "spool", "status")
            assert after["last_compaction_at"] is not None
            assert "compacted: freed" in ok(d, "spool", "compact")


def test_free_port_is_a_refusing_destination(tmp_path: Path) -> None:
    """A refusing destination (closed port): `queue retry` says the unit is attempted
    now and the breaker list counts the failure."""
    closed = free_port()
    overrides = {
        "delivery": {
            "base_retry_delay_secs": 3600.0,
            "domains": {
                "refuse.test": {"mx_override": f"127.0.0.1:{closed}"},
                "refuse2.test": {"mx_override": f"127.0.0.1:{closed}"},
            },
        }
    }
    with Daemon(tmp_path / "d", overrides) as d:
        msg = submit(d.smtp_port, SENDER, ["a@refuse.test"], body(1))
        submit(d.smtp_port, SENDER, ["a@refuse2.test"], body(2))
        d.wait_log("Delivery deferred", count=2)
        (b,) = js(d, "breaker", "list", "--domain", "refuse.test")["breakers"]
        assert ("refuse.test", "Closed", 1) == (b["domain"], b["state"], b["failures"])
        assert 2 == js(d, "breaker", "list")["count"]
        lines = ok(d, "breaker", "list", "--limit", "1").splitlines()
        assert lines[0].startswith("domain: refuse.test, state: Closed"), lines
        assert ["... and 1 more (--all, --limit N or --domain D)"] == lines[1:]
        assert 2 == len(ok(d, "breaker", "list", "--all").splitlines())
        out = js(d, "queue", "retry", msg)
        assert 1 == out["attempted_now"] and {} == out["waiting"]
        d.wait_log("Delivery deferred", count=3)
