"""The header ``From:`` ownership check of authenticated submission (DESIGN §13).

One end-of-data acceptance step (``Stage.SUBMISSION``, after modules and milters,
before DKIM signing; see ``empath.transport.acceptance``).  It runs only for
messages submitted after SMTP AUTH and refuses with ``550 5.7.1`` when any mailbox
of any ``From:`` field is not one of the user's sender patterns: the envelope
check at MAIL alone (all Postfix does) would let a user sign DKIM for, and show
recipients, an address they do not own.

The patterns are read from the users file as loaded at end of data, so a user's
senders changed with ``empathctl`` count for the next message.  A message with no
``From:`` at all is left alone (nothing is claimed; DKIM has no domain to sign).
"""

from __future__ import annotations

from email.utils import getaddresses
from typing import Final

from empath.logs import get_logger
from empath.smtp.replies import Reply
from empath.smtp.sasl import sender_matches
from empath.submission.authenticator import Authenticator
from empath.transport.acceptance import AcceptedMessage, Stage

__all__ = ["HeaderFromCheck"]

log = get_logger("smtp", __name__)

_NAME: Final = "submission-from"


class HeaderFromCheck:
    """See module doc."""

    __slots__ = ("_auth",)

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    @property
    def name(self) -> str:
        return _NAME

    @property
    def stage(self) -> Stage:
        return Stage.SUBMISSION

    async def run(self, message: AcceptedMessage) -> Reply | None:
        user = message.facts.auth_user
        if user is None:
            return None
        entry = self._auth.users.users.get(user)
        senders = entry.senders if entry is not None else ()
        for _name, address in getaddresses(message.header_values("From")):
            if not address or not any(sender_matches(p, address) for p in senders):
                log.info("Header From not owned by the user", user=user,
                         message_id=message.id, peer=message.facts.peer,
                         smtp_code="550")  # fmt: skip
                return Reply.of(550, "5.7.1", f"Sender address not owned by {user} (From: header)")
        return None
