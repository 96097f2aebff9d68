"""Every `empathctl` line of the runbook's submission sections (docs/RUNBOOKS.md:
"SmtpAuthBruteForce" and "Authenticated submission", in ```sh blocks, which need a
daemon with a submission listener), run verbatim through bash against one, with
``$AUTH_USER`` a user and ``$AUTH_ADDR`` an address it blocked."""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path

from tests.ctl import ctl_env, sh
from tests.submission import make_submission, plain_b64

ROOT = Path(__file__).resolve().parents[2]


# runbook section → the user its lines name as $AUTH_USER (alice exists; carol is
# added by the section itself)
SECTIONS = {"### SmtpAuthBruteForce": "alice", "## Authenticated submission": "carol"}


def submission_lines() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "RUNBOOKS.md").read_text()
    lines: list[tuple[str, str]] = []
    for title, user in SECTIONS.items():
        start = text.index(title)
        section = text[start : text.index("\n---\n", start)]
        for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
            lines += [(ln.strip(), user) for ln in block.splitlines() if "empathctl" in ln]
    return lines


async def fail_logins(port: int, ctx: ssl.SSLContext, source: str, times: int) -> None:
    for _ in range(times):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, local_addr=(source, 0), server_hostname="localhost"
        )
        await reader.readline()
        writer.write(b"EHLO x\r\n")
        while (await reader.readline())[3:4] != b" ":
            pass
        writer.write(f"AUTH PLAIN {plain_b64('alice', 'wrong')}\r\n".encode())
        await reader.readline()
        writer.close()
        await writer.wait_closed()


def test_every_submission_runbook_line_succeeds(tmp_path: Path) -> None:
    lines = submission_lines()
    assert len(lines) >= 6
    s = make_submission(tmp_path, auth={"limits": {"max_failures_per_ip": 2, "delay_secs": 0}})
    s.daemon.start()
    try:
        asyncio.run(fail_logins(s.implicit_port, s.client_context(), "127.0.0.9", 2))
        for line, user in lines:
            env = ctl_env(s.daemon, AUTH_USER=user, AUTH_ADDR="127.0.0.9")
            # a line that asks for a password reads it from stdin
            out = sh(s.daemon, f"printf 'runbook-pw\\n' | {line}", env=env)
            assert 0 == out.returncode, f"{line}\n{out.stdout}{out.stderr}"
            if line.startswith("empathctl user list"):
                assert "alice" in out.stdout
    finally:
        s.daemon.stop()
