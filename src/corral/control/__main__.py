"""``python -m corral.control``: the server without the CLI (settings from env and file)."""

from __future__ import annotations

import logging
import sys

from corral import config
from corral.control.server import serve
from corral.errors import CorralError

try:
    settings = config.load()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(settings)
except CorralError as exc:
    print(f"error: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else ""),
          file=sys.stderr)
    sys.exit(exc.exit_code)
