"""Every `empathctl` command line of docs/RUNBOOKS.md, run verbatim against a live daemon.

The daemon holds a little of everything (a 5xx failure, units in retry behind a
tripped breaker, rate-limited pending units); `$ID` is a queued message and `$DOMAIN`
the domain with the open breaker.  A line that deletes gets a message of its own.
Pipelines run through bash; every stage that runs `empathctl` (directly or through
xargs) must exit 0 (`grep` finding nothing, exit 1, is an empty answer, not an error).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.daemon import Daemon, Submitter, ThreadedPeer
from tests.dkim_support import dkim_section, make_selector, txt_records
from tests.dnsmasq import DnsRecords, dnsmasq
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
BODY = "From: s@good.test\nSubject: runbook\n\nhello\n"


def runbook_command_lines() -> list[str]:
    text = (ROOT / "docs" / "RUNBOOKS.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [ln.strip() for ln in block.splitlines() if "empathctl" in ln]
    return lines


def test_every_empathctl_line_of_our_runbook_succeeds(tmp_path: Path) -> None:
    lines = runbook_command_lines()
    assert len(lines) >= 25
    # mail From: good.test is DKIM-signed with a key whose record dnsmasq publishes
    dkim_key = make_selector(tmp_path / "dkim", "s1", "rsa-sha256")
    records = DnsRecords(txt=txt_records("good.test", dkim_key))
    with (
        ThreadedPeer() as good,
        ThreadedPeer({"rcpt_default": "550 5.1.1 no"}) as hard,
        dnsmasq(records, tmp_path / "dns") as dns,
    ):
        daemon = Daemon(
            tmp_path / "empath",
            overrides={
                "delivery": {
                    "domains": {
                        "good.test": {"mx_override": good.address},
                        "hard.test": {"mx_override": hard.address},
                        "dead.test": {"mx_override": f"127.0.0.1:{free_port()}"},
                        "slow.test": {"mx_override": good.address},
                    },
                    "circuit_breaker": {"failure_threshold": 2},
                    "dns": {"nameservers": [dns.nameserver]},
                    "rate_limit": {
                        "domain_limits": {
                            "slow.test": {"messages_per_second": 0.0001, "burst_size": 1}
                        }
                    },
                },
                "dkim": dkim_section("good.test", [dkim_key]),
            },
        )
        daemon.start()
        try:
            with Submitter(daemon.smtp_port) as s:
                s.send("s@good.test", ["u@hard.test"], BODY)
                dead = [s.send("s@good.test", [f"u{i}@dead.test"], BODY) for i in range(3)]
                for i in range(3):
                    s.send("s@good.test", [f"u{i}@slow.test"], BODY)
                spare = [s.send("s@good.test", [f"v{i}@slow.test"], BODY) for i in range(10)]
            daemon.wait_log("Delivery failed permanently", domain="hard.test")
            daemon.wait_log("Circuit breaker OPENED for dead.test")
            env = dict(os.environ)
            env.pop("EMPATH_CONFIG", None)
            env.update(
                PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
                EMPATH_CONFIG=str(daemon.config_path),
                DOMAIN="dead.test",
                DKIM_DOMAIN="good.test",
                DKIM_KEYDIR=str(tmp_path / "dkim"),
            )
            failures = []
            for line in lines:
                msg_id = spare.pop() if "delete" in line else dead[0]
                proc = subprocess.run(
                    ["bash", "-c", f'{line}\necho "__status ${{PIPESTATUS[*]}}"'],
                    env={**env, "ID": msg_id},
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                statuses = proc.stdout.rsplit("__status ", 1)[1].split()
                stages = line.split(" | ")
                assert len(stages) == len(statuses), line
                bad = [
                    (stage, code)
                    for stage, code in zip(stages, statuses, strict=True)
                    if "empathctl" in stage and code != "0"
                ]
                if bad or proc.returncode != 0:
                    failures.append(f"{line}\n  -> {bad}: {proc.stderr.strip()}")
            assert [] == failures
        finally:
            daemon.stop()
