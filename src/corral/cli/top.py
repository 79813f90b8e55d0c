"""``corral top``: a live view of what each instance costs its host, refreshed every second."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from corral.cli import render
from corral.cli.app import client

if TYPE_CHECKING:
    from rich.console import Group

    from corral.api.client import Client
    from corral.cli.render import HostLike, InstanceLike

Row = dict[str, Any]


class SortKey(StrEnum):
    cpu = "cpu"
    mem = "mem"
    name = "name"


def sort_instances(items: Iterable[InstanceLike], key: SortKey) -> list[Row]:
    """Busiest first for cpu/mem (unknown figures last), alphabetical for name."""
    rows = [render.plain(i) for i in items]
    if key is SortKey.name:
        return sorted(rows, key=lambda i: str(i["name"]))
    if key is SortKey.mem:
        return sorted(rows, key=lambda i: (-(_usage(i, "memory_bytes") or -1), i["name"]))
    return sorted(rows, key=lambda i: (-(_usage(i, "cpu_core_pct") or -1.0), i["name"]))


def _usage(item: Row, key: str) -> Any:
    return (item.get("usage") or {}).get(key)


def host_summary(host: HostLike) -> str:
    h = render.plain(host)
    used = _usage(h, "cpu_host_pct")
    rest = h.get("rest_host_pct")
    idle = None if used is None or rest is None else max(0.0, 100.0 - used - rest)
    return (f"{h['name']} ({h['state']}, {h['cores']} cores): instances "
            f"{render.fmt_pct(used)}%  rest {render.fmt_pct(rest)}%  "
            f"idle {render.fmt_pct(idle)}%  {h['instances']} inst")


def frame(hosts: Sequence[HostLike], items: Sequence[InstanceLike], key: SortKey) -> Group:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    for col in ("NAME", "HOST", "STATE"):
        table.add_column(col, no_wrap=True)
    for col in ("CPU%(core)", "CPU%(host)", "MEM"):
        table.add_column(col, justify="right", no_wrap=True)
    for i in sort_instances(items, key):
        table.add_row(i["name"], i.get("host") or "-", render.state_text(i["state"]),
                      render.fmt_pct(_usage(i, "cpu_core_pct")),
                      render.fmt_pct(_usage(i, "cpu_host_pct")),
                      render.fmt_bytes(_usage(i, "memory_bytes")))
    header = Text(time.strftime("%H:%M:%S") + f"  sorted by {key.value}", style="dim")
    rows = sorted((render.plain(h) for h in hosts), key=lambda h: str(h["name"]))
    lines = [Text(host_summary(h)) for h in rows]
    return Group(header, *lines, Text(""), table)


def snapshot(c: Client) -> tuple[list[Row], list[Row]]:
    return c.hosts_data(), c.instances_data()


def to_json(hosts: Sequence[HostLike], items: Sequence[InstanceLike], key: SortKey
            ) -> dict[str, Any]:
    return {"hosts": [render.plain(h) for h in hosts], "instances": sort_instances(items, key)}


def top(sort: str, once: bool, interval: float, json_out: bool) -> None:
    """One frame is drawn in place per refresh (Rich's live view), not appended."""
    key = SortKey(sort)
    with client(timeout=10) as c:
        if once or json_out:
            hosts, items = snapshot(c)
            if json_out:
                render.print_json(to_json(hosts, items, key))
            else:
                render.out().print(frame(hosts, items, key))
            return
        from rich.live import Live

        console = render.out()
        with Live(frame(*snapshot(c), key), console=console, auto_refresh=False,
                  screen=False) as live:
            try:
                while True:
                    time.sleep(max(0.2, interval))
                    live.update(frame(*snapshot(c), key), refresh=True)
            except KeyboardInterrupt:
                return
