"""``corral shelve``, ``corral unshelve`` (one, a list, or ``--all``) and ``corral shelved``.

A bulk unshelve is one server-side operation group (``POST /v1/unshelve``) whose members are
single unshelves, at most ``--parallel`` in flight; the CLI follows the group through the
server's events under one progress bar (on stderr, so ``--json`` output stays clean). Every wait
is bounded: ``--wait`` caps the whole run, and what is still running then is reported as such
(it goes on on the server, even if the client goes away; ``corral ops ls`` shows it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral.api.timespec import iso
from corral.cli import render
from corral.cli.app import client
from corral.cli.ops_cmd import follow, run_op
from corral.cli.parse import parse_duration
from corral.errors import InvalidRequest, OperationFailed

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table

    from corral.api.client import Client
    from corral.api.models import OperationView



def parse_offload(text: str) -> float:
    """Seconds from ``1h``/``30m``/``0``; ``never`` is -1."""
    return -1.0 if text.strip().lower() in ("never", "-1") else parse_duration(text)


def _shelved_line(o: OperationView) -> str:
    r = o.result or {}
    after = r.get("offload_after")
    kept = ("removed from its host" if after == 0 else
            f"kept on {r.get('host')} " + ("until unshelve or rm" if after is None or after < 0
                                           else f"for {after:g}s"))
    return (f"{o.target}: shelved ({render.fmt_bytes(r.get('size'))} in "
            f"{r.get('files', '?')} files, {render.fmt_bytes(r.get('uploaded_bytes'))} "
            f"uploaded); CPU and memory released; disk {kept}")


def shelve(name: str, offload_after: str | None, wait: float, json_out: bool) -> None:
    after = parse_offload(offload_after) if offload_after is not None else None
    run_op(lambda c: c.shelve(name, after), f"shelve of '{name}'", wait, json_out,
           _shelved_line)


def _row(name: str, member: dict[str, Any] | None, state: str, error: str = "") -> dict[str, Any]:
    r = (member or {}).get("result") or {}
    return {"name": name, "result": state, "op": (member or {}).get("op"),
            "host": r.get("host"), "disk_was_there": r.get("disk_was_there"),
            "fetched_chunks": r.get("fetched_chunks"), "fetched_bytes": r.get("fetched_bytes"),
            "error": error or str((member or {}).get("error") or "")}


def rows_of(group: dict[str, Any], names: list[str], wait: float) -> list[dict[str, Any]]:
    """One row per instance of the group: from its result once it has ended, else from its
    record as far as it got (what was still running after ``wait`` is said so)."""
    if group.get("result"):
        return [_row(m["name"], m, m["state"]) for m in group["result"]["members"]]
    members = (group.get("data") or {}).get("members") or {}
    out = []
    for name in names:
        m = members.get(name)
        if m is None:
            out.append(_row(name, None, "not_started", f"not started within {wait:g}s"))
        elif m.get("state") in ("running", "rolling_back"):
            out.append(_row(name, m, "timeout", f"still {m['state']} after {wait:g}s"))
        else:
            out.append(_row(name, m, str(m.get("state"))))
    return out


def unshelve_many(c: Client, names: list[str], to: str | None, parallel: int, wait: float,
                  progress: Progress | None = None, all_: bool = False
                  ) -> list[dict[str, Any]]:
    """Unshelve ``names`` (or every shelved instance) as one server-side group, at most
    ``parallel`` at a time, following it through the server's events; one row each."""
    group = c.unshelve_group(names, all_=all_, to=to, parallel=parallel)
    wanted = list(group["params"]["names"])
    task = progress.add_task("unshelving", total=len(wanted)) if progress else None

    def shown(o: dict[str, Any]) -> None:
        if progress is None or task is None:
            return
        members = (o.get("data") or {}).get("members") or {}
        done = [m for m in members.values() if m.get("state") not in ("running",
                                                                        "rolling_back")]
        ok = sum(1 for m in done if m.get("state") == "succeeded")
        progress.update(task, completed=len(done),
                        description=f"unshelving: {ok} back, {len(done) - ok} failed, "
                                    f"{len(members) - len(done)} in flight")

    group = follow(c, group, wait, shown)
    return rows_of(group, wanted, wait)


def _results_table(rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("NAME", "RESULT", "HOST", "DISK", "OP", "ERROR"):
        t.add_column(col)
    for r in rows:
        disk = "-" if r["disk_was_there"] is None else (
            "was there" if r["disk_was_there"] else
            f"fetched {r['fetched_chunks']} chunks, {render.fmt_bytes(r['fetched_bytes'])}")
        t.add_row(r["name"], render.state_text(r["result"]), r["host"] or "-", disk,
                  r["op"] or "-", r["error"])
    return t


def unshelve(names: list[str], all_: bool, to: str | None, parallel: int, wait: float,
             json_out: bool) -> None:
    """One server-side group of unshelves, ``--parallel`` in flight (see the module doc)."""
    if all_ == bool(names):
        raise InvalidRequest("name instances or pass --all (not both)",
                             hint="corral unshelve web db, or corral unshelve --all")
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with client() as c:
        if all_ and not c.shelves_data():
            render.say("nothing is shelved")
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=render.err(), transient=json_out) as bar:
            rows = unshelve_many(c, names, to, parallel, wait, bar, all_=all_)
    if json_out:
        render.print_json(rows)
    else:
        render.out().print(_results_table(rows))
    failed = [r for r in rows if r["result"] != "succeeded"]
    if failed:
        raise OperationFailed(
            f"{len(failed)} of {len(rows)} unshelves did not succeed: "
            + ", ".join(f"{r['name']} ({r['result']})" for r in failed[:10]),
            hint="failed ones are shelved as before; see 'corral ops show OP'")


def shelved(json_out: bool) -> None:
    with client() as c:
        raw = c.shelves_data()
    if json_out:
        render.print_json(raw)
        return
    if not raw:
        render.say("nothing is shelved")
        return
    from rich.table import Table

    from corral.api.models import ShelfView

    rows = [ShelfView.model_validate(s) for s in raw]
    t = Table(box=None, pad_edge=False)
    for col in ("NAME", "FROM", "SHELVED", "DISK ON", "UNTIL", "SIZE", "UNIQUE", "CPUS", "MEM"):
        t.add_column(col)
    for s in rows:
        until = "-" if s.disk_host is None else (
            "unshelve/rm" if s.offload_at is None else iso(s.offload_at))
        t.add_row(s.name, s.shelved_from or "-", iso(s.shelved_at) if s.shelved_at else "-",
                  s.disk_host or "store only", until, render.fmt_bytes(s.size),
                  render.fmt_bytes(s.unique_size), render.fmt_cpus(s.cpus),
                  render.fmt_bytes(s.memory_bytes))
    render.out().print(t)
