"""Control commands ``dkim.list``, ``dkim.check``, ``dkim.rotate`` (DESIGN §12).

The daemon side of ``empathctl dkim ...`` (``dkim keygen`` needs no daemon: it is
all in cli/dkimctl.py).  The work is the DKIM service's (dkim/service.py); these
handlers check arguments and map its errors to a failed command (exit 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from empath.control.protocol import ErrorCode, RequestError
from empath.control.server import Args, CommandError
from empath.dkim.service import DkimService
from empath.errors import ConfigError

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")


class HasDkim(Protocol):
    @property
    def dkim(self) -> DkimService: ...


def _domain(args: Args) -> str:
    value = args.get("domain")
    if not isinstance(value, str) or not value:
        raise RequestError(ErrorCode.BAD_REQUEST, "argument 'domain' must be a domain name")
    return value


class DkimHandlers:
    def __init__(self, daemon: HasDkim) -> None:
        self.d = daemon

    async def list(self, _args: Args) -> list[dict[str, Any]]:
        return self.d.dkim.listing()

    async def check(self, args: Args) -> dict[str, Any]:
        try:
            return await self.d.dkim.check(_domain(args))
        except ConfigError as exc:
            raise CommandError(ErrorCode.FAILED, str(exc)) from None

    async def rotate(self, args: Args) -> dict[str, Any]:
        algorithm = args.get("algorithm")
        if algorithm is not None and algorithm not in ALGORITHMS:
            raise RequestError(ErrorCode.BAD_REQUEST, f"algorithm must be one of {ALGORITHMS}")
        bits = args.get("bits", 2048)
        if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1024:
            raise RequestError(ErrorCode.BAD_REQUEST, "bits must be an integer >= 1024")
        try:
            return await self.d.dkim.rotate(
                _domain(args),
                [] if algorithm is None else [algorithm],
                now_flag=bool(args.get("now", False)),
                bits=bits,
            )
        except (ConfigError, OSError) as exc:
            raise CommandError(ErrorCode.FAILED, f"rotation failed: {exc}") from None


def dkim_entries(daemon: HasDkim) -> list[tuple[str, Callable[[Args], Any], bool]]:
    h = DkimHandlers(daemon)
    return [("dkim.list", h.list, False), ("dkim.check", h.check, False),
            ("dkim.rotate", h.rotate, False)]  # fmt: skip
