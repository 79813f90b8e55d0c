"""``corral ops ls/show`` (the operation engine's records) and ``corral recreate``.

``corral recreate`` (and every command that starts an operation) starts it, then follows it
through the server's events until it is finished, printing each step's state and time; it
exits non-zero (12) unless the operation succeeded, with the operation's error and its id for
``corral ops show``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from corral.api.timespec import iso
from corral.cli.app import client
from corral.cli.render import err, out, print_json
from corral.errors import CorralError, OperationFailed

if TYPE_CHECKING:
    from rich.table import Table

    from corral.api.client import Client
    from corral.api.models import OperationView




def _took(start: float | None, end: float | None) -> str:
    if start is None:
        return "-"
    return f"{(end or time.time()) - start:.2f}s"


def ops_table(items: Sequence[OperationView]) -> Table:
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("ID", "KIND", "TARGET", "STATE", "STEP", "CREATED", "ERROR"):
        t.add_column(col)
    for o in items:
        step = next((s.name for s in o.steps if s.state not in ("pending", "done", "undone")),
                    "-")
        error = (o.error or {}).get("message", "") if o.error else ""
        t.add_row(o.id, o.kind, o.target, o.state, step, iso(o.created_at),
                  error if len(error) <= 60 else error[:59] + "…")
    return t


def steps_table(o: OperationView) -> Table:
    from rich.table import Table

    t = Table(box=None, pad_edge=False, title=f"{o.kind} {o.target} ({o.id}): {o.state}",
              title_justify="left")
    for col in ("STEP", "STATE", "TOOK", "ERROR"):
        t.add_column(col)
    for s in o.steps:
        t.add_row(s.name, s.state, _took(s.started_at, s.ended_at), s.error)
    return t


def show_op(o: OperationView) -> None:
    console = out()
    console.print(steps_table(o))
    if o.error:
        console.print(f"error: {o.error.get('message', '')}"
                      + (f" (step {o.error['step']})" if o.error.get("step") else ""))
    for h in o.hooks:
        console.print(f"hook {h.get('name')}: exit {h.get('exit_code')}"
                      + (" (timed out)" if h.get("timed_out") else ""))


def ops_ls(target: str | None, limit: int, json_out: bool) -> None:
    with client() as c:
        items = c.ops_data(target=target, limit=limit)
    if json_out:
        print_json(items)
        return
    from corral.api.models import OperationView

    out().print(ops_table([OperationView.model_validate(o) for o in items]))


def ops_show(op_id: str, json_out: bool) -> None:
    with client() as c:
        o = c.op_data(op_id)
    if json_out:
        print_json(o)
        return
    from corral.api.models import OperationView

    show_op(OperationView.model_validate(o))


def _doing(o: dict[str, Any]) -> str:
    """The step in flight and for how long, for the live status line."""
    for s in o.get("steps") or []:
        if s.get("state") in ("running", "undoing"):
            verb = "undoing" if s["state"] == "undoing" else "step"
            return f"{verb} {s['name']} ({_took(s.get('started_at'), None)})"
    return str(o.get("state"))


def follow(c: Client, first: dict[str, Any], wait: float,
           on_change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The operation as it is once it finished, or after ``wait`` seconds; it follows the
    server's events (``Client.watch_op``), so a step's end shows at once and an operation
    that runs for hours costs a look every few seconds, not several a second."""
    o = first
    for o in c.watch_op(first, time.monotonic() + wait):
        if on_change is not None:
            on_change(o)
    return o


def run_op(start: Callable[[Client], OperationView], what: str, wait: float,
           json_out: bool, summary: Callable[[OperationView], str] | None = None
           ) -> OperationView:
    """Start an operation, follow it until it finishes (at most ``wait`` seconds), print it,
    and raise :class:`OperationFailed` (exit 12) unless it succeeded."""
    from corral.api.models import OperationView

    console = err()
    with client() as c:
        first = start(c).model_dump(mode="json")
        live = console.status(f"{what}: {first['state']}") \
            if console.is_terminal and not json_out else contextlib.nullcontext()
        with live as status:
            raw = follow(c, first, wait, None if status is None else
                         lambda o: status.update(f"{what}: {_doing(o)}"))
    o = OperationView.model_validate(raw)
    if json_out:
        print_json(o)
    else:
        show_op(o)
        if summary is not None and o.state == "succeeded":
            out().print(summary(o))
    if not o.finished:
        raise CorralError(f"operation {o.id} is still {o.state} after {wait:g}s",
                          hint=f"follow it with 'corral ops show {o.id}'", retryable=True)
    if o.state != "succeeded":
        message = (o.error or {}).get("message", "no error recorded")
        if json_out:
            err().print(f"operation {o.id} {o.state}")
        raise OperationFailed(f"{what} {o.state}: {message}",
                              hint=f"see 'corral ops show {o.id}'")
    return o


def recreate(name: str, to: str | None, wait: float, json_out: bool) -> None:
    run_op(lambda c: c.recreate(name, to), f"recreate of '{name}'", wait, json_out)
