"""`empath [--config FILE] [--check-config [FILE]]` — the daemon's entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from empath import __version__
from empath.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="empath",
        description="Empath mail transfer agent. Config discovery: --config, $EMPATH_CONFIG, "
        "./empath.config.ron, /etc/empath/empath.config.ron.",
    )
    p.add_argument("--config", "-c", metavar="FILE", help="config file (RON)")
    p.add_argument(
        "--check-config",
        nargs="?",
        const=True,
        default=False,
        metavar="FILE",
        help="validate the config, print the effective config and exit 0 (valid) or 1",
    )
    p.add_argument("--version", action="version", version=f"empath {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from empath.config.load import discover_config_path, load_config, render_config

    cli_path: str | None = args.config
    if isinstance(args.check_config, str):
        cli_path = args.check_config
    try:
        path = discover_config_path(cli_path)
        config = load_config(path)
        if config.dkim.domains:  # the key files (DESIGN §12): readable, type, size, mode
            from empath.dkim.service import check_keys

            check_keys(config)
    except ConfigError as exc:
        print(f"empath: config error: {exc}", file=sys.stderr)
        return 1
    if args.check_config:
        if config.modules:  # import and construct them, as start-up would (DESIGN §14)
            from empath.modules.host import ModuleStats
            from empath.modules.loader import ModuleContext, build_host

            try:
                context = ModuleContext(None, config.hostname)
                build_host(config.modules, context, ModuleStats(), file=str(path))
            except ConfigError as exc:
                print(f"empath: config error: {exc}", file=sys.stderr)
                return 1
        sys.stdout.write(render_config(config))
        if not render_config(config).endswith("\n"):
            sys.stdout.write("\n")
        print(f"# {path}: OK", file=sys.stderr)
        return 0

    from empath.app import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
