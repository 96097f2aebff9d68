"""The modules' end-of-data step in the acceptance pipeline (``Stage.MODULES``).

The SMTP session hands each message's :class:`~empath.modules.api.Session` (the one
its connection-stage hooks saw, with its milter connections) through
``SessionFacts.module_session``; the step asks the host that session started with,
so a reload in the middle of a session does not split one message between two sets
of modules.
"""

from __future__ import annotations

from typing import Final

from empath.modules.api import Reply as ModuleReply
from empath.modules.api import Session
from empath.modules.host import Hook, ModuleHost
from empath.smtp.events import CheckStage
from empath.smtp.replies import Reply
from empath.transport.acceptance import AcceptedMessage, Stage

__all__ = ["HOST_KEY", "MODULE_ERROR", "STAGE_HOOK", "ModulesStep", "to_smtp_reply"]

HOST_KEY: Final = "empath.host"  # Session.private key of the host a session started with
# what a check answers if running the modules itself failed (a bug: logged by the session)
MODULE_ERROR: Final = ModuleReply(451, "4.3.0", "Local error in processing, try again later")
STAGE_HOOK: Final = {
    CheckStage.CONNECT: Hook.CONNECT,
    CheckStage.HELO: Hook.HELO,
    CheckStage.MAIL: Hook.MAIL,
    CheckStage.RCPT: Hook.RCPT,
}


class ModulesStep:
    """Python modules' ``on_data`` and milters' header/body/end-of-message."""

    name = "modules"
    stage = Stage.MODULES

    def __init__(self, host: ModuleHost) -> None:
        self.host = host
        # every on_data never suspends: the session may run this step in place
        self.immediate = host.data_immediate

    def _session(self, message: AcceptedMessage) -> tuple[ModuleHost, Session]:
        session = message.facts.module_session
        if not isinstance(session, Session):
            facts = message.facts
            session = Session(id=message.id, peer_ip=facts.peer_ip, peer_port=0,
                              listener=facts.listener, trusted=facts.trusted)  # fmt: skip
            session.helo = facts.helo
            session.tls = facts.tls
            session.auth_user = facts.auth_user
        session.sender = message.sender
        session.recipients = tuple(message.recipients)
        host = session.private.get(HOST_KEY, self.host)
        assert isinstance(host, ModuleHost)
        return host, session

    async def run(self, message: AcceptedMessage) -> Reply | None:
        host, session = self._session(message)
        reply = await host.data(session, message)
        return None if reply is None else to_smtp_reply(reply)

    def run_now(self, message: AcceptedMessage) -> Reply | None:
        host, session = self._session(message)
        if not host.data_immediate:  # a session that began before a reload: its own set
            raise RuntimeError("modules step run in place with modules that may wait")
        reply = host.data_now(session, message)
        return None if reply is None else to_smtp_reply(reply)


def to_smtp_reply(reply: ModuleReply) -> Reply:
    texts = reply.text.split("\n") if reply.text else [""]
    return Reply.of(reply.code, reply.enhanced, *texts)
