"""``corral shelve``, ``corral unshelve`` (one, a list, or ``--all``) and ``corral shelved``.

A bulk unshelve is one operation per instance with at most ``--parallel`` in flight, followed by
polling ``GET /v1/ops/{id}`` under one progress bar (on stderr, so ``--json`` output stays clean).
Every wait is bounded: ``--wait`` caps the whole run, and what is still running then is reported
as such (it goes on on the server; ``corral ops ls`` shows it) instead of waiting forever.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from corral.api.timespec import iso
from corral.cli import render
from corral.cli.app import client
from corral.cli.ops_cmd import run_op
from corral.cli.parse import parse_duration
from corral.errors import CorralError, InvalidRequest, OperationFailed

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table

    from corral.api.client import Client
    from corral.api.models import OperationView

POLL = 0.3
#: a busy instance (the offload loop is removing its disk) is asked again this many times
BUSY_RETRIES = 20


def parse_offload(text: str) -> float:
    """Seconds from ``1h``/``30m``/``0``; ``never`` is -1."""
    return -1.0 if text.strip().lower() in ("never", "-1") else parse_duration(text)


def _shelved_line(o: OperationView) -> str:
    push = o.data.get("push") or {}
    after = o.data.get("offload_after")
    kept = ("removed from its host" if after == 0 else
            f"kept on {o.data.get('source')} " + ("until unshelve or rm" if after is None else
                                                 f"for {after:g}s"))
    return (f"{o.target}: shelved ({render.fmt_bytes(push.get('size'))} in "
            f"{push.get('files', '?')} files, {render.fmt_bytes(push.get('uploaded_bytes'))} "
            f"uploaded); CPU and memory released; disk {kept}")


def shelve(name: str, offload_after: str | None, wait: float, json_out: bool) -> None:
    after = parse_offload(offload_after) if offload_after is not None else None
    run_op(lambda c: c.shelve(name, after), f"shelve of '{name}'", wait, json_out,
           _shelved_line)


def _result(name: str, o: OperationView | None, state: str, error: str = "") -> dict[str, Any]:
    pull = (o.data.get("pull") if o is not None else None) or {}
    if o is not None and o.error and not error:
        error = str(o.error.get("message", ""))
    return {"name": name, "result": state, "op": o.id if o is not None else None,
            "host": o.data.get("target") if o is not None else None,
            "disk_was_there": bool(pull.get("existing")) if pull else None,
            "fetched_chunks": pull.get("fetched_chunks"),
            "fetched_bytes": pull.get("fetched_bytes"), "error": error}


def unshelve_many(c: Client, names: list[str], to: str | None, parallel: int, wait: float,
                  progress: Progress | None = None) -> list[dict[str, Any]]:
    """Unshelve ``names`` with at most ``parallel`` operations in flight; one result each."""
    todo: deque[tuple[str, int]] = deque((n, 0) for n in names)
    running: dict[str, OperationView] = {}
    results: dict[str, dict[str, Any]] = {}
    task = progress.add_task("unshelving", total=len(names)) if progress else None
    deadline = time.monotonic() + wait
    while (todo or running) and time.monotonic() < deadline:
        while todo and len(running) < parallel:
            name, tries = todo.popleft()
            try:
                running[name] = c.unshelve(name, to)
            except CorralError as exc:
                if exc.retryable and tries < BUSY_RETRIES:
                    todo.append((name, tries + 1))
                    break
                results[name] = _result(name, None, "refused", exc.message)
        time.sleep(POLL)
        for name, o in list(running.items()):
            o = c.op(o.id)
            running[name] = o
            if o.finished:
                del running[name]
                results[name] = _result(name, o, o.state)
        if progress is not None and task is not None:
            ok = sum(1 for r in results.values() if r["result"] == "succeeded")
            progress.update(task, completed=len(results),
                            description=f"unshelving: {ok} back, {len(results) - ok} failed, "
                                        f"{len(running)} in flight")
    for name, o in running.items():
        results[name] = _result(name, o, "timeout", f"still {o.state} after {wait:g}s")
    for name, _ in todo:
        results[name] = _result(name, None, "not_started", f"not started within {wait:g}s")
    return [results[n] for n in names]


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
    """One operation per instance, ``--parallel`` in flight (see the module doc)."""
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
        wanted = names or [str(s["name"]) for s in c.shelves_data()]
        if not wanted:
            render.say("nothing is shelved")
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=render.err(), transient=json_out) as bar:
            rows = unshelve_many(c, wanted, to, parallel, wait, bar)
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
