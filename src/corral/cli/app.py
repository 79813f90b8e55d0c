"""The Typer application object and the one way commands get an API client.

Command modules register themselves on :data:`app`; :mod:`corral.cli.main` imports them and runs
the app under the error formatter.
"""

from __future__ import annotations

import typer

from corral.api.client import Client
from corral.rig.context import resolve

app = typer.Typer(
    name="corral",
    help="Run workloads on a small fleet of Linux hosts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
host_app = typer.Typer(help="Hosts of the fleet.", no_args_is_help=True)
app.add_typer(host_app, name="host")

JSON_HELP = "print plain JSON instead of a table"


def client(timeout: float = 30) -> Client:
    """A client for the fleet named by CORRAL_URL/CORRAL_TOKEN or the context file."""
    url, token = resolve()
    return Client(url, token, timeout=timeout)
