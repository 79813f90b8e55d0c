"""The root command, the table of where every command lives, and the one way commands get an
API client.

Operators type ``corral ls`` all day, so starting the CLI must not cost what the whole CLI
imports (the image store, Rich live views, the process packages behind ``corral server``).
Each command module defines its commands on its own ``commands`` Typer and is named in
:data:`COMMANDS`; the root group imports a module only when one of its commands is looked up,
that is when it runs or its help is shown. ``corral --help`` looks every command up, so it
still lists them all with their help. Heavy libraries (Rich, httpx, pydantic through the
client) are imported where they are used, not at the top of a command module.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import typer
import typer.main
from typer.core import TyperGroup

if TYPE_CHECKING:
    from typer._click import Command  # Typer's own Click (vendored since 0.26)

    from corral.api.client import Client

#: command (or command group) name -> module of ``corral.cli`` that defines it, in the order
#: ``corral --help`` lists them
COMMANDS: dict[str, str] = {
    "events": "events_cmd",
    "server": "fleet_cmds",
    "agent": "fleet_cmds",
    "up": "fleet_cmds",
    "down": "fleet_cmds",
    "status": "fleet_cmds",
    "run": "instances",
    "ls": "instances",
    "show": "instances",
    "start": "instances",
    "stop": "instances",
    "restart": "instances",
    "freeze": "instances",
    "thaw": "instances",
    "kill": "instances",
    "rm": "instances",
    "logs": "logs",
    "logsink": "logs",
    "recreate": "ops_cmd",
    "shelve": "shelve_cmd",
    "unshelve": "shelve_cmd",
    "shelved": "shelve_cmd",
    "migrate": "standby_cmd",
    "top": "top",
    "traffic": "traffic_cmd",
    "host": "fleet_cmds",
    "image": "images",
    "ops": "ops_cmd",
    "standby": "standby_cmd",
}

JSON_HELP = "print plain JSON instead of a table"


def module_commands(module: str) -> dict[str, Command]:
    """Every command ``corral.cli.<module>`` defines, built into Click commands."""
    mod = importlib.import_module(f"corral.cli.{module}")
    return dict(typer.main.get_group(mod.commands).commands)


class LazyCommands(MutableMapping[str, "Command"]):
    """The root group's commands: names from :data:`COMMANDS`, each module imported on first
    lookup (Typer's group reads ``commands`` for lookup, listing and typo suggestions)."""

    def __init__(self, table: dict[str, str]) -> None:
        self._table = table
        self._loaded: dict[str, Command] = {}

    def __getitem__(self, name: str) -> Command:
        if name not in self._loaded:
            module = self._table[name]
            for found, cmd in module_commands(module).items():
                if self._table.get(found) == module:
                    self._loaded.setdefault(found, cmd)
        return self._loaded[name]

    def __setitem__(self, name: str, cmd: Command) -> None:
        self._loaded[name] = cmd
        self._table.setdefault(name, "")

    def __delitem__(self, name: str) -> None:
        del self._table[name]
        self._loaded.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


class LazyGroup(TyperGroup):
    """The root ``corral`` group, whose commands are a :class:`LazyCommands`."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = LazyCommands(dict(COMMANDS))


def _root() -> None:
    """Run workloads on a small fleet of Linux hosts."""


app = typer.Typer(
    name="corral",
    help="Run workloads on a small fleet of Linux hosts.",
    callback=_root,
    cls=LazyGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def client(timeout: float = 30) -> Client:
    """A client for the fleet named by CORRAL_URL/CORRAL_TOKEN or the context file (httpx and
    the wire models are imported here, by the commands that talk to the server)."""
    from corral.api.client import Client
    from corral.rig.context import resolve

    url, token = resolve()
    return Client(url, token, timeout=timeout)
