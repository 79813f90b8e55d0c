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
from typing import Annotated

import typer

from corral.api.timespec import iso, parse_since
from corral.cli.app import client
from corral.errors import InvalidRequest

commands = typer.Typer()


@commands.command()
def logs(
    name: Annotated[str, typer.Argument(help="instance name")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")
                      ] = False,
    since: Annotated[str | None, typer.Option(
        help="only lines from this far back (30s, 10m, 2h) or since a time (ISO 8601)")] = None,
    source: Annotated[str | None, typer.Option(
        help="stdout, stderr, or a source given with 'corral run --tail'")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="one JSON object per line: ts, host, source, seq, line")] = False,
) -> None:
    """Print an instance's captured output (stdout, stderr and tailed files), oldest first."""
    wire_since = None if since is None else iso(parse_since(since, time.time()))
    out = sys.stdout
    with client(timeout=60) as c:
        try:
            for rec in c.logs(name, since=wire_since, follow=follow, source=source):
                out.write(json.dumps(rec) + "\n" if json_out else f"{rec['line']}\n")
                out.flush()
        except KeyboardInterrupt:
            return


@commands.command()
def logsink(
    directory: Annotated[Path, typer.Option("--dir", help="where the per-instance files go")],
    name: Annotated[str | None, typer.Option(
        help="this sink's name (its durable consumer and checkpoint); default: the dir's name")
    ] = None,
) -> None:
    """Write every instance's lines to DIR/<instance>/<source>.log, exactly once, until stopped.

    A sink killed and started again resumes at its checkpoint: no line lost, none written twice;
    gaps in a source's numbering are recorded in DIR/gaps.jsonl. Run two for two places."""
    import asyncio
    import logging

    from corral.rig.context import resolve
    from corral.telemetry.logsink import serve

    directory = directory.expanduser().resolve()
    sink_name = name or directory.name or "default"
    if not sink_name.replace("-", "").replace("_", "").isalnum():
        raise InvalidRequest(f"sink name {sink_name!r} must be letters, digits, '-' and '_'",
                             hint="give one with --name")
    _, token = resolve()
    with client() as c:
        nats_url = c.status().nats_url
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(f"logsink {sink_name}: {nats_url} -> {directory}", file=sys.stderr, flush=True)
    asyncio.run(serve(nats_url, token, directory, sink_name))
