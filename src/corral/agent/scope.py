"""What names an agent's cgroups on its machine: ``<host>-<id>``, the id kept in its data dir.

The host name alone is not enough: two fleets on one machine both have a ``host1``, and an
instance ``db`` in each would share a cgroup (CPU figures mixed, one removal failing with
EBUSY). The id is made once and kept, so a restarted agent (and ``corral down`` cleaning up
after a dead one) finds the same cgroups.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from corral.agent.store import write_atomic

ID_FILE = "agent-id"


def driver_scope(data_dir: Path, host: str) -> str:
    """``<host>-<id>`` for the agent whose data dir is ``data_dir`` (the id made if missing
    or damaged)."""
    path = data_dir / ID_FILE
    try:
        ident = path.read_text().strip()
    except FileNotFoundError:
        ident = ""
    if not re.fullmatch(r"[0-9a-f]{8}", ident):
        ident = secrets.token_hex(4)
        write_atomic(path, ident.encode())
    return f"{host}-{ident}"
