"""What an inbound session hands to others and waits for, off its fast path.

:class:`~empath.transport.session.SmtpSession` pumps bytes through the sans-I/O server;
three of the server's events make it wait on someone else, and each wait is one
coroutine here, run by the session as its request-scoped task (``pending_task``, which
the listener's shutdown awaits):

* a module :class:`~empath.smtp.events.Check` (DESIGN §14): :func:`module_check` asks
  the listener's modules and returns the reply for ``SmtpServer.check_done``
  (:func:`module_check_now` answers in place where no module asked can suspend);
* an :class:`~empath.smtp.events.AuthCheck` (DESIGN §13): :func:`authenticate` asks the
  listener's authenticator (which hashes off the event loop) for its verdict;
* the end of a message on a listener with acceptance steps (acceptance.py):
  :func:`run_acceptance` runs them on the whole message.

Each returns what the session needs to resume its server; the session checks that its
client is still there before it does.  None of this runs for a listener without
modules, AUTH or acceptance steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from empath.logs import get_logger
from empath.modules.api import Session as ModuleSession
from empath.modules.step import HOST_KEY, MODULE_ERROR, STAGE_HOOK, to_smtp_reply
from empath.smtp.events import AuthCheck, Check, CheckStage, Transaction
from empath.smtp.replies import Reply
from empath.smtp.sasl import AuthOutcome
from empath.transport.acceptance import AcceptedMessage, HeldBody, SessionFacts, Verdict

if TYPE_CHECKING:
    from empath.modules.host import ModuleHost
    from empath.smtp.server import SmtpServer
    from empath.transport.listener import CredentialCheck

log = get_logger("smtp", __name__)

R_AUTH_UNAVAILABLE = Reply.of(454, "4.7.0", "Temporary authentication failure")

__all__ = [
    "R_AUTH_UNAVAILABLE",
    "accepted_message",
    "authenticate",
    "module_check",
    "module_check_now",
    "module_session",
    "run_acceptance",
]


# --- module checks (DESIGN §14; empath/modules) -------------------------------------


def module_session(
    host: ModuleHost, *, session_id: str, ip: str, port: int, listener: str, trusted: bool
) -> ModuleSession:
    """What the modules know of a new session."""
    ms = ModuleSession(
        id=session_id, peer_ip=ip, peer_port=port, listener=listener, trusted=trusted
    )
    ms.private[HOST_KEY] = host
    return ms


def _update(ms: ModuleSession, server: SmtpServer, check: Check) -> None:
    ms.helo = check.value if check.stage is CheckStage.HELO else server.helo
    ms.tls = server.tls_active
    ms.sender = check.value if check.stage is CheckStage.MAIL else server.sender
    ms.recipients = server.recipients
    ms.auth_user = server.auth_user


async def module_check(
    host: ModuleHost, ms: ModuleSession, server: SmtpServer, check: Check, peer: str
) -> Reply | None:
    """The modules' answer to ``check``: ``None`` carries on, a reply refuses."""
    _update(ms, server, check)
    try:
        answer = await host.stage(STAGE_HOOK[check.stage], ms, check.value)
    except Exception as exc:  # the host contains modules' failures; this is a bug of ours
        log.exception("Module check failed", peer=peer, error=repr(exc))
        answer = MODULE_ERROR
    return None if answer is None else to_smtp_reply(answer)


def module_check_now(
    host: ModuleHost, ms: ModuleSession, server: SmtpServer, check: Check, peer: str
) -> Reply | None:
    """:func:`module_check` here and now, for a stage in ``host.now`` (every module
    asked answers without suspending): no task, no event-loop turn."""
    _update(ms, server, check)
    try:
        answer = host.stage_now(STAGE_HOOK[check.stage], ms, check.value)
    except Exception as exc:  # the host contains modules' failures; this is a bug of ours
        log.exception("Module check failed", peer=peer, error=repr(exc))
        answer = MODULE_ERROR
    return None if answer is None else to_smtp_reply(answer)


def log_refusal(check: Check, reply: Reply, peer: str) -> None:
    log.info("Command refused by module", peer=peer, stage=check.stage.value,
             value=check.value, smtp_code=str(reply.code))  # fmt: skip


# --- SMTP AUTH (DESIGN §13) -----------------------------------------------------------


async def authenticate(auth: CredentialCheck, ev: AuthCheck, ip_key: str, peer: str) -> AuthOutcome:
    """The authenticator's verdict on credentials it could not answer at once
    (:meth:`CredentialCheck.quick`); a failure of the check itself is ``454 4.7.0``."""
    try:
        return await auth.authenticate(ev.credentials, ip_key, peer)
    except Exception as exc:  # a bug or a broken worker must not hang the session
        log.exception("Authentication check failed", peer=peer, error=repr(exc))
        return AuthOutcome(None, R_AUTH_UNAVAILABLE)


# --- acceptance steps (acceptance.py) -------------------------------------------------


def accepted_message(txn: Transaction, held: HeldBody, facts: SessionFacts) -> AcceptedMessage:
    """The whole message, for the steps (the held body's buffer is released)."""
    return AcceptedMessage(
        held.id, held.take(), sender=txn.sender, recipients=txn.recipients, facts=facts
    )


async def run_acceptance(
    txn: Transaction, held: HeldBody, facts: SessionFacts
) -> tuple[AcceptedMessage, Verdict]:
    """Run the listener's acceptance steps on the whole message (the held body is
    aborted if they raise or are cancelled).  When every step is immediate, or all but
    the last, which offers ``run_soon`` (DKIM), the session calls
    ``held.pipeline.run_soon(accepted_message(...))`` in place instead."""
    message = accepted_message(txn, held, facts)
    try:
        verdict = await held.pipeline.run(message)
    except BaseException:
        held.abort()
        raise
    return message, verdict
