"""From a command line to the one function that runs it, and the one way commands get an API
client.

Starting ``corral`` costs what the command run needs and nothing else: the first word (and a
group's second) is looked up in :data:`corral.cli.table.COMMANDS`; an ``argparse`` parser is
built for that command alone and its module imported alone. ``corral --help`` and a group's
help are written from the table, so they list every command without importing any.

Command lines are read as Typer (Click) read them: options and positionals in any order, a
command's last list of words may also follow ``--`` (``corral run web -- sh -c 'exit 3'``), no
abbreviated options. A refused command line is a :class:`UsageError` (exit 2) that the one
error formatter prints, after the command's usage line.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from corral.cli.table import COMMANDS, Arg, Command, Group
from corral.errors import InvalidRequest

if TYPE_CHECKING:
    import argparse

    from corral.api.client import Client

PROG = "corral"
ABOUT = "Run workloads on a small fleet of Linux hosts."
HELP_FLAGS = ("-h", "--help")


class UsageError(InvalidRequest):
    """A command line that names no command or that the command's parser refused."""

    def __init__(self, message: str, usage: str, prog: str) -> None:
        super().__init__(message, hint=f"see '{prog} --help'")
        self.usage = usage


def run(argv: list[str]) -> int:
    """Run the command ``argv`` names; returns its exit code (help screens: 0, or 2 when a
    command or group was named without what it needs, as Typer did)."""
    if not argv or argv[0] in HELP_FLAGS:
        return _show(commands_help(PROG, ABOUT, COMMANDS), ok=bool(argv))
    word, rest = argv[0], argv[1:]
    entry = COMMANDS.get(word)
    if entry is None:
        raise _unknown(word, list(COMMANDS), PROG)
    prog = f"{PROG} {word}"
    if isinstance(entry, Group):
        if not rest or rest[0] in HELP_FLAGS:
            return _show(commands_help(prog, entry.help, entry.commands), ok=bool(rest))
        sub = entry.commands.get(rest[0])
        if sub is None:
            raise _unknown(rest[0], list(entry.commands), prog)
        prog, entry, rest = f"{prog} {rest[0]}", sub, rest[1:]
    kwargs = parse(prog, entry, rest)
    module = importlib.import_module(f"corral.cli.{entry.module}")
    getattr(module, entry.func)(**kwargs)
    return 0


def parse(prog: str, cmd: Command, argv: list[str]) -> dict[str, Any]:
    """The keyword arguments of ``cmd``'s function for ``argv``."""
    words = next((a for a in cmd.args if a.kind in ("rest", "some")), None)
    tail: list[str] = []
    if words is not None and "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    parser = build_parser(prog, cmd, words_after_dashes=bool(tail))
    kwargs = vars(parser.parse_intermixed_args(argv))
    if words is not None:
        name = words.flags[0]
        kwargs[name] = [*kwargs[name], *tail]
        if words.kind == "some" and not kwargs[name]:
            parser.error(f"the following arguments are required: {name.upper()}")
    return kwargs


def build_parser(prog: str, cmd: Command, words_after_dashes: bool = False
                 ) -> argparse.ArgumentParser:
    """``words_after_dashes``: the command's list of words continues after ``--``, so it may
    be empty before it (even when at least one word is required)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise UsageError(message, self.format_usage(), self.prog)

    parser = Parser(prog=prog, description=cmd.help, formatter_class=_formatter(),
                    allow_abbrev=False)
    for arg in cmd.args:
        _add(parser, arg, words_after_dashes)
    return parser


def _add(parser: argparse.ArgumentParser, a: Arg, words_after_dashes: bool) -> None:
    import argparse

    help = a.help.replace("%", "%%")
    typed: dict[str, Any] = {} if a.type is None else {"type": a.type}
    if not a.flags[0].startswith("-"):  # positional
        nargs = {"rest": "*", "some": "*" if words_after_dashes else "+"}.get(a.kind)
        parser.add_argument(a.flags[0], help=help, nargs=nargs,
                            metavar=a.metavar or a.flags[0].upper(), **typed)
        return
    dest = a.dest or a.flags[0].lstrip("-").replace("-", "_")
    metavar = a.flags[0].lstrip("-").upper().replace("-", "_")
    if a.kind == "flag":
        parser.add_argument(*a.flags, action="store_true", dest=dest, help=help)
    elif a.kind == "toggle":
        parser.add_argument(*a.flags, action=argparse.BooleanOptionalAction, dest=dest,
                            help=help)
        parser.set_defaults(**{dest: a.default})
    elif a.kind == "append":
        parser.add_argument(*a.flags, action="append", dest=dest, metavar=metavar, help=help,
                            **typed)
    else:
        parser.add_argument(*a.flags, dest=dest, default=a.default, choices=a.choices,
                            required=a.required, metavar=None if a.choices else metavar,
                            help=help, **typed)


def _formatter() -> type[argparse.HelpFormatter]:
    import argparse

    class Formatter(argparse.HelpFormatter):
        """Paragraphs of a command's help stay paragraphs; an option's default is shown as
        Typer showed it. The width is read without ``shutil``: argparse builds a formatter
        for every argument it adds, and importing shutil for that is most of a parse."""

        def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                     width: int | None = None) -> None:
            super().__init__(prog, indent_increment, max_help_position,
                             terminal_columns() - 2 if width is None else width)

        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "\n\n".join(super(Formatter, self)._fill_text(p, width, indent)
                               for p in text.split("\n\n"))

        def _get_help_string(self, action: argparse.Action) -> str:
            text = action.help or ""
            default = action.default
            if isinstance(action, argparse.BooleanOptionalAction):
                word = action.option_strings[0].lstrip("-")
                return f"{text} [default: {'' if default else 'no-'}{word}]"
            if action.option_strings and default not in (None, False, argparse.SUPPRESS):
                text += f" [default: {str(default).replace('%', '%%')}]"
            if action.required and action.option_strings:
                text += " [required]"
            return text

    return Formatter


def commands_help(prog: str, about: str, table: Mapping[str, Command | Group]) -> str:
    """The help of ``corral`` or of a group: every command with the first paragraph of its
    help (a group's commands under it)."""
    import textwrap

    rows: list[tuple[str, str]] = []
    for name, entry in table.items():
        rows.append((name, entry.help.split("\n\n")[0]))
        if isinstance(entry, Group):
            rows += [(f"  {sub}", cmd.help.split("\n\n")[0])
                     for sub, cmd in entry.commands.items()]
    width = max(40, terminal_columns() - 2)
    left = max(14, min(max(len(n) for n, _ in rows) + 4, 24))
    lines = [f"usage: {prog} [-h] COMMAND [ARGS]...", "", *textwrap.wrap(about, width), "",
             "commands:"]
    for name, text in rows:
        body = textwrap.wrap(text, max(20, width - left)) or [""]
        head = f"  {name}".ljust(left)
        if len(head) > left:
            lines.append(head.rstrip())
            head = " " * left
        lines.append(head + body[0])
        lines += [" " * left + more for more in body[1:]]
    lines += ["", "options:", "  -h, --help".ljust(left) + "show this help message and exit",
              "", f"Run '{prog} COMMAND --help' for a command's options."]
    return "\n".join(lines) + "\n"


def terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
        if columns > 0:
            return columns
    except ValueError:
        pass
    try:
        stdout = sys.__stdout__
        return (os.get_terminal_size(stdout.fileno()).columns if stdout else 0) or 80
    except (ValueError, OSError):
        return 80


def _show(text: str, ok: bool) -> int:
    """Help asked for goes to stdout (exit 0); help instead of a missing command to stderr
    (exit 2)."""
    (sys.stdout if ok else sys.stderr).write(text)
    return 0 if ok else 2


def _unknown(word: str, known: list[str], prog: str) -> UsageError:
    usage = f"usage: {prog} [-h] COMMAND [ARGS]...\n"
    if word.startswith("-"):
        return UsageError(f"no such option: {word}", usage, prog)
    import difflib

    close = difflib.get_close_matches(word, known, n=1)
    error = UsageError(f"no such command '{word}'", usage, prog)
    if close:
        error.hint = f"did you mean '{close[0]}'? see '{prog} --help'"
    return error


def client(timeout: float = 30) -> Client:
    """A client for the fleet named by CORRAL_URL/CORRAL_TOKEN or the context file."""
    from corral.api.client import Client
    from corral.rig.context import ca_file, resolve

    url, token = resolve()
    return Client(url, token, timeout=timeout, ca_file=ca_file())
