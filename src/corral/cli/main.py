"""Entry point of the ``corral`` command: runs one command under the one error formatter.

Every :class:`CorralError` (from the API, the context file, argument parsing or ``corral up``)
ends here and becomes ``error:``/``hint:`` lines on stderr with the error's own exit code; a
refused command line (exit 2) is preceded by the command's usage line. Nothing here imports a
command module, Rich or pydantic: starting ``corral`` costs what the one command run needs (see
:mod:`corral.cli.app`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeGuard

from corral.cli.app import UsageError, run
from corral.cli.render import report_error
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
        return run(args)
    except UsageError as exc:
        sys.stderr.write(exc.usage)
        return report_error(exc)
    except CorralError as exc:
        return report_error(exc)
    except SystemExit as exc:  # --help, and commands that end with their own exit code
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except KeyboardInterrupt:
        sys.stderr.write("aborted\n")
        return 130
    except BrokenPipeError:
        _drop_stdout()
        return 0
    except Exception as exc:
        if _is_validation_error(exc):
            return report_error(validation_error(exc))
        raise


def _is_validation_error(exc: Exception) -> TypeGuard[ValidationError]:
    """Whether ``exc`` is pydantic's, without importing pydantic for commands that never
    loaded it (no wire model was built, so none can have refused)."""
    core = sys.modules.get("pydantic_core")
    return core is not None and isinstance(exc, core.ValidationError)


def _drop_stdout() -> None:
    """A reader that went away (``corral ls | head -1``) is not an error; what is still
    buffered for it goes nowhere instead of failing again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main() -> None:
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
