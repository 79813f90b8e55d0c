"""Entry point of the ``corral`` command: runs the Typer app under the one error formatter.

Typer's own exception display is off; every :class:`CorralError` (from the API, the context
file, argument parsing or ``corral up``) ends here and becomes ``error:``/``hint:`` lines on
stderr with the error's own exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
import typer
from pydantic import ValidationError
from typer.exceptions import TyperException

from corral.cli import (  # noqa: F401  (registers the commands)
    events_cmd,
    fleet_cmds,
    images,
    instances,
    logs,
    ops_cmd,
    shelve_cmd,
    standby_cmd,
    top,
    traffic_cmd,
)
from corral.cli.app import app
from corral.cli.render import err, report_error
from corral.errors import CorralError, InvalidRequest


def validation_error(exc: ValidationError) -> InvalidRequest:
    """A request the CLI built but the wire model refused, named field by field."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return InvalidRequest("invalid request: " + "; ".join(parts),
                          hint="see 'corral COMMAND --help' for what each option takes")


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code instead of exiting (tests call this)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="corral", standalone_mode=False)
    except CorralError as exc:
        return report_error(exc)
    except ValidationError as exc:
        return report_error(validation_error(exc))
    except (typer.Exit, click.exceptions.Exit) as exc:
        return int(exc.exit_code)
    except (TyperException, click.ClickException) as exc:
        show = getattr(exc, "show", None)
        if callable(show):
            show(file=sys.stderr)
        else:
            err().print(f"error: {exc}")
        return int(getattr(exc, "exit_code", 2))
    except (typer.Abort, click.exceptions.Abort, KeyboardInterrupt):
        err().print("aborted")
        return 130
    except BrokenPipeError:
        return 0
    return 0


def main() -> None:
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
