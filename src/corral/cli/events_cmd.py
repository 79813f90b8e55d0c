"""``corral events``: the fleet's event stream, past and (with ``-f``) live."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from corral.api.timespec import iso, parse_since
from corral.cli.app import client

if TYPE_CHECKING:
    from corral.api.models import Event

commands = typer.Typer()

COLUMNS = "{:>7}  {:<24}  {:<18}  {:<10}  {:<16}  {}"


def describe(ev: Event) -> str:
    """The short 'what happened' column."""
    d = ev.data
    if ev.type == "instance.state":
        text = f"{d.get('from')} -> {d.get('to')} ({d.get('cause')})"
        if d.get("exit_code") is not None:
            text += f" exit {d['exit_code']}"
        return text
    if ev.type == "instance.error":
        return f"{d.get('verb')}: {d.get('code')}: {d.get('message')}"
    return " ".join(f"{k}={_short(v)}" for k, v in d.items() if v is not None)


def _short(v: Any) -> str:
    text = str(v)
    return text if len(text) <= 40 else text[:39] + "…"


def line(ev: Event) -> str:
    return COLUMNS.format(ev.index, iso(ev.ts), ev.type, ev.host or "-", ev.instance or "-",
                          describe(ev))


@commands.command()
def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events")
                      ] = False,
    since: Annotated[str | None, typer.Option(help="10m, 2h, 1d, an ISO time or unix seconds")
                     ] = None,
    after: Annotated[int | None, typer.Option(help="only events after this index")] = None,
    type_: Annotated[list[str] | None, typer.Option(
        "--type", help="event type or prefix, e.g. instance.state or host (repeatable)")] = None,
    instance: Annotated[str | None, typer.Option(help="only this instance's events")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON event per line")] = False,
) -> None:
    """Every committed change of the fleet (instances, hosts, errors), oldest first.

    Without --since all kept events are shown; -f alone starts with the next new event."""
    start = None if since is None else iso(parse_since(since, time.time()))
    header = not json_out
    with client(timeout=30) as c:
        try:
            for ev in c.events(since=start, after=after, follow=follow, types=type_,
                               instance=instance):
                if json_out:
                    sys.stdout.write(ev.model_dump_json() + "\n")
                else:
                    if header:
                        print(COLUMNS.format("INDEX", "TIME", "TYPE", "HOST", "INSTANCE",
                                             "WHAT"))
                        header = False
                    sys.stdout.write(line(ev) + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            return
