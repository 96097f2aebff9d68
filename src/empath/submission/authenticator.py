"""Checking SMTP AUTH credentials for the sessions of submission listeners (DESIGN §13).

Theory of operation
-------------------
One :class:`Authenticator` per users file (listeners naming the same file share
it: one set of users, failure counters and cache).  For each AUTH the session
awaits :meth:`Authenticator.authenticate`, which decides in this order:

1. **blocked IP** (``empath.policy.authlimit``): ``454 4.7.0`` at once, no hash is
   computed;
2. **overload**: more than ``MAX_PENDING`` verifications waiting → ``454 4.7.0``
   (a flood cannot queue unbounded work behind the two worker threads);
3. **users file**: re-read when its (inode, size, mtime) changed, so ``empathctl
   user add/passwd/delete`` takes effect at the next AUTH, without a restart; a
   file that does not load is logged with file:line and the users already loaded
   stay in force;
4. **cache**: a success within ``cache_secs`` for the same user and password is
   remembered under ``HMAC-SHA256(per-process secret, user NUL password)`` - no
   password or plain hash of one is kept, and a memory dump cannot be tried
   against offline.  A changed users file clears the cache (a new password or a
   deleted user counts at once);
5. **argon2id**, in one of two worker threads (~0.1 s of CPU by design; the C code
   releases the GIL, and the threads run at nice 10, so the event loop keeps the CPU
   it needs to serve other sessions while a brute force keeps them busy).  An unknown user is
   checked against a dummy hash of the same cost: its failure looks and takes the
   same as a wrong password's.

A failure is recorded per IP key and per login; the answer (``535 5.7.8``) waits
the login's slow-down delay first.  Every outcome is counted in :class:`AuthStats`
(``empath_smtp_auth_attempts_total{mechanism,result}``,
``empath_smtp_auth_blocked_total{reason}``) and logged without the password.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

from empath.clock import Clock
from empath.config.model import ListenerAuth
from empath.errors import ConfigError, SmtpProtocolError
from empath.logs import get_logger
from empath.policy.authlimit import AuthLimiter, AuthLimitSettings, LoginStatus, MessageQuota
from empath.smtp.replies import Reply
from empath.smtp.sasl import AuthOutcome, Credentials, UserGrant
from empath.submission.metrics import AuthStats
from empath.submission.users import (
    FileStamp,
    UserEntry,
    UsersFile,
    hash_password,
    load_users,
    stamp_of,
    verify_password,
)
from empath.supervisor import Spawn, untracked

if TYPE_CHECKING:  # no Redis client import without `cluster`
    from empath.submission.shared import SharedAuthCounters

__all__ = [
    "MAX_PENDING",
    "AuthOutcome",
    "AuthStats",
    "Authenticator",
    "limit_settings",
]

log = get_logger("smtp", __name__)

MAX_PENDING: Final = 64  # verifications queued or running, per users file
_CACHE_MAX: Final = 10_000
_WORKERS: Final = 2
_WORKER_NICE: Final = 10

R_INVALID: Final = Reply.of(535, "5.7.8", "Authentication credentials invalid")
R_BLOCKED: Final = Reply.of(
    454, "4.7.0", "Too many failed authentications from your address, try again later"
)
R_BUSY: Final = Reply.of(454, "4.7.0", "Temporary authentication failure, try again later")


def limit_settings(auth: ListenerAuth) -> AuthLimitSettings:
    lim = auth.limits
    return AuthLimitSettings(
        window_s=lim.window_secs,
        max_failures_per_ip=lim.max_failures_per_ip,
        block_s=lim.block_secs,
        max_failures_per_login=lim.max_failures_per_login,
        delay_s=lim.delay_secs,
        max_delay_s=lim.max_delay_secs,
    )


def _shown(name: str) -> str:
    """A login name as logged: printable, bounded (it is what the client typed)."""
    clean = "".join(c if c.isprintable() else "?" for c in name[:64])
    return clean + ("..." if len(name) > 64 else "")


def _lower_priority() -> None:
    """Run in each worker thread: argon2 is background work next to the event loop, so
    its threads yield the CPU to it (Linux: per-thread nice)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _WORKER_NICE)
    except (OSError, AttributeError):
        pass  # not Linux, or not permitted: still correct, only less polite


class Authenticator:
    """See module doc."""

    def __init__(
        self,
        auth: ListenerAuth,
        *,
        clock: Clock,
        stats: AuthStats | None = None,
        verify: Callable[[str, str], bool] = verify_password,
        shared: SharedAuthCounters | None = None,
        spawn: Spawn | None = None,
    ) -> None:
        """``spawn`` starts the background Redis exchanges (cluster mode) under the
        daemon's supervisor; without one they are plain tasks."""
        self.settings = auth
        self.path = auth.users_file
        self.clock = clock
        self.stats = stats or AuthStats()
        self.limiter = AuthLimiter(limit_settings(auth))
        self.quota = MessageQuota()
        self._verify = verify
        self.shared = shared  # cluster mode: failures and blocks shared through Redis
        self._others_sent: dict[str, int] = {}  # user → messages other nodes sent (last look)
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawn = spawn
        self._secret = os.urandom(32)
        self._cache: dict[bytes, float] = {}  # HMAC → valid until (monotonic)
        self._generation = 0  # bumped when the users file is re-read
        self._pending = 0
        self._executor: ThreadPoolExecutor | None = None
        self._dummy = hash_password(os.urandom(16).hex())
        self._stamp: FileStamp | None = None
        self._bad_stamp: FileStamp | None = None  # a broken file already reported
        self.users: UsersFile = UsersFile()
        self.load()

    # --- users file ----------------------------------------------------------------

    def load(self) -> None:
        """Read the users file now; ConfigError (file:line) when it is bad."""
        stamp = stamp_of(self.path)
        self.users = load_users(self.path)
        self._stamp = stamp
        self._bad_stamp = None
        self._generation += 1
        self._cache.clear()

    def check(self) -> None:
        """Validate the file as it is now without using it (config reload)."""
        load_users(self.path)

    def refresh(self) -> None:
        """Re-read the file if it changed since it was loaded (see module doc)."""
        stamp = stamp_of(self.path)
        if stamp == self._stamp or (stamp is not None and stamp == self._bad_stamp):
            return
        try:
            self.load()
        except ConfigError as exc:
            self._bad_stamp = stamp
            log.error("Users file refused, keeping the users loaded before",
                      error=str(exc), file=self.path)  # fmt: skip
            return
        log.info("Users file reloaded", file=self.path, users=len(self.users.users))

    # --- the check ---------------------------------------------------------------

    def _cache_key(self, user: str, password: str) -> bytes:
        msg = user.encode("utf-8") + b"\0" + password.encode("utf-8")
        return hmac.digest(self._secret, msg, "sha256")  # one C call, no HMAC object

    def quick(self, creds: Credentials, ip_key: str, peer: str) -> AuthOutcome | None:
        """The answer when it needs no hash: a blocked address, or a cached success
        (the session then skips the task and answers in the same loop turn); None when
        :meth:`authenticate` must run."""
        now = self.clock.monotonic()
        if self.shared is None and self.limiter.blocked(ip_key, now):
            return self._blocked(creds, peer)  # (in a cluster, Redis says: authenticate)
        cache_s = self.settings.cache_secs
        if cache_s <= 0:
            return None
        self.refresh()
        entry = self.users.users.get(creds.username)
        if entry is None:
            return None
        if self._cache.get(self._cache_key(creds.username, creds.password), 0.0) > now:
            return self._succeeded(creds, entry, peer)
        return None

    def _blocked(self, creds: Credentials, peer: str) -> AuthOutcome:
        self.stats.attempt(creds.mechanism.value, "blocked")
        self.stats.block("ip")
        log.info("Authentication refused: address blocked", peer=peer,
                 user=_shown(creds.username), smtp_code="454")  # fmt: skip
        return AuthOutcome(None, R_BLOCKED)

    def _succeeded(self, creds: Credentials, entry: UserEntry, peer: str) -> AuthOutcome:
        self.limiter.succeeded(creds.username, self.clock.now())
        self.stats.attempt(creds.mechanism.value, "success")
        log.info("Authentication succeeded", peer=peer, user=creds.username,
                 mechanism=creds.mechanism.value)  # fmt: skip
        return AuthOutcome(self.grant(creds.username, entry))

    async def authenticate(self, creds: Credentials, ip_key: str, peer: str) -> AuthOutcome:
        early = self.quick(creds, ip_key, peer)
        if early is not None:
            return early
        mechanism = creds.mechanism.value
        stats = self.stats
        shared = self.shared
        if shared is not None:
            # The cluster's view wins: blocked by another node, or lifted by an operator
            # anywhere (`user unblock`); our own only while Redis does not answer.
            now = self.clock.monotonic()
            left = await shared.blocked_for(ip_key)
            if left is None:
                if self.limiter.blocked(ip_key, now):
                    return self._blocked(creds, peer)
            elif left > 0:
                self.limiter.block(ip_key, now, left)
                return self._blocked(creds, peer)
            else:
                self.limiter.lift(ip_key)
        self.refresh()
        entry = self.users.users.get(creds.username)
        if self._pending >= MAX_PENDING:
            stats.attempt(mechanism, "busy")
            stats.block("overload")
            log.warn("Authentication refused: too many checks waiting", peer=peer,
                     smtp_code="454")  # fmt: skip
            return AuthOutcome(None, R_BUSY)
        generation = self._generation
        hashed = entry.password if entry is not None else self._dummy
        ok = await self._run_verify(hashed, creds.password)
        if ok and entry is not None:
            cache_s = self.settings.cache_secs
            if cache_s > 0 and generation == self._generation:
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
                key = self._cache_key(creds.username, creds.password)
                self._cache[key] = self.clock.monotonic() + cache_s
            return self._succeeded(creds, entry, peer)
        now = self.clock.monotonic()
        verdict = self.limiter.failed(ip_key, creds.username, now)
        delay_s, ip_blocked, slowed = verdict.delay_s, verdict.ip_blocked, verdict.login_slowed
        lim = self.limiter.settings
        if shared is not None:
            counts = await shared.failure(ip_key, creds.username, self.clock.now())
            if counts is not None:  # the cluster's counts (None: Redis down, local only)
                ip_n, login_n = counts
                if ip_n >= lim.max_failures_per_ip and not self.limiter.blocked(ip_key, now):
                    self.limiter.block(ip_key, now, lim.block_s)
                    ip_blocked = True
                excess = login_n - lim.max_failures_per_login
                if excess > 0:
                    slowed = True
                    delay_s = max(delay_s, min(lim.max_delay_s, excess * lim.delay_s))
            if ip_blocked:
                await shared.block(ip_key, lim.block_s)
        stats.attempt(mechanism, "failure")
        log.warn("Authentication failed", peer=peer, user=_shown(creds.username),
                 mechanism=mechanism, smtp_code="535",
                 delay_s=round(delay_s, 3))  # fmt: skip
        if ip_blocked:
            log.warn("Address blocked after failed authentications", peer=peer,
                     ip=ip_key, block_secs=lim.block_s)  # fmt: skip
        if slowed:
            stats.block("login")
        if delay_s > 0:
            await self.clock.sleep(delay_s)
        return AuthOutcome(None, R_INVALID)

    async def _run_verify(self, hashed: str, password: str) -> bool:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                _WORKERS, thread_name_prefix="empath-auth", initializer=_lower_priority
            )
        loop = asyncio.get_running_loop()
        self._pending += 1
        try:
            return await loop.run_in_executor(self._executor, self._verify, hashed, password)
        finally:
            self._pending -= 1

    def grant(self, user: str, entry: UserEntry) -> UserGrant:
        quotas = self.settings.quotas
        per_hour = entry.messages_per_hour
        if per_hour is None:
            per_hour = quotas.messages_per_hour
        rcpts = entry.recipients_per_message
        if rcpts is None:
            rcpts = quotas.recipients_per_message

        def admit() -> SmtpProtocolError | None:
            others = self._others_sent.get(user, 0)
            if self.quota.admit(user, per_hour, self.clock.monotonic(), others):
                if self.shared is not None and per_hour > 0:
                    self._background(self._share_message(user))
                return None
            self.stats.block("quota")
            log.warn("Message quota exceeded", user=user, messages_per_hour=per_hour,
                     smtp_code="451")  # fmt: skip
            return SmtpProtocolError(451, "4.7.1", f"Message quota exceeded for {user}, "
                                     "try again later")  # fmt: skip

        return UserGrant(user, entry.senders, entry.null_sender, rcpts, admit)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """A short Redis exchange nobody waits for (kept referenced until done)."""
        name = "auth-share-message"
        task = (
            self._spawn(coro, name=name) if self._spawn is not None else untracked(coro, name=name)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _share_message(self, user: str) -> None:
        """Cluster mode: count the message in Redis; remember the others' share."""
        assert self.shared is not None
        total = await self.shared.message(user, self.clock.now())
        if total is not None:
            mine = self.quota.count(user, self.clock.monotonic())
            self._others_sent[user] = max(0, total - mine)

    # --- operators ---------------------------------------------------------------

    def status(self) -> list[dict[str, object]]:
        """Per user: last login, failures in the window, slowed (for ``user list``)."""
        self.refresh()
        now = self.clock.monotonic()
        out: list[dict[str, object]] = []
        for name in sorted(self.users.users):
            st: LoginStatus = self.limiter.login_status(name, now)
            out.append({"user": name, "last_login": st.last_login, "failures": st.failures,
                        "blocked": st.slowed})  # fmt: skip
        return out

    def blocked_ips(self) -> dict[str, float]:
        return self.limiter.blocked_ips(self.clock.monotonic())

    def unblock(self, key: str) -> bool:
        return self.limiter.unblock(key)

    async def unblock_shared(self, key: str) -> bool:
        """Cluster mode: lift the block and forget the counts in Redis too."""
        return self.shared is not None and await self.shared.unblock(key)

    async def blocked_everywhere(self) -> dict[str, float]:
        """Blocked addresses: this node's and, in cluster mode, the cluster's."""
        out = self.blocked_ips()
        if self.shared is not None:
            for ip, left in (await self.shared.blocked()).items():
                out[ip] = max(out.get(ip, 0.0), left)
        return out

    async def aclose(self) -> None:
        self.close()
        for task in list(self._tasks):
            task.cancel()
        if self.shared is not None:
            await self.shared.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
