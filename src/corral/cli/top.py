"""``corral top``: a live view of what each instance costs its host, refreshed every second."""

from __future__ import annotations

import time
from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from corral.cli import render
from corral.cli.app import JSON_HELP, client

if TYPE_CHECKING:
    from rich.console import Group

    from corral.api.client import Client
    from corral.api.models import HostView, InstanceView

commands = typer.Typer()


class SortKey(StrEnum):
    cpu = "cpu"
    mem = "mem"
    name = "name"


def sort_instances(items: Sequence[InstanceView], key: SortKey) -> list[InstanceView]:
    """Busiest first for cpu/mem (unknown figures last), alphabetical for name."""
    if key is SortKey.name:
        return sorted(items, key=lambda i: i.name)
    if key is SortKey.mem:
        return sorted(items, key=lambda i: (-(i.usage.memory_bytes or -1), i.name))
    return sorted(items, key=lambda i: (-(i.usage.cpu_core_pct or -1.0), i.name))


def host_summary(h: HostView) -> str:
    used = h.usage.cpu_host_pct
    rest = h.rest_host_pct
    idle = None if used is None or rest is None else max(0.0, 100.0 - used - rest)
    return (f"{h.name} ({h.state}, {h.cores} cores): instances {render.fmt_pct(used)}%  "
            f"rest {render.fmt_pct(rest)}%  idle {render.fmt_pct(idle)}%  "
            f"{h.instances} inst")


def frame(hosts: Sequence[HostView], items: Sequence[InstanceView], key: SortKey) -> Group:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    for col in ("NAME", "HOST", "STATE"):
        table.add_column(col, no_wrap=True)
    for col in ("CPU%(core)", "CPU%(host)", "MEM"):
        table.add_column(col, justify="right", no_wrap=True)
    for i in sort_instances(items, key):
        table.add_row(i.name, i.host or "-", render.state_text(i.state),
                      render.fmt_pct(i.usage.cpu_core_pct), render.fmt_pct(i.usage.cpu_host_pct),
                      render.fmt_bytes(i.usage.memory_bytes))
    header = Text(time.strftime("%H:%M:%S") + f"  sorted by {key.value}", style="dim")
    lines = [Text(host_summary(h)) for h in sorted(hosts, key=lambda h: h.name)]
    return Group(header, *lines, Text(""), table)


def snapshot(c: Client) -> tuple[list[HostView], list[InstanceView]]:
    return c.hosts(), c.instances()


def to_json(hosts: Sequence[HostView], items: Sequence[InstanceView], key: SortKey
            ) -> dict[str, Any]:
    return {"hosts": list(hosts), "instances": sort_instances(items, key)}


@commands.command()
def top(
    sort: Annotated[SortKey, typer.Option(help="cpu, mem or name")] = SortKey.cpu,
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 1.0,
    json_out: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Live CPU and memory of every instance, with each host's sum and rest (Ctrl-C quits)."""
    with client(timeout=10) as c:
        if once or json_out:
            hosts, items = snapshot(c)
            if json_out:
                render.print_json(to_json(hosts, items, sort))
            else:
                render.out().print(frame(hosts, items, sort))
            return
        from rich.live import Live

        console = render.out()
        with Live(frame(*snapshot(c), sort), console=console, auto_refresh=False,
                  screen=False) as live:
            try:
                while True:
                    time.sleep(max(0.2, interval))
                    live.update(frame(*snapshot(c), sort), refresh=True)
            except KeyboardInterrupt:
                return
