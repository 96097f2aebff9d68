"""`empathctl` — the operator's control tool.

The control socket and its commands (queue, dns, system, config) are specified in
SPEC §5 and arrive with the control-socket work; this entry point already takes the
global options so scripts can be written against it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="empathctl", description="Control a running Empath daemon.")
    p.add_argument("--socket", metavar="PATH", help="control socket (default: from the config)")
    p.add_argument("--config", metavar="FILE", help="config file used to find the socket")
    p.add_argument("--token", metavar="T", help="control token when control_auth is enabled")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("command", nargs="*", help="queue | dns | system | config ...")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    what = " ".join(args.command) or "(none)"
    print(
        f"empathctl: command {what!r} is not available in this version: the control socket "
        "is not implemented yet",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
