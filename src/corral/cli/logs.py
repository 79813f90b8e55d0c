"""``corral logs`` (an instance's captured lines) and ``corral logsink`` (a durable copy on disk).

``logs`` reads through the API, so it needs only the fleet's URL and token. ``logsink`` is a
JetStream consumer of its own: it asks the server where the bus is (``/v1/status``) and uses the
same fleet token, then writes one file per instance and source under ``--dir`` until Ctrl-C or
SIGTERM. Run two, with two directories (and names), for two places.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from corral.api.timespec import iso, parse_since
from corral.cli.app import client
from corral.errors import InvalidRequest


def logs(name: str, follow: bool, since: str | None, source: str | None, json_out: bool
         ) -> None:
    """Each line is flushed as it arrives, so ``-f`` output can be piped and watched."""
    wire_since = None if since is None else iso(parse_since(since, time.time()))
    out = sys.stdout
    with client(timeout=60) as c:
        try:
            for rec in c.logs(name, since=wire_since, follow=follow, source=source):
                out.write(json.dumps(rec) + "\n" if json_out else f"{rec['line']}\n")
                out.flush()
        except KeyboardInterrupt:
            return


def logsink(directory: Path, name: str | None) -> None:
    """The sink reads the bus itself (JetStream), so it asks the server only where that is."""
    import asyncio
    import logging

    from corral.rig.context import ca_file, resolve
    from corral.telemetry.logsink import reader, serve

    directory = directory.expanduser().resolve()
    sink_name = name or directory.name or "default"
    if not sink_name.replace("-", "").replace("_", "").isalnum():
        raise InvalidRequest(f"sink name {sink_name!r} must be letters, digits, '-' and '_'",
                             hint="give one with --name")
    _, token = resolve()
    with client() as c:
        nats_url = str(c.status_data()["nats_url"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(f"logsink {sink_name}: {nats_url} -> {directory}", file=sys.stderr, flush=True)
    asyncio.run(serve(nats_url, reader(token, ca_file() or ""), directory, sink_name))
