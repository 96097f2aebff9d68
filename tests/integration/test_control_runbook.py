"""The runbook's `empathctl` lines, verbatim through `bash -c`, against a live daemon.

One daemon relays to real `smtp-sink`s: `defer.test` and `defer2.test` answer 450
(units in retry), `reject.test` answers 550 (units failed, DSNs to the sender),
`slow.test` accepts but is rate-limited to one message (the rest pending), and
`origin.test` (the sender's domain) collects the DSNs.  Every pipeline's output is
checked against what was submitted and what the sinks and the log saw.  The tests
run in file order: reads first, then retry, process-now, reload, delete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.ctl import LIST_LINE, ctl, ctl_env, sh
from tests.daemon import Daemon, Submitter
from tests.helpers import wait_for
from tests.sink import SmtpSink

SENDER = "ops@origin.test"
COUNTS = {"defer.test": 4, "defer2.test": 2, "reject.test": 3, "slow.test": 5}


def body(n: int) -> str:
    return f"From: {SENDER}\nSubject: runbook {n}\n\nmessage {n}\n"


@dataclass
class World:
    daemon: Daemon
    ok: SmtpSink
    soft: SmtpSink
    hard: SmtpSink
    dsn: SmtpSink
    ids: dict[str, list[str]] = field(default_factory=dict)  # domain -> ids, in order sent
    slow_delivered: str = ""

    def pending_slow(self) -> list[str]:
        return [i for i in self.ids["slow.test"] if i != self.slow_delivered]


def delivered_ids(sink: SmtpSink) -> list[str]:
    """Our queue ids named in the Received: header of each message the sink got."""
    out = []
    for m in sink.messages():
        found = re.search(rb" id ([0-9A-HJKMNP-TV-Z]{26})\b", m.body)
        if found:
            out.append(found.group(1).decode())
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with (
        SmtpSink(dump=True) as ok,
        SmtpSink(soft_reject=("RCPT",)) as soft,
        SmtpSink(hard_reject=("RCPT",)) as hard,
        SmtpSink(dump=True) as dsn,
    ):

        def route(sink: SmtpSink) -> dict[str, str]:
            return {"mx_override": f"127.0.0.1:{sink.port}"}

        overrides = {
            "delivery": {
                "base_retry_delay_secs": 3600.0,
                "max_retry_delay_secs": 7200.0,
                "domains": {
                    "defer.test": route(soft),
                    "defer2.test": route(soft),
                    "reject.test": route(hard),
                    "slow.test": route(ok),
                    "origin.test": route(dsn),
                },
                "rate_limit": {
                    "domain_limits": {"slow.test": {"messages_per_second": 0.0001, "burst_size": 1}}
                },
                "circuit_breaker": {"failure_threshold": 1000},
            }
        }
        daemon = Daemon(tmp_path_factory.mktemp("runbook") / "empath", overrides)
        daemon.start()
        try:
            w = World(daemon, ok, soft, hard, dsn)
            n = 0
            with Submitter(daemon.smtp_port) as s:
                for domain, count in COUNTS.items():
                    for i in range(count):
                        n += 1
                        w.ids.setdefault(domain, []).append(
                            s.send(SENDER, [f"user{i}@{domain}"], body(n))
                        )
            deferred = COUNTS["defer.test"] + COUNTS["defer2.test"]
            daemon.wait_log("Delivery deferred", count=deferred)
            daemon.wait_log("Delivery failed permanently", count=COUNTS["reject.test"])
            ok.wait_messages(1)
            dsn.wait_messages(COUNTS["reject.test"])
            (w.slow_delivered,) = delivered_ids(ok)
            yield w
        finally:
            daemon.stop()


def uniq_counts(text: str) -> dict[str, int]:
    """`uniq -c` output of 'domain: X' lines → {X: count}, checking the sort order too."""
    pairs = []
    for line in text.splitlines():
        count, _, rest = line.strip().partition(" ")
        assert rest.startswith("domain: "), line
        pairs.append((rest.removeprefix("domain: "), int(count)))
    assert sorted((c for _, c in pairs), reverse=True) == [c for _, c in pairs]
    return dict(pairs)


def ok_run(w: World, script: str, pipefail: bool = True, **env: str) -> str:
    """Run a runbook line; with ``pipefail`` every command of the pipe must exit 0."""
    r = sh(w.daemon, script, env=ctl_env(w.daemon, **env) if env else None, pipefail=pipefail)
    assert 0 == r.returncode, f"{script!r}: {r.stderr}"
    assert "" == r.stderr, r.stderr
    return r.stdout


def test_retry_counts_by_domain(world: World) -> None:
    expected = {"defer.test": 4, "defer2.test": 2}
    cmd = (
        "empathctl queue list --status retry | grep -o 'domain: [^,]*' | sort | uniq -c | sort -rn"
    )
    assert expected == uniq_counts(ok_run(world, cmd))
    assert expected == uniq_counts(ok_run(world, cmd + " | head -n 20"))


def test_pending_counts_and_oldest_pending(world: World) -> None:
    pending = world.pending_slow()
    assert len(pending) == COUNTS["slow.test"] - 1
    for cmd in (
        "empathctl queue list --status pending --limit 100 | grep -o 'domain: [^,]*' "
        "| sort | uniq -c | sort -rn",
        "empathctl queue list --status pending | grep -o 'domain: [^,]*' | sort | uniq -c "
        "| sort -rn | head -n 10",
    ):
        assert {"slow.test": len(pending)} == uniq_counts(ok_run(world, cmd))

    (line,) = ok_run(world, "empathctl queue list --status pending --limit 1").splitlines()
    m = LIST_LINE.match(line)
    assert m is not None, line
    assert (pending[0], "slow.test", "pending", "0") == (
        m["id"],
        m["domain"],
        m["status"],
        m["attempts"],
    )
    assert SENDER == m["sender"]

    wc = 'empathctl queue list --status pending | grep "domain: $DOMAIN" | wc -l'
    assert str(len(pending)) == ok_run(world, wc, DOMAIN="slow.test").strip()
    assert "0" == ok_run(world, wc, pipefail=False, DOMAIN="defer.test").strip()


def test_failed_list_and_the_whole_queue_by_domain(world: World) -> None:
    for n in (20, 100):
        out = ok_run(world, f"empathctl queue list --status failed | head -n {n}")
        lines = [LIST_LINE.match(x) for x in out.splitlines()]
        assert world.ids["reject.test"] == [m["id"] for m in lines if m]
        assert {"failed"} == {m["status"] for m in lines if m}
    every = (
        "empathctl queue list | grep -o 'domain: [^,]*' | sort | uniq -c | sort -rn | head -n 20"
    )
    expected = dict(COUNTS)
    expected["slow.test"] -= 1  # delivered: gone from the queue
    assert expected == uniq_counts(ok_run(world, every))


def test_stats_status_view_and_dns_lines_answer(world: World) -> None:
    stats = json.loads(ok_run(world, "empathctl queue stats --json"))
    assert 6 == stats["by_status"]["retry"]
    assert 3 == stats["by_status"]["failed"]
    assert 4 == stats["by_status"]["pending"]
    assert ["defer.test", 4] == stats["top_domains"][0]
    assert world.ids["defer.test"][0] == stats["oldest_id"]
    text = ok_run(world, "empathctl queue stats")
    assert "retry        6" in text and "Top domains" in text

    status = ok_run(world, "empathctl system status")
    assert f"pid {world.daemon.pid}" in status
    assert "Queue: pending 4, in_progress 0, retry 6" in status

    view_id = world.ids["reject.test"][0]
    view = ok_run(world, f"empathctl queue view {view_id}")
    assert f"Message {view_id}" in view
    assert "rcpt user0@reject.test: failed 5" in view
    assert re.search(r"attempt \S+ mx 127\.0\.0\.1\S*: 5\d\d ", view), view
    assert "Subject: runbook" in view
    assert "message " in view  # the body preview

    # mx_override routes do not use DNS: the cache is empty and stays consistent.
    cache = json.loads(ok_run(world, "empathctl dns list-cache --json"))
    lines = ok_run(world, "empathctl dns list-cache | wc -l").strip()
    assert str(len(cache["entries"])) == lines
    ok_run(world, "empathctl dns clear-cache")
    assert "0" == ok_run(world, "empathctl dns list-cache | wc -l").strip()


def test_retry_loop_attempts_every_retried_unit_again(world: World) -> None:
    d = world.daemon
    retried = world.ids["defer.test"] + world.ids["defer2.test"]
    loop = (
        "for msg_id in $(empathctl queue list --status retry | grep -o 'id: [^ ]*' "
        "| cut -d' ' -f2 | head -n 100); do\n"
        '    empathctl queue retry "$msg_id"\n'
        "done"
    )
    out = ok_run(world, loop)
    line = "1 unit(s) made due: 1 will be attempted now"
    assert [line] * len(retried) == out.splitlines()
    for msg_id in retried:
        d.wait_log("Delivery deferred", message_id=msg_id, attempt=2)
    assert 2 * len(retried) == len(d.logs("Delivery deferred"))


def test_process_now_attempts_deferred_units_at_once_but_rate_limits_hold(world: World) -> None:
    d = world.daemon
    out = ok_run(world, "empathctl queue process-now")
    # ... and says so: slow.test's units stay waiting for a token
    pending = len(world.pending_slow())
    said = rf"\d+ unit\(s\) made due: \d+ will be attempted now, {pending} stay held "
    assert re.fullmatch(said + rf"\({pending} no rate-limit token yet\)\n", out), out
    for msg_id in world.ids["defer.test"] + world.ids["defer2.test"]:
        d.wait_log("Delivery deferred", message_id=msg_id, attempt=3)
    # slow.test has no token: its units stay pending, nothing more reaches the sink
    wc = 'empathctl queue list --status pending | grep "domain: $DOMAIN" | wc -l'
    assert str(len(world.pending_slow())) == ok_run(world, wc, DOMAIN="slow.test").strip()
    assert 1 == world.ok.message_count()


def test_retry_of_failed_units_delivers_once_the_peer_is_fixed(world: World) -> None:
    d = world.daemon
    # Fix the peer: route reject.test to the accepting sink, applied by `config reload`.
    d.config["delivery"]["domains"]["reject.test"] = {"mx_override": f"127.0.0.1:{world.ok.port}"}
    d.write_config()
    out = ok_run(world, "empathctl config reload")
    assert "delivery.domains.reject.test.mx_override" in out
    failed = world.ids["reject.test"]
    out = ok_run(world, "empathctl queue retry --status failed --domain reject.test")
    n = len(failed)
    assert f"{n} unit(s) made due: {n} will be attempted now\n" == out
    wait_for(lambda: set(failed) <= set(delivered_ids(world.ok)), 20, what="redelivery")
    for msg_id in failed:
        d.wait_log("Delivered", message_id=msg_id)
        assert 1 == ctl(d, "queue", "view", msg_id).returncode  # delivered: left the queue
    assert "" == ok_run(world, "empathctl queue list --status failed | head -n 20")


def test_broken_config_reload_reports_the_error_and_keeps_the_old_settings(
    world: World,
) -> None:
    d = world.daemon
    good = d.config_path.read_text()
    d.config_path.write_text(good.replace("delivery", "delivery: ( max_attempts: 5 ),\n  oops", 1))
    try:
        r = ctl(d, "config", "reload")
        assert 1 == r.returncode
        assert "old config kept" in r.stderr and str(d.config_path) in r.stderr
        r = ctl(d, "config", "check")
        assert 1 == r.returncode and str(d.config_path) in r.stderr
        status = json.loads(ctl(d, "system", "status", "--json").stdout)
        assert status["config"]["last_reload_ok"] is False
    finally:
        d.config_path.write_text(good)
    # the reloaded route of the previous test is still in force
    with Submitter(d.smtp_port) as s:
        msg_id = s.send(SENDER, ["late@reject.test"], body(99))
    wait_for(lambda: msg_id in delivered_ids(world.ok), 20, what="delivery with the old config")


def test_delete_with_bounce_sends_the_sender_a_dsn(world: World) -> None:
    d = world.daemon
    victim = world.pending_slow()[0]
    before = world.dsn.message_count()
    out = ok_run(world, f"empathctl queue delete {victim} --bounce")
    assert out.startswith(f"deleted {victim} (DSN ")
    world.dsn.wait_messages(before + 1)
    dsn = world.dsn.messages()[-1]
    assert [SENDER] == list(dsn.recipients)
    assert "" == dsn.sender
    assert victim.encode() in dsn.body
    assert 1 == ctl(d, "queue", "view", victim).returncode
    d.wait_log("Control command", command="queue.delete", outcome="ok")


def test_delete_survives_a_restart(world: World) -> None:
    d = world.daemon
    victim = world.pending_slow()[1]
    r = ctl(d, "queue", "delete", victim)  # stdin is not a terminal: no question asked
    assert 0 == r.returncode, r.stderr
    assert f"deleted {victim}\n" == r.stdout
    d.stop()
    d.start()
    listing = ctl(d, "queue", "list").stdout
    assert victim not in listing
    # the restart refilled slow.test's token bucket: the kept message is queued or delivered
    kept = world.pending_slow()[2]
    wait_for(lambda: kept in listing or kept in delivered_ids(world.ok), 10, what="kept message")
    assert victim not in delivered_ids(world.ok)
    r = ctl(d, "queue", "view", victim)
    assert 1 == r.returncode and "no message" in r.stderr


def test_every_command_speaks_json(world: World) -> None:
    d = world.daemon
    some_id = json.loads(ctl(d, "queue", "list", "--limit", "1", "--json").stdout)["id"]
    commands = [
        ["system", "ping"],
        ["system", "status"],
        ["queue", "stats"],
        ["queue", "view", some_id],
        ["queue", "retry", some_id],
        ["queue", "retry", "--status", "retry"],
        ["queue", "process-now"],
        ["dns", "list-cache"],
        ["dns", "clear-cache"],
        ["config", "check"],
        ["config", "reload"],
    ]
    for args in commands:
        r = ctl(d, *args, "--json")
        assert 0 == r.returncode, (args, r.stderr)
        assert isinstance(json.loads(r.stdout), dict), args
    lines = ctl(d, "--json", "queue", "list").stdout.splitlines()
    assert lines and all(json.loads(line)["id"] for line in lines)
    unknown = ctl(d, "queue", "retry", "01M8MT0XHT36ZFWGQD12C079XX")
    assert 1 == unknown.returncode and "no message" in unknown.stderr
