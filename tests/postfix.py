"""A private Postfix MTA on loopback, as a real SMTP client (or server) for interop tests.

It keeps its config, queue and log under one directory and never touches the
system's Postfix: ``postfix -c DIR/etc`` with ``queue_directory`` under DIR, its
smtpd bound to ``127.0.0.1:<listen port>`` only.  Mail for ``domain`` is relayed to
``127.0.0.1:<relay port>`` (the Empath under test); everything else is refused.
Retries are made fast (deferred mail is retried within a second or two) so a test
sees Postfix's follow-up transactions without waiting minutes.

Postfix's master needs root (as ``make test`` runs); it is stopped by the PID in its
own pid file, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers import free_port, require_tool, wait_for, wait_port

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-client.test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
relay_domains = {domain}
transport_maps = inline:{{{domain}=smtp:[127.0.0.1]:{relay_port}}}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_transport = error:only {domain} is relayed by this test peer
relay_transport = error:only {domain} is relayed by this test peer
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
append_dot_mydomain = no
readme_directory = no
alias_maps =
alias_database =
local_recipient_maps =
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""


class PostfixPeer:
    """``with PostfixPeer(relay_port=..., domain=...) as pf:`` then send mail to
    ``127.0.0.1:pf.port``; ``pf.queued()`` counts what it still holds."""

    def __init__(self, *, relay_port: int, domain: str, extra_main_cf: str = "") -> None:
        # Postfix's daemons run as the postfix user and must reach their queue and data
        # directories: not under pytest's tmp_path (mode 0700, root's).
        self.dir = Path(tempfile.mkdtemp(prefix="empath-postfix-"))
        self.dir.chmod(0o755)
        self.relay_port = relay_port
        self.domain = domain
        self.extra_main_cf = extra_main_cf  # more main.cf lines (restrictions ...)
        self.port = free_port()
        self.pid: int | None = None

    def _postfix(self, *args: str, check: bool = True) -> None:
        # postfix(1) reports fatal errors only to syslog or a terminal: give it one.
        cmd = " ".join(["postfix", "-c", str(self.dir / "etc"), *args])
        out = subprocess.run(
            [require_tool("script"), "-qec", cmd, "/dev/null"],
            check=False,
            capture_output=True,
            text=True,
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{cmd} failed: {out.stdout}{out.stderr}{self.log()}")

    def start(self) -> PostfixPeer:
        require_tool("postfix")
        for sub in ("etc", "queue", "data"):
            (self.dir / sub).mkdir(parents=True)
        etc = self.dir / "etc"
        (etc / "main.cf").write_text(
            MAIN_CF.format(dir=self.dir, domain=self.domain, relay_port=self.relay_port)
            + self.extra_main_cf
        )
        (etc / "master.cf").write_text(_master_cf(Path("/etc/postfix/master.cf"), self.port))
        for name in ("dynamicmaps.cf", "dynamicmaps.cf.d"):
            src = Path("/etc/postfix") / name
            if src.is_dir():
                shutil.copytree(src, etc / name)
            elif src.exists():
                shutil.copy(src, etc / name)
        shutil.chown(self.dir / "data", "postfix", "postfix")
        self._postfix("check", check=False)  # creates the queue's subdirectories
        self._postfix("start")
        pidfile = self.dir / "queue" / "pid" / "master.pid"
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="postfix master")
        self.pid = int(pidfile.read_text().strip())
        wait_port("127.0.0.1", self.port)
        return self

    def queued(self) -> int:
        """Messages still in any of its queues."""
        q = self.dir / "queue"
        return sum(
            1
            for sub in ("incoming", "active", "deferred", "hold", "maildrop")
            for _root, _dirs, files in os.walk(q / sub)
            for _ in files
        )

    def log(self) -> str:
        path = self.dir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        pid, self.pid = self.pid, None
        if pid is not None:
            _stop(pid)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostfixPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop(pid: int) -> None:
    """SIGTERM the master (it stops its children), SIGKILL after 10 s."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def _master_cf(system: Path, port: int) -> str:
    """Debian's master.cf with chroot off, the public smtpd on 127.0.0.1:port, and the
    services that need extra software (maildrop, uucp, ...) left out."""
    out = []
    for line in system.read_text().splitlines():
        if line.startswith("maildrop"):
            break
        fields = line.split()
        if line and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"127.0.0.1:{port}"
            fields[4] = "n"
            out.append("\t".join(fields))
        else:
            out.append(line)
    return "\n".join(out) + "\n"
