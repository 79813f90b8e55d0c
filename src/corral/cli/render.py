"""How the CLI shows things: Rich tables for people, plain JSON for programs, one error format.

Every listing has a ``--json`` twin built from the same API models, so scripts never parse
tables. :func:`report_error` is the only place a :class:`CorralError` becomes text and an exit
code (a test pins its shape).

Rich is imported inside the functions that draw, not here: ``--json`` output and commands that
print nothing should not pay for it at start (see :mod:`corral.cli.app`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from corral.api.models import FleetStatus, HostView, InstanceView

STATE_STYLE = {
    "running": "green",
    "frozen": "cyan",
    "stopped": "yellow",
    "exited": "yellow",
    "failed": "red",
    "lost": "red",
    "pending": "magenta",
    "created": "blue",
    "shelved": "bright_black",
    "up": "green",
    "down": "red",
}


def out() -> Console:
    """Standard output; piped or captured, tables get room instead of Rich's 80-column default
    (a log or a pager should see whole names, not 'hos…')."""
    from rich.console import Console

    width = None if sys.stdout.isatty() else 160
    return Console(soft_wrap=False, width=width)


def err() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Plain JSON on stdout (no colour, no wrapping), from models or plain data."""
    sys.stdout.write(json.dumps(_plain(data), indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def _plain(data: Any) -> Any:
    # a model can exist only if pydantic was imported, so plain data never imports it
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(data, pydantic.BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_plain(v) for v in data]
    return data


def report_error(exc: CorralError, console: Console | None = None) -> int:
    """``error: message`` and ``hint: ...`` on stderr (red on a terminal); returns the exit code."""
    from rich.text import Text

    console = console or err()
    console.print(Text("error: ", style="bold red") + Text(exc.message, style="red"))
    shortfall = exc.details.get("shortfall") if exc.details else None
    if isinstance(shortfall, dict):
        for host, lack in shortfall.items():
            console.print(Text(f"  {host}: {_short(lack)}"))
    elif isinstance(shortfall, list):
        for lack in shortfall:
            console.print(Text(f"  {_short(lack)}"))
    if exc.hint:
        console.print(Text("hint: ", style="bold") + Text(exc.hint))
    return exc.exit_code


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(size) < 1024 or unit == "T":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"  # pragma: no cover - the loop always returns


def fmt_pct(p: float | None) -> str:
    return "-" if p is None else f"{p:.1f}"


def fmt_cpus(c: float) -> str:
    return f"{c:g}"


def state_text(state: str) -> Text:
    from rich.text import Text

    return Text(state, style=STATE_STYLE.get(state, ""))


def instances_table(items: Sequence[InstanceView], title: str | None = None) -> Table:
    from rich.table import Table

    table = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "HOST", "DRIVER", "STATE"):
        table.add_column(col, no_wrap=True)
    for col in ("CPUS", "CPU%core", "CPU%host", "MEM", "MEM RES"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("COMMAND", overflow="ellipsis", max_width=40)
    for i in items:
        table.add_row(
            i.name, i.host or "-", i.driver, state_text(i.state), fmt_cpus(i.cpus),
            fmt_pct(i.usage.cpu_core_pct), fmt_pct(i.usage.cpu_host_pct),
            fmt_bytes(i.usage.memory_bytes), fmt_bytes(i.memory_bytes), " ".join(i.command),
        )
    return table


def hosts_table(hosts: Iterable[HostView]) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "ADDRESS", "STATE"):
        table.add_column(col, no_wrap=True)
    for col in ("CORES", "CPU res/free", "MEM res/free", "INST", "CPU%host", "REST%"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("DRIVERS", no_wrap=True)
    for h in hosts:
        table.add_row(
            h.name, h.address, state_text(h.state), str(h.cores),
            f"{fmt_cpus(h.reserved.cpus)}/{fmt_cpus(h.free.cpus)}",
            f"{fmt_bytes(h.reserved.memory_bytes)}/{fmt_bytes(h.free.memory_bytes)}",
            str(h.instances), fmt_pct(h.usage.cpu_host_pct), fmt_pct(h.rest_host_pct),
            ",".join(sorted(h.drivers)),
        )
    return table


def status_lines(status: FleetStatus, url: str) -> list[str]:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(status.instances.items())) or "none"
    return [
        f"server   {url} (corral {status.version})",
        f"nats     {status.nats_url}",
        f"db       {status.db}",
        f"hosts    {status.hosts_up} up, {status.hosts_down} down",
        f"instances {counts}",
    ]


def instance_details(i: InstanceView) -> Table:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows: list[tuple[str, Any]] = [
        ("name", i.name), ("host", i.host or "-"), ("driver", i.driver),
        ("state", state_text(i.state)), ("desired", i.desired_state),
        ("command", " ".join(i.command)), ("rootfs", i.rootfs or "-"),
        ("image", i.image or "-"), ("vip", i.vip or "-"),
        ("cpus", fmt_cpus(i.cpus)), ("memory", fmt_bytes(i.memory_bytes)),
        ("pid", str(i.pid) if i.pid else "-"),
        ("exit code", "-" if i.exit_code is None else str(i.exit_code)),
        ("epoch", str(i.epoch)),
        ("cpu", f"{fmt_pct(i.usage.cpu_core_pct)}% of a core, "
                f"{fmt_pct(i.usage.cpu_host_pct)}% of its host"),
        ("mem used", fmt_bytes(i.usage.memory_bytes)),
        ("next", ", ".join(i.allowed) or "-"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
