"""``corral migrate`` and ``corral standby add/ls/sync/promote/rm``.

Commands that start an operation follow it to its end (see :func:`corral.cli.ops_cmd.run_op`)
and say what it cost: downtime and bytes for a migration or promotion, freeze time and bytes
for a refresh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from corral.api.timespec import iso
from corral.cli.app import JSON_HELP, client
from corral.cli.ops_cmd import run_op
from corral.cli.parse import parse_duration
from corral.cli.render import fmt_bytes, out, print_json

if TYPE_CHECKING:
    from corral.api.models import OperationView

commands = typer.Typer()
standby_app = typer.Typer(help="Warm standbys: copies of an instance's disk on another host.",
                          no_args_is_help=True)
commands.add_typer(standby_app, name="standby")

WAIT_HELP = "seconds to follow the operation"


def moved(o: OperationView) -> str:
    d = o.data
    parts = [f"moved {fmt_bytes(int(d.get('bytes') or 0))}"]
    frozen = [p.get("freeze_ms") for p in d.get("passes", []) if p.get("freeze_ms") is not None]
    if frozen:
        parts.append(f"frozen {frozen[-1]:.1f} ms")
    if d.get("downtime_ms") is not None:
        parts.append(f"downtime {d['downtime_ms']:.0f} ms")
    return ", ".join(parts)


@commands.command()
def migrate(
    name: str,
    to: Annotated[str | None, typer.Option("--to", help="target host (default: the "
                                            "scheduler's pick)")] = None,
    cold: Annotated[bool, typer.Option("--cold", help="stop first, then copy")] = False,
    wait: Annotated[float, typer.Option(help=WAIT_HELP)] = 3600.0,
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Move an instance and its disk to another host (warm: copy while it runs, then a short
    freeze); any failure leaves it running where it was and the target clean."""
    run_op(lambda c: c.migrate(name, to, cold), f"migration of '{name}'", wait, json_out,
           moved)


@standby_app.command("add")
def standby_add(
    name: str,
    host: Annotated[str | None, typer.Option("--host", help="standby host (default: the "
                                              "scheduler's pick, never its own)")] = None,
    every: Annotated[str, typer.Option("--every", help="refresh interval, e.g. 60s, 5m")
                     ] = "60s",
    wait: Annotated[float, typer.Option(help=WAIT_HELP)] = 3600.0,
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Keep a warm copy of NAME's disk on another host, refreshed every --every."""
    interval = parse_duration(every)
    run_op(lambda c: c.standby_add(name, host, interval), f"first refresh of '{name}'", wait,
           json_out, moved)


@standby_app.command("sync")
def standby_sync(
    name: str,
    wait: Annotated[float, typer.Option(help=WAIT_HELP)] = 3600.0,
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Refresh NAME's standby now."""
    run_op(lambda c: c.standby_op(name, "sync"), f"refresh of '{name}'", wait, json_out, moved)


@standby_app.command("promote")
def standby_promote(
    name: str,
    wait: Annotated[float, typer.Option(help=WAIT_HELP)] = 3600.0,
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Planned switch: last refresh, stop the primary, start the standby; the old primary's
    disk becomes the new standby."""
    run_op(lambda c: c.standby_op(name, "promote"), f"promotion of '{name}'", wait, json_out,
           moved)


@standby_app.command("rm")
def standby_rm(name: str) -> None:
    """Stop keeping a standby of NAME and remove its copy."""
    with client() as c:
        c.standby_rm(name)
    out().print(f"standby of {name} removed")


@standby_app.command("ls")
def standby_ls(
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Every standby: where, state, last sync, data age, last freeze and bytes moved."""
    with client() as c:
        items = c.standbys()
    if json_out:
        print_json(items)
        return
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("INSTANCE", "HOST", "STATE", "EVERY", "LAST SYNC", "DATA AGE", "FREEZE",
                "LAST BYTES", "TOTAL", "SYNCS", "ERROR"):
        t.add_column(col)
    for sb in items:
        age = "-" if sb.data_age_seconds is None else f"{sb.data_age_seconds:.0f}s"
        t.add_row(sb.instance, sb.host, sb.state, f"{sb.every_seconds:g}s",
                  iso(sb.last_sync_at) if sb.last_sync_at else "-", age,
                  "-" if sb.last_freeze_ms is None else f"{sb.last_freeze_ms:.1f} ms",
                  fmt_bytes(sb.last_bytes), fmt_bytes(sb.total_bytes), str(sb.syncs),
                  sb.last_error[:50])
    out().print(t)
