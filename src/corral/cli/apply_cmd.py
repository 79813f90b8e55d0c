"""``corral apply -f fleet.toml`` and ``corral export``: the fleet as a file.

apply reads and checks the whole file first (nothing is asked of the server for a file with
a problem), computes the plan against the live fleet (:mod:`corral.cli.spec_plan`), shows it
like ``terraform plan`` and acts only once confirmed: a prompt on a terminal, else ``--yes``.
A plan that recreates anything (its disk starts empty) needs ``--yes`` even on a terminal.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.cli.app import client
from corral.cli.render import err, out, print_json, say
from corral.errors import CorralError, InvalidRequest, OperationFailed

if TYPE_CHECKING:
    from rich.table import Table

    from corral.api.client import Client
    from corral.api.models import OperationView
    from corral.api.spec import FleetSpec
    from corral.cli.spec_plan import Change, Plan

_STYLE = {"create": "+", "recreate": "-/+", "migrate": "~", "standby-add": "+",
          "standby-replace": "~", "standby-rm": "-"}


def read_spec(file: Path) -> FleetSpec:
    from corral.api.spec import load

    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read {file}: {exc}",
                             hint="give the fleet file with -f FILE ('-' for stdin)") from None
    return load(text, str(file))


def _short(value: Any) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= 70 else text[:69] + "…"


def plan_table(p: Plan) -> Table:
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("", "ACTION", "INSTANCE", "FIELD", "NOW", "WANTED"):
        t.add_column(col)
    for c in p.changes:
        for i, (field, now, want) in enumerate(c.diffs):
            first = i == 0
            t.add_row(_STYLE[c.action] if first else "", c.action if first else "",
                      c.name if first else "", field, _short(now), _short(want))
    return t


def apply(file: Path | None, schema: bool, yes: bool, dry_run: bool, wait: float,
          json_out: bool) -> None:
    if schema:
        import json

        from corral.api.spec import schema as fleet_schema

        sys.stdout.write(json.dumps(fleet_schema(), indent=2) + "\n")
        return
    if file is None:
        raise InvalidRequest("no fleet file given", hint="corral apply -f fleet.toml (or "
                             "--schema for the file's JSON Schema)")
    spec = read_spec(file)
    from corral.cli.spec_plan import plan

    with client(timeout=120) as c:
        p = plan(spec, c.instances(), c.standbys())
        if not p.changes or dry_run:
            if json_out:
                print_json({**p.as_dict(), "applied": False})
            else:
                _show(p)
            return
        if not json_out:
            _show(p)
        _confirm(p, yes)
        done = [_act(c, change, wait) for change in p.changes]
    if json_out:
        print_json({**p.as_dict(), "applied": True, "done": done})
    else:
        say(f"Applied: {len(done)} change(s).")


def _show(p: Plan) -> None:
    console = out()
    if p.changes:
        console.print(plan_table(p))
        counts = {a: sum(1 for c in p.changes if c.action == a) for a in _STYLE}
        console.print("Plan: " + ", ".join(f"{n} to {a}" for a, n in counts.items() if n))
        if p.recreates:
            console.print(f"[bold]recreate[/bold] (stop, rm, create: the disk starts empty): "
                          f"{', '.join(p.recreates)}")
    else:
        console.print("No changes: the fleet matches the file.")
    if p.unmanaged:
        console.print(f"Not in the file, left alone (apply never deletes): "
                      f"{', '.join(p.unmanaged)}")


def _confirm(p: Plan, yes: bool) -> None:
    if yes:
        return
    if p.recreates:
        raise InvalidRequest(f"the plan recreates {', '.join(p.recreates)}: each is stopped, "
                             "removed and created again with an empty disk",
                             hint="nothing was done; run again with --yes to go ahead")
    if not sys.stdin.isatty():
        raise InvalidRequest("not confirmed: no terminal to ask on",
                             hint="nothing was done; run again with --yes to go ahead")
    answer = input(f"Apply {len(p.changes)} change(s)? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise InvalidRequest("not confirmed", hint="nothing was done")


def _follow(c: Client, start: OperationView, what: str, wait: float) -> None:
    from corral.cli.ops_cmd import follow

    o = follow(c, start.model_dump(mode="json"), wait)
    if not o.get("finished"):
        raise CorralError(f"{what}: operation {o['id']} is still {o['state']} after {wait:g}s",
                          hint=f"follow it with 'corral ops show {o['id']}', then apply again",
                          retryable=True)
    if o.get("state") != "succeeded":
        message = (o.get("error") or {}).get("message", "no error recorded")
        raise OperationFailed(f"{what} {o.get('state')}: {message}",
                              hint=f"see 'corral ops show {o['id']}'; apply again to retry")


def _act(c: Client, change: Change, wait: float) -> dict[str, Any]:
    """Carry out one change; an error stops apply there (the next plan shows what is left)."""
    name, entry = change.name, change.entry
    err().print(f"{_STYLE[change.action]} {change.action} {name}")
    if change.action in ("create", "recreate"):
        assert entry is not None
        if change.action == "recreate":
            c.delete(name, force=True)
        c.create(entry.request())
    elif change.action == "migrate":
        assert entry is not None
        _follow(c, c.migrate(name, entry.host), f"migration of '{name}'", wait)
    elif change.action == "standby-rm":
        c.standby_rm(name)
    else:  # standby-add, standby-replace
        assert entry is not None and entry.standby is not None
        if change.action == "standby-replace":
            c.standby_rm(name)
        _follow(c, c.standby_add(name, entry.standby.host, float(entry.standby.every)),
                f"standby of '{name}'", wait)
    return change.as_dict()


def export(json_out: bool) -> None:
    from corral.cli.spec_toml import HEADER, dumps
    from corral.cli.spec_toml import export as build

    with client() as c:
        data = build(c.instances(), c.standbys())
    if json_out:
        print_json(data)
    else:
        sys.stdout.write(dumps(data, HEADER))
