"""Background exchanges with Redis run under the daemon's supervisor (DESIGN §11):
shutdown cancels them and a crash is logged, where a bare task would be lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from empath.cluster.backend import RedisBackend
from empath.config.model import ListenerAuth
from empath.smtp.sasl import Credentials, Mechanism
from empath.submission.authenticator import Authenticator
from empath.submission.shared import SharedAuthCounters
from empath.submission.users import UserEntry, UsersFile, hash_password, write_users
from empath.supervisor import Supervisor
from empath.testing.clock import FakeClock
from tests.redis_server import RedisServer


def test_a_shared_message_count_runs_under_the_supervisor(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Cluster mode: a message sent by an authenticated user is counted in Redis by a
    task the supervisor holds."""
    path = str(tmp_path / "users")
    entry = UserEntry(password=hash_password("s3cret"), senders=("alice@example.org",),
                      messages_per_hour=5)  # fmt: skip
    write_users(path, UsersFile({"alice": entry}))

    async def go() -> None:
        supervisor = Supervisor()
        backend = RedisBackend(redis_server.url, "t:", 0.5)
        auth = Authenticator(
            ListenerAuth(users_file=path), clock=FakeClock(),
            shared=SharedAuthCounters(backend, 3600.0), spawn=supervisor.spawn,
        )  # fmt: skip
        outcome = await auth.authenticate(
            Credentials(Mechanism.PLAIN, "alice", "s3cret"), "10.0.0.1", "p"
        )
        assert outcome.grant is not None
        assert outcome.grant.admit_message() is None
        assert ["auth-share-message"] == supervisor.names()
        await supervisor.shutdown()
        auth.close()
        await backend.close()

    asyncio.run(go())
