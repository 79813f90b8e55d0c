"""How the CLI shows things: Rich tables for people, plain JSON for programs, one error format.

Every listing has a ``--json`` twin carrying what the API answered, so scripts never parse
tables. :func:`report_error` is the only place a :class:`CorralError` becomes text and an exit
code (a test pins its shape).

Rich is imported inside the functions that draw, not here: ``--json`` output, one-line answers
and errors written to a pipe do not pay for it at start (see :mod:`corral.cli.app`); on a
terminal, Rich draws them as before. The tables take the server's JSON (or a wire model, which
is turned into it), so a table command need not build pydantic models either.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from corral.api.models import FleetStatus, HostView, InstanceView

    InstanceLike = InstanceView | Mapping[str, Any]
    HostLike = HostView | Mapping[str, Any]
    #: wire models (the tour's) or the server's JSON (the CLI's)
    Instances = Iterable[InstanceView] | Iterable[Mapping[str, Any]]
    Hosts = Iterable[HostView] | Iterable[Mapping[str, Any]]

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


def styled(stream: Any) -> bool:
    """Whether Rich would style what goes to ``stream`` (a terminal, or FORCE_COLOR): only
    then is it worth importing Rich for plain lines."""
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def say(text: str, stderr: bool = False) -> None:
    """One plain line (no markup) on stdout or stderr: drawn by Rich on a terminal, written
    as it is anywhere else."""
    stream = sys.stderr if stderr else sys.stdout
    if styled(stream):
        (err() if stderr else out()).print(text, markup=False)
        return
    stream.write(_as_rich_prints(text) + "\n")
    stream.flush()


#: what Rich leaves out of printed text (bell, backspace, vertical tab, form feed, CR)
_CONTROL = dict.fromkeys((7, 8, 11, 12, 13))


def _as_rich_prints(text: str) -> str:
    return text.translate(_CONTROL).expandtabs(8)


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
    # (label, label style, text, text style) per line
    lines: list[tuple[str, str, str, str]] = [("error: ", "bold red", exc.message, "red")]
    shortfall = exc.details.get("shortfall") if exc.details else None
    if isinstance(shortfall, dict):
        lines += [("", "", f"  {host}: {_short(lack)}", "") for host, lack in shortfall.items()]
    elif isinstance(shortfall, list):
        lines += [("", "", f"  {_short(lack)}", "") for lack in shortfall]
    if exc.hint:
        lines.append(("hint: ", "bold", exc.hint, ""))
    if console is None and not styled(sys.stderr):
        sys.stderr.write("".join(_as_rich_prints(label + text) + "\n"
                                 for label, _, text, _ in lines))
        sys.stderr.flush()
        return exc.exit_code
    from rich.text import Text

    console = console or err()
    for label, label_style, text, style in lines:
        console.print(Text(label, style=label_style) + Text(text, style=style))
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


def plain(item: Any) -> dict[str, Any]:
    """A wire model's JSON (what the server sent for it), or the JSON itself."""
    data = _plain(item)
    if not isinstance(data, dict):
        raise TypeError(f"expected an API object, got {type(item).__name__}")
    return data


def instances_table(items: Instances, title: str | None = None) -> Table:
    from rich.table import Table

    table = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "HOST", "DRIVER", "STATE", "HEALTH"):
        table.add_column(col, no_wrap=True)
    for col in ("CPUS", "CPU%core", "CPU%host", "MEM", "MEM RES"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("COMMAND", overflow="ellipsis", max_width=40)
    for i in map(plain, items):
        usage = i.get("usage") or {}
        table.add_row(
            i["name"], i.get("host") or "-", i["driver"], state_text(i["state"]),
            health_text(i.get("health")), fmt_cpus(i["cpus"]), fmt_pct(usage.get("cpu_core_pct")),
            fmt_pct(usage.get("cpu_host_pct")), fmt_bytes(usage.get("memory_bytes")),
            fmt_bytes(i["memory_bytes"]), " ".join(i["command"]),
        )
    return table


def hosts_table(hosts: Hosts) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "ADDRESS", "STATE"):
        table.add_column(col, no_wrap=True)
    for col in ("CORES", "CPU res/free", "MEM res/free", "INST", "CPU%host", "REST%"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("DRIVERS", no_wrap=True)
    for h in map(plain, hosts):
        reserved, free = h["reserved"], h["free"]
        table.add_row(
            h["name"], h["address"],
            state_text(h["state"]) + (" (draining)" if h.get("draining") else ""),
            str(h["cores"]),
            f"{fmt_cpus(reserved['cpus'])}/{fmt_cpus(free['cpus'])}",
            f"{fmt_bytes(reserved['memory_bytes'])}/{fmt_bytes(free['memory_bytes'])}",
            str(h["instances"]), fmt_pct((h.get("usage") or {}).get("cpu_host_pct")),
            fmt_pct(h.get("rest_host_pct")), ",".join(sorted(h["drivers"])),
        )
    return table


def status_lines(status: FleetStatus | Mapping[str, Any], url: str) -> list[str]:
    st = plain(status)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(st["instances"].items())) or "none"
    lines = [f"server   {url} (corral {st['version']})"]
    leader = st.get("leader") or {}
    for srv in st.get("servers") or []:  # several servers: each, and which one leads
        role = "leader" if srv.get("leader") else "follower"
        lines.append(f"  {srv.get('id', '?')}  {srv.get('api_url', '-')}  {role}, seen "
                     f"{fmt_age(srv.get('last_seen'))}")
    if leader:
        lines.append(f"leader   {leader.get('id', '-')} (generation {leader.get('generation')})")
    nodes = st.get("nats") or []
    lines.append(f"nats     {', '.join(nodes) if len(nodes) > 1 else st['nats_url']}")
    lines += [
        f"db       {st['db']}",
        f"hosts    {st['hosts_up']} up, {st['hosts_down']} down"
        + (f" (heartbeat every {st['heartbeat_seconds']:g}s, lease {st['lease_seconds']:g}s)"
           if st.get("heartbeat_seconds") else ""),
        f"instances {counts}",
    ]
    return lines


def fmt_age(ts: Any) -> str:
    """'3s ago' for a Unix time, '-' for none."""
    import time

    if not isinstance(ts, int | float):
        return "-"
    return f"{max(0.0, time.time() - float(ts)):.0f}s ago"


def _restart_text(policy: dict[str, Any], restarts: int) -> str:
    mode = policy.get("mode") or "no"
    if mode == "no":
        return "no" + (f" ({restarts} restarts)" if restarts else "")
    return (f"{mode}, {policy.get('attempts')} in {fmt_seconds(policy.get('interval'))}, "
            f"delay {fmt_seconds(policy.get('delay'))}; restarts: {restarts}")


def _check_text(check: dict[str, Any] | None) -> str:
    if not check:
        return "-"
    return (f"{check.get('target')} every {fmt_seconds(check.get('interval'))}, timeout "
            f"{fmt_seconds(check.get('timeout'))}, unhealthy after {check.get('threshold')}"
            + (f" (not counted {fmt_seconds(check.get('grace'))} after a start)"
               if check.get("grace") else "")
            + ("; fails over to its standby when still unhealthy after its restarts"
               if check.get("failover") else ""))


def health_text(health: str | None) -> Text:
    from rich.text import Text

    return Text(health or "-", style={"healthy": "green", "unhealthy": "red"}.get(
        health or "", ""))


def fmt_seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:g}s"


def instance_details(item: InstanceLike) -> Table:
    from rich.table import Table

    i = plain(item)
    usage = i.get("usage") or {}
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    exit_code = i.get("exit_code")
    rows: list[tuple[str, Any]] = [
        ("name", i["name"]), ("host", i.get("host") or "-"), ("driver", i["driver"]),
        ("state", state_text(i["state"])), ("desired", i["desired_state"]),
        ("command", " ".join(i["command"])), ("rootfs", i.get("rootfs") or "-"),
        ("image", i.get("image") or "-"), ("vip", i.get("vip") or "-"),
        ("cpus", fmt_cpus(i["cpus"])), ("memory", fmt_bytes(i["memory_bytes"])),
        ("pid", str(i["pid"]) if i.get("pid") else "-"),
        ("exit code", "-" if exit_code is None else str(exit_code)),
        ("epoch", str(i.get("epoch", 0))),
        ("restart", _restart_text(i.get("restart") or {}, i.get("restarts") or 0)),
        ("check", _check_text(i.get("check"))), ("health", health_text(i.get("health"))),
        ("cpu", f"{fmt_pct(usage.get('cpu_core_pct'))}% of a core, "
                f"{fmt_pct(usage.get('cpu_host_pct'))}% of its host"),
        ("mem used", fmt_bytes(usage.get("memory_bytes"))),
        ("next", ", ".join(i.get("allowed") or []) or "-"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
