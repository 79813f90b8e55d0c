"""Entry point of the ``corral`` command: runs the Typer app under the one error formatter.

Typer's own exception display is off; every :class:`CorralError` (from the API, the context
file, argument parsing or ``corral up``) ends here and becomes ``error:``/``hint:`` lines on
stderr with the error's own exit code. Nothing here imports a command module, Rich or
pydantic: starting ``corral`` costs Typer and what the one command run needs (see
:mod:`corral.cli.app`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeGuard

import typer
from typer.exceptions import TyperException

from corral.cli.app import app
from corral.cli.render import err, report_error
from corral.errors import CorralError, InvalidRequest

if TYPE_CHECKING:
    from pydantic import ValidationError


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
    except typer.Exit as exc:
        return int(exc.exit_code)
    except TyperException as exc:  # Typer's own Click: usage errors, bad parameters
        show = getattr(exc, "show", None)
        if callable(show):
            show(file=sys.stderr)
        else:
            err().print(f"error: {exc}")
        return int(getattr(exc, "exit_code", 2))
    except (typer.Abort, KeyboardInterrupt):
        err().print("aborted")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if _is_validation_error(exc):
            return report_error(validation_error(exc))
        raise
    return 0


def _is_validation_error(exc: Exception) -> TypeGuard[ValidationError]:
    """Whether ``exc`` is pydantic's, without importing pydantic for commands that never
    loaded it (no wire model was built, so none can have refused)."""
    core = sys.modules.get("pydantic_core")
    return core is not None and isinstance(exc, core.ValidationError)


def main() -> None:
    # httpx imports its own command line when click and rich are installed (they are: Rich
    # for us, click for it): pygments, rich.syntax, rich.progress, ~50 ms of every command
    # that talks to the server, for a program corral never runs. A None entry makes that
    # one import fail, which httpx expects (without its "cli" extra) and turns into a stub.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
