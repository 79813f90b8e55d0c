"""``corral migrate`` and ``corral standby add/ls/sync/promote/rm``.

Commands that start an operation follow it to its end (see :func:`corral.cli.ops_cmd.run_op`)
and say what it cost: downtime and bytes for a migration or promotion, freeze time and bytes
for a refresh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.api.timespec import iso
from corral.cli.app import client
from corral.cli.ops_cmd import run_op
from corral.cli.parse import parse_duration
from corral.cli.render import fmt_bytes, out, print_json, say

if TYPE_CHECKING:
    from corral.api.models import OperationView


def moved(o: OperationView) -> str:
    """What a move cost, from the operation's typed result (api/operations.py)."""
    r = o.result or {}
    parts = [f"moved {fmt_bytes(int(r.get('bytes') or 0))}"]
    if r.get("freeze_ms") is not None:
        parts.append(f"frozen {r['freeze_ms']:.1f} ms")
    if r.get("downtime_ms") is not None:
        parts.append(f"downtime {r['downtime_ms']:.0f} ms")
    return ", ".join(parts)


def migrate(name: str, to: str | None, cold: bool, wait: float, json_out: bool) -> None:
    run_op(lambda c: c.migrate(name, to, cold), f"migration of '{name}'", wait, json_out,
           moved)


def standby_add(name: str, host: str | None, every: str, wait: float, json_out: bool
                ) -> None:
    interval = parse_duration(every)
    run_op(lambda c: c.standby_add(name, host, interval), f"first refresh of '{name}'", wait,
           json_out, moved)


def standby_sync(name: str, wait: float, json_out: bool) -> None:
    run_op(lambda c: c.standby_op(name, "sync"), f"refresh of '{name}'", wait, json_out, moved)


def standby_promote(name: str, wait: float, json_out: bool) -> None:
    run_op(lambda c: c.standby_op(name, "promote"), f"promotion of '{name}'", wait, json_out,
           moved)


def standby_rm(name: str) -> None:
    with client() as c:
        c.standby_rm(name)
    say(f"standby of {name} removed")


def standby_ls(json_out: bool) -> None:
    with client() as c:
        raw = c.standbys_data()
    if json_out:
        print_json(raw)
        return
    from rich.table import Table

    from corral.api.models import StandbyView

    items = [StandbyView.model_validate(s) for s in raw]
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
