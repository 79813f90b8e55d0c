"""``corral metrics NAME``: an instance's (or a host's) CPU and memory over time, from the
server's metric history: one line of blocks per figure over the whole range, so a trend shows
at a glance in a terminal, then the latest points as a table."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from corral.cli import render
from corral.cli.app import client, terminal_columns
from corral.errors import InvalidRequest

if TYPE_CHECKING:
    from corral.api.models import MetricSeries

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], width: int, top: float | None = None) -> str:
    """``values`` as at most ``width`` blocks, each the average of its share of the values,
    scaled from 0 to ``top`` (default: their largest); a share without a value is a space."""
    if not values or width <= 0:
        return ""
    known = [v for v in values if v is not None]
    top = top if top is not None else max(known, default=0.0)
    cols = min(width, len(values))
    out = []
    for c in range(cols):
        share = [v for v in values[c * len(values) // cols:(c + 1) * len(values) // cols]
                 if v is not None]
        if not share:
            out.append(" ")
            continue
        level = 0.0 if top <= 0 else max(0.0, min(1.0, (sum(share) / len(share)) / top))
        out.append(BLOCKS[min(len(BLOCKS) - 1, int(level * len(BLOCKS)))])
    return "".join(out)


def _step(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def _summary(values: Sequence[float | None]) -> tuple[float | None, float | None,
                                                       float | None]:
    """The largest, the average and the last of the known values."""
    known = [v for v in values if v is not None]
    if not known:
        return None, None, None
    return max(known), sum(known) / len(known), known[-1]


def lines(series: MetricSeries, width: int) -> list[str]:
    """The header and the sparklines of ``series`` (plain text)."""
    pts = series.points
    span = max(0.0, series.until - series.since)
    head = (f"{series.kind} {series.instance}: {len(pts)} points of {_step(series.step_seconds)}"
            f" over the last {_step(max(1, round(span)))}" if pts else
            f"{series.kind} {series.instance}: no points in this range (the server writes "
            "its history every few seconds; try a longer --since)")
    out = [head]
    if not pts:
        return out
    rows: list[tuple[str, list[float | None], bool]] = [
        ("CPU % core", [p.cpu_core_pct for p in pts], False),
        ("CPU % host", [p.cpu_host_pct for p in pts], False),
        ("memory", [None if p.memory_bytes is None else float(p.memory_bytes) for p in pts],
         True),
    ]
    if any(p.host_busy_pct is not None for p in pts):
        rows.append(("host busy %", [p.host_busy_pct for p in pts], False))
    for label, values, is_bytes in rows:
        top, avg, last = _summary(values)
        if is_bytes:
            figures = (f"max {render.fmt_bytes(None if top is None else int(top))}  "
                       f"last {render.fmt_bytes(None if last is None else int(last))}")
        else:
            figures = (f"max {render.fmt_pct(top)}  avg {render.fmt_pct(avg)}  "
                       f"last {render.fmt_pct(last)}")
        # shares of the host are drawn against the whole host; the rest against their peak
        top_scale = 100.0 if label in ("CPU % host", "host busy %") else None
        out.append(f"{label:<12} {sparkline(values, width, top_scale)}  {figures}")
    return out


def metrics(name: str, since: str, until: str | None, host: bool, rows: int,
            json_out: bool) -> None:
    """``--json`` prints the series as the server sent it."""
    from corral.api.names import check
    from corral.api.timespec import parse_since

    kind = "host" if host else "instance"
    try:
        check(kind, name)
    except ValueError as exc:
        raise InvalidRequest(str(exc), hint=f"give the {kind}'s name as 'corral "
                             f"{'host ' if host else ''}ls' shows it") from None
    for given in (since, until):
        if given is not None:
            parse_since(given)  # a bad value is refused here, before any request
    with client(timeout=30) as c:
        raw = c.metrics_data(name, since, until, host=host)
    if json_out:
        render.print_json(raw)
        return
    from rich.table import Table

    from corral.api.models import MetricSeries

    series = MetricSeries.model_validate(raw)
    width = max(10, min(72, terminal_columns() - 40))
    console = render.out()
    for line in lines(series, width):
        console.print(line, markup=False, highlight=False)
    if rows <= 0 or not series.points:
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("TIME", "CPU%CORE", "CPU%HOST", "MEMORY"):
        table.add_column(col, justify="left" if col == "TIME" else "right")
    busy = any(p.host_busy_pct is not None for p in series.points)
    if busy:
        table.add_column("HOST BUSY%", justify="right")
    day = series.until - series.since > 86400
    for p in series.points[-rows:]:
        when = time.strftime("%m-%d %H:%M" if day else "%H:%M:%S", time.localtime(p.t))
        cells = [when, render.fmt_pct(p.cpu_core_pct), render.fmt_pct(p.cpu_host_pct),
                 render.fmt_bytes(p.memory_bytes)]
        if busy:
            cells.append(render.fmt_pct(p.host_busy_pct))
        table.add_row(*cells)
    console.print()
    console.print(table)
