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

The step runs on every authenticated message, so the common ``From:`` forms
(``addr@dom`` and ``Name <addr@dom>`` made of atoms only) are read with one regular
expression; anything else (quotes, comments, groups, several mailboxes, non-ASCII)
goes to the standard library's RFC 5322 parser, which costs ~45 µs per field.  Both
give the same address for what the fast form accepts (tests/unit/
test_submission_fromcheck.py compares them).
"""

from __future__ import annotations

import re
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

_ATOM: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR: Final = rf"{_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*"
# "addr@dom" or "Display Name <addr@dom>" with a phrase of atoms and blanks only
_SIMPLE: Final = re.compile(
    rf"[ \t]*(?:({_ADDR})|[A-Za-z0-9 \t!#$%&'*+/=?^_`{{|}}~-]*<({_ADDR})>)[ \t]*"
)


def from_addresses(values: list[str]) -> list[str]:
    """The mailbox addresses of ``From:`` field values (module doc: fast form first)."""
    out: list[str] = []
    for value in values:
        m = _SIMPLE.fullmatch(value)
        if m is not None:
            out.append(m.group(1) or m.group(2))
        else:
            out.extend(address for _name, address in getaddresses([value]))
    return out


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
        for address in from_addresses(message.header_values("From")):
            if not address or not any(sender_matches(p, address) for p in senders):
                log.info("Header From not owned by the user", user=user,
                         message_id=message.id, peer=message.facts.peer,
                         smtp_code="550")  # fmt: skip
                return Reply.of(550, "5.7.1", f"Sender address not owned by {user} (From: header)")
        return None
