"""``corral host drain`` and ``corral host undrain``.

A drain is one server-side operation group (``POST /v1/hosts/NAME/drain``); the CLI follows it
through the server's events under one progress bar (on stderr, so ``--json`` stays clean). The
wait is bounded by ``--wait``; the drain goes on on the server if the client goes away.
"""

from __future__ import annotations

from typing import Any

from corral.cli import render
from corral.cli.app import client
from corral.cli.ops_cmd import follow
from corral.cli.parse import parse_duration
from corral.errors import CorralError, OperationFailed

RUNNING = ("running", "rolling_back", "pending")


def drain(name: str, deadline: str | None, parallel: int, wait: float, json_out: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    limit = parse_duration(deadline) if deadline is not None else None
    with client() as c:
        first = c.host_drain(name, limit, parallel)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=render.err(), transient=json_out) as bar:
            task = bar.add_task(f"draining {name}", total=None)

            def shown(o: dict[str, Any]) -> None:
                members = (o.get("data") or {}).get("members") or {}
                done = [m for m in members.values() if m.get("state") not in RUNNING]
                ok = sum(1 for m in done if m.get("state") in ("succeeded", "gone"))
                bar.update(task, total=len(members) or None, completed=len(done),
                           description=f"draining {name}: {ok} moved, {len(done) - ok} "
                                       f"failed, {len(members) - len(done)} to go")

            o = follow(c, first, wait, shown)
        marked = bool(c.host_data(name).get("draining"))
    if json_out:
        render.print_json(o)
    members = (o.get("result") or {}).get("members") or []
    if not json_out:
        for m in members:
            render.say(f"{m['kind']} {m['name']}: {m['state']}"
                       + (f" -> {m['host']}" if m.get("host") else "")
                       + (f" ({m['error']})" if m.get("error") else ""))
    if not o.get("finished"):
        raise CorralError(f"drain {o['id']} of {name} is still {o['state']} after {wait:g}s",
                          hint=f"follow it with 'corral ops show {o['id']}'", retryable=True)
    if o.get("state") != "succeeded":
        raise OperationFailed((o.get("error") or {}).get("message", f"drain of {name} failed"),
                              hint=f"see 'corral ops show {o['id']}'; " + (
                                  f"the host stays marked draining until 'corral host undrain "
                                  f"{name}'" if marked else "the host is not marked draining"))
    if not json_out:
        render.say(f"host {name} drained: it holds nothing and takes nothing new "
                   f"(undo with 'corral host undrain {name}')")


def undrain(name: str, json_out: bool) -> None:
    with client() as c:
        r = c.host_undrain(name)
    if json_out:
        render.print_json(r)
    else:
        render.say(f"host {name} " + ("undrained: it takes new instances again"
                                      if r.get("was_draining") else "was not draining"))
