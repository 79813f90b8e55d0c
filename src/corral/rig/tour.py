"""``corral up --tour``: a short guided walk through a freshly started fleet.

It uses only the public API client (what a user's own scripts would use) and the process driver,
so it works without root. Steps a driver cannot do here (freezing without a cgroup freezer, for
instance) are shown with corral's own error and the tour goes on: the tour never fails on them.
"""

from __future__ import annotations

import contextlib
import shlex
import time

from rich.console import Console
from rich.rule import Rule

from corral.api.client import Client
from corral.api.models import CreateInstance, InstanceView
from corral.cli import render
from corral.errors import CorralError, NotFound, NotSupported
from corral.rig.context import ca_file, resolve

BURNER = "tour-burner"
IDLER = "tour-idle"
BURN_CMD = ["sh", "-c", "while :; do :; done"]
IDLE_CMD = ["sleep", "3600"]


def _step(console: Console, title: str, cmd: str) -> None:
    console.print(Rule(title, style="cyan"))
    console.print(f"[dim]$[/dim] [bold]{cmd}[/bold]")


def _wait_usage(c: Client, name: str, timeout: float = 15.0) -> InstanceView:
    """Wait (bounded) until the burner has a CPU figure: two samples are needed for a rate."""
    deadline = time.monotonic() + timeout
    view = c.instance(name)
    while time.monotonic() < deadline:
        view = c.instance(name)
        if view.usage.cpu_core_pct is not None and view.usage.cpu_core_pct > 10:
            return view
        time.sleep(0.5)
    return view


def _cleanup(c: Client) -> None:
    for name in (BURNER, IDLER):
        with contextlib.suppress(NotFound):
            c.delete(name, force=True)


def run_tour(console: Console, client: Client | None = None) -> None:
    """Print the tour; raises only if the fleet itself is broken."""
    if client is None:
        url, token = resolve()
        client = Client(url, token, ca_file=ca_file())
    with client as c:
        _cleanup(c)  # a previous tour interrupted halfway
        try:
            _tour(console, c)
        finally:
            _cleanup(c)
    console.print(Rule("your turn", style="green"))
    console.print("  [bold]corral top[/bold]    live CPU of every instance (q: Ctrl-C)\n"
                  "  [bold]corral run NAME -- CMD[/bold]   start your own workload\n"
                  "  [bold]corral down[/bold]   stop every instance and the fleet")


def _tour(console: Console, c: Client) -> None:
    _step(console, "1. run two instances", f"corral run {BURNER} --cpus 1 -- "
          f"{shlex.join(BURN_CMD)}; corral run {IDLER} -- {shlex.join(IDLE_CMD)}")
    for name, cmd, cpus in ((BURNER, BURN_CMD, 1.0), (IDLER, IDLE_CMD, 0.1)):
        view = c.create(CreateInstance(name=name, command=cmd, cpus=cpus))
        console.print(f"{view.name}: {view.state} on {view.host}")

    _step(console, "2. what they cost: % of one core and % of the whole host", "corral ls")
    console.print("[dim]sampling for a few seconds...[/dim]")
    burner = _wait_usage(c, BURNER)
    time.sleep(2)
    items = [i for i in c.instances() if i.name in (BURNER, IDLER)]
    console.print(render.instances_table(sorted(items, key=lambda i: i.name)))
    host_pct = render.fmt_pct(burner.usage.cpu_host_pct)
    console.print(f"the burner uses about a whole core: that is {host_pct}% of its host")

    _step(console, "3. a step the lifecycle forbids", f"corral thaw {IDLER}")
    try:
        c.action(IDLER, "thaw")
        console.print("[yellow]unexpected: thaw of a running instance was accepted[/yellow]")
    except CorralError as exc:
        render.report_error(exc, console)

    _step(console, "4. freeze and thaw", f"corral freeze {BURNER}; corral thaw {BURNER}")
    try:
        console.print(f"{BURNER}: {c.action(BURNER, 'freeze').state}")
        time.sleep(1)
        console.print(f"{BURNER}: {c.action(BURNER, 'thaw').state}")
    except NotSupported as exc:
        render.report_error(exc, console)
        console.print("[dim](this host cannot freeze; runc containers can: corral up --netns)"
                      "[/dim]")

    _step(console, "5. stop and start", f"corral stop {IDLER}; corral start {IDLER}")
    console.print(f"{IDLER}: {c.action(IDLER, 'stop', timeout=5).state}")
    console.print(f"{IDLER}: {c.action(IDLER, 'start').state}")

    _step(console, "6. remove", f"corral stop {BURNER} {IDLER}; corral rm {BURNER} {IDLER}")
    for name in (BURNER, IDLER):
        c.action(name, "stop", timeout=5)
        c.delete(name)
        console.print(f"{name}: deleted")
