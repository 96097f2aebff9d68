"""Reading `empathctl`'s command line: a small reader for plain lines, argparse for the rest.

Why two readers
---------------
Importing argparse brings ``re``, ``enum``, ``gettext`` and ``functools`` with it:
about a third of the CPU an `empathctl queue summary` costs, paid again by every view an
operator (or a ``watch`` loop) runs during an incident, on the machine that is moving
the mail.  So :func:`read` reads a *plain* line itself, from the same declarations: each
command's ``configure(p)`` calls ``p.add_argument`` on a :class:`Recorder` instead of an
``ArgumentParser``.  A plain line is::

    [global options] GROUP NAME [positionals...] [options...]

with options spelt out in full (``--limit 20``, ``--limit=20``, ``-y``), values that
pass their ``type`` and ``choices``, and every required argument given.  For anything
else - help, an unknown, abbreviated or repeated-into-error option, a value starting
with ``-``, ``--``, a positional after an option, a declaration this reader does not
model (``nargs="+"``, two options sharing a ``dest``) - :func:`read` returns None and
the caller builds the argparse parser (:func:`full_parser`), so help, usage errors and
every corner of argparse's grammar come from argparse itself.  On the lines it accepts
:func:`read` gives exactly the namespace argparse gives (tests/unit/test_cli_argv.py
compares the two on every command).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any, Final, NoReturn

    from empath.cli.empathctl import CliCommand

SUPPRESS: Final = "==SUPPRESS=="  # argparse.SUPPRESS (a test keeps them equal)
_BAD: Final = object()
_UNSET: Final = object()


def suppress(p: Any) -> str:
    """The "leave it unset" default for parser ``p``: argparse tests its own
    ``SUPPRESS`` by identity, so an argparse parser gets that very object."""
    if isinstance(p, Recorder):
        return SUPPRESS
    import argparse

    return argparse.SUPPRESS


class Namespace:
    """What argparse's parser returns: the parsed values as attributes."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Namespace) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def __repr__(self) -> str:
        return "Namespace(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items()) + ")"


class _Arg:
    __slots__ = ("choices", "default", "dest", "kind", "optional", "required", "type")

    def __init__(self, dest: str, kind: str, default: Any, type_: Any, choices: Any) -> None:
        self.dest = dest
        self.kind = kind  # "store", "store_true", "store_false"
        self.default = default
        self.type = type_
        self.choices = choices
        self.optional = False  # a positional with nargs="?"
        self.required = False  # an option with required=True


class Recorder:
    """Takes the place of an ``ArgumentParser`` while a command declares its arguments;
    ``plain`` turns False at the first declaration :func:`read` does not model."""

    def __init__(self) -> None:
        self.options: dict[str, _Arg] = {}
        self.positionals: list[_Arg] = []
        self.defaults: dict[str, Any] = {}
        self.plain = True
        self._dests: set[str] = set()

    def add_argument(
        self,
        *flags: str,
        action: str = "store",
        dest: str | None = None,
        default: Any = _UNSET,
        type: Any = None,  # argparse's keyword
        choices: Any = None,
        nargs: Any = None,
        required: bool = False,
        metavar: Any = None,
        help: Any = None,  # argparse's keyword
        **other: Any,
    ) -> None:
        del metavar, help  # for the help text: argparse's business
        if other or action not in ("store", "store_true", "store_false") or not flags:
            self.plain = False
            return
        if action != "store" and (type is not None or choices is not None):
            self.plain = False
            return
        if default is _UNSET:  # argparse's defaults per action
            default = {"store_true": False, "store_false": True}.get(action)
        is_option = flags[0].startswith("-")
        if is_option:
            long = next((f for f in flags if f.startswith("--")), flags[0])
            name = dest or long.lstrip("-").replace("-", "_")
        else:
            name = flags[0]
        if name in self._dests:
            self.plain = False  # argparse's rules for shared dests: leave them to it
            return
        self._dests.add(name)
        arg = _Arg(name, action, default, type, choices)
        if is_option:
            if nargs is not None:
                self.plain = False
                return
            arg.required = bool(required)
            for flag in flags:
                self.options[flag] = arg
        elif nargs is None or (nargs == "?" and default is None):
            arg.optional = nargs == "?"
            self.positionals.append(arg)
        else:
            self.plain = False

    def set_defaults(self, **values: Any) -> None:
        self.defaults.update(values)


def _convert(arg: _Arg, text: str) -> Any:
    """``text`` as argparse would store it; _BAD where argparse would report an error."""
    value: Any = text
    if arg.type is not None:
        try:
            value = arg.type(text)
        except Exception:  # ArgumentTypeError, ValueError...: argparse reports
            return _BAD
    if arg.choices is not None and value not in arg.choices:
        return _BAD
    return value


def _option(rec: Recorder, argv: Sequence[str], i: int, out: dict[str, Any]) -> int:
    """Read the option at ``argv[i]`` into ``out``; the next index, or -1 (not plain)."""
    token = argv[i]
    flag, eq, inline = token.partition("=")
    arg = rec.options.get(token) or (rec.options.get(flag) if eq else None)
    if arg is None:
        return -1
    if arg.kind != "store":
        if eq and token not in rec.options:
            return -1  # --all=x: argparse's error
        out[arg.dest] = arg.kind == "store_true"
        return i + 1
    if eq and token not in rec.options:
        text, nxt = inline, i + 1
    elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
        text, nxt = argv[i + 1], i + 2
    else:
        return -1
    value = _convert(arg, text)
    if value is _BAD:
        return -1
    out[arg.dest] = value
    return nxt


def _defaults(rec: Recorder) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arg in (*rec.options.values(), *rec.positionals):
        if arg.default != SUPPRESS:
            out.setdefault(arg.dest, arg.default)
    for key, value in rec.defaults.items():
        out.setdefault(key, value)
    return out


def read(
    argv: Sequence[str],
    commands: Sequence[CliCommand],
    global_options: Callable[[Any, bool], None],
) -> Namespace | None:
    """The namespace argparse would give for a plain ``argv`` (module doc); None for
    any other line (the caller then asks argparse)."""
    top = Recorder()
    global_options(top, True)
    values = _defaults(top)
    i, n = 0, len(argv)
    while i < n and argv[i].startswith("-"):
        i = _option(top, argv, i, values)
        if i < 0:
            return None
    if n < i + 2:
        return None
    group, name = argv[i], argv[i + 1]
    command = next((c for c in commands if c.group == group and c.name == name), None)
    if command is None:
        return None
    rec = Recorder()
    global_options(rec, False)
    command.configure(rec)
    rec.set_defaults(run=command.run)
    if not rec.plain:
        return None
    sub = _defaults(rec)
    seen: dict[str, Any] = {}
    i += 2
    for arg in rec.positionals:
        if i < n and not argv[i].startswith("-"):
            value = _convert(arg, argv[i])
            if value is _BAD:
                return None
            sub[arg.dest] = value
            i += 1
        elif not arg.optional:
            return None
    while i < n:
        if not argv[i].startswith("-") or argv[i] in ("-", "--"):
            return None  # a positional after an option, or more than declared
        i = _option(rec, argv, i, seen)
        if i < 0:
            return None
    for arg in rec.options.values():
        if arg.required and arg.dest not in seen:
            return None
        if arg.dest not in seen and isinstance(arg.default, str) and arg.type is not None:
            value = _convert(arg, arg.default)  # argparse types a string default
            if value is _BAD:
                return None
            sub[arg.dest] = value
    values.update(sub)
    values.update(seen)
    values["group"], values["command"] = group, name
    return Namespace(**values)


def full_parser(
    commands: Sequence[CliCommand],
    global_options: Callable[[Any, bool], None],
    groups: Sequence[str],
    on_error: Callable[[str], None],
) -> argparse.ArgumentParser:
    """The argparse parser of ``commands`` (help, usage errors, lines :func:`read`
    leaves to it); ``on_error`` sees a usage error first (and may exit: --json)."""
    import argparse

    class Formatter(argparse.HelpFormatter):
        """argparse's, sized as shutil.get_terminal_size would (argparse imports shutil -
        and with it bz2, lzma, fnmatch - to ask, for every parser it builds)."""

        def __init__(
            self,
            prog: str,
            indent_increment: int = 2,
            max_help_position: int = 24,
            width: int | None = None,
        ) -> None:
            if width is None:
                width = _columns() - 2
            super().__init__(prog, indent_increment, max_help_position, width)

    class Parser(argparse.ArgumentParser):
        """argparse's parser; with --json anywhere on the line a usage error is JSON too."""

        def error(self, message: str) -> NoReturn:
            on_error(f"{self.prog}: {message}")
            super().error(message)

    p = Parser(
        prog="empathctl",
        formatter_class=Formatter,
        description="Control a running Empath daemon. Socket: --socket, "
        "$EMPATH_CONTROL_SOCKET, else control_socket of the config (--config, "
        "$EMPATH_CONFIG, ./empath.config.ron, /etc/empath/empath.config.ron).",
        epilog="exit codes: 0 ok, 1 failed, 2 usage, 3 daemon unreachable, 4 auth failed",
    )
    global_options(p, True)
    sp_groups = p.add_subparsers(dest="group", metavar="{" + ",".join(groups) + "}")
    sp_groups.required = True
    sub: dict[str, Any] = {}
    for c in commands:
        if c.group not in sub:
            gp = sp_groups.add_parser(
                c.group, help=f"{c.group} commands", formatter_class=Formatter
            )
            sp = gp.add_subparsers(dest="command", metavar="COMMAND")
            sp.required = True
            sub[c.group] = sp
        cp = sub[c.group].add_parser(
            c.name, help=c.help, description=c.help, formatter_class=Formatter
        )
        global_options(cp, False)
        c.configure(cp)
        cp.set_defaults(run=c.run)
    return p


def _columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(1).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80
