"""Fleet commands: the two long-running processes (server, agent), up/down, status, host ls.

``server`` and ``agent`` import their process packages lazily, inside the command, so every other
command stays a thin client of the API (the CLI never depends on control/ or agent/ otherwise);
``up``/``down`` import the local-fleet rig and settings the same way, so ``corral status`` and
``corral host ls`` start as fast as ``corral ls``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from corral.cli import render
from corral.cli.app import JSON_HELP, client
from corral.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

    from corral import config

commands = typer.Typer()
host_app = typer.Typer(help="Hosts of the fleet.", no_args_is_help=True)
commands.add_typer(host_app, name="host")

JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="any setting as key=value (see docs/configuration.md)"),
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file")]


def _settings(flags: dict[str, Any], extra: list[str] | None, cfg: Path | None
              ) -> config.Settings:
    import logging

    from corral import config

    for item in extra or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"bad --set {item!r}: expected key=value",
                              hint="e.g. --set heartbeat_seconds=1")
        flags[key.strip().replace("-", "_")] = value
    settings = config.load(flags, config_file=cfg)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # one line per HTTP request (image chunks) drowns the log; corral logs what matters itself
    if settings.log_level.lower() != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)
    return settings


def _process_module(*names: str) -> Any:
    """Import a process package's entry module lazily (first of ``names`` that exists)."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name or name == names[-1]:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


@commands.command()
def server(
    data: Annotated[Path | None, typer.Option("--data", help="data directory")] = None,
    api_host: Annotated[str | None, typer.Option(help="address of the HTTP API")] = None,
    api_port: Annotated[int | None, typer.Option(help="port of the HTTP API; 0 = free")] = None,
    nats: Annotated[str | None, typer.Option("--nats", help="external NATS URL")] = None,
    nats_host: Annotated[str | None, typer.Option(help="embedded NATS address")] = None,
    nats_port: Annotated[int | None, typer.Option(help="embedded NATS port; 0 = free")] = None,
    db: Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL")] = None,
    token: Annotated[str | None, typer.Option(help="fleet token (or CORRAL_TOKEN)")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error")] = None,
    set_: SetOpt = None,
    cfg: ConfigOpt = None,
) -> None:
    """Run the control plane (HTTP API, scheduler, embedded NATS unless --nats)."""
    settings = _settings(
        {"data_dir": data, "api_host": api_host, "api_port": api_port, "nats_url": nats,
         "nats_host": nats_host, "nats_port": nats_port, "db_url": db, "token": token,
         "log_level": log_level},
        set_, cfg,
    )
    _process_module("corral.control.server").serve(settings)


@commands.command()
def agent(
    name: Annotated[str | None, typer.Option("--name", help="host name")] = None,
    nats: Annotated[str | None, typer.Option("--nats", help="NATS URL of the fleet")] = None,
    token: Annotated[str | None, typer.Option(help="fleet token (or CORRAL_TOKEN)")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="data directory")] = None,
    address: Annotated[str | None, typer.Option(help="address other hosts reach")] = None,
    drivers: Annotated[str | None, typer.Option(help="comma-separated drivers")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error")] = None,
    set_: SetOpt = None,
    cfg: ConfigOpt = None,
) -> None:
    """Run one host's agent: joins the fleet over NATS and runs its instances."""
    settings = _settings(
        {"host_name": name, "nats_url": nats, "token": token, "data_dir": data,
         "host_address": address, "drivers": drivers, "log_level": log_level},
        set_, cfg,
    )
    _process_module("corral.agent.main", "corral.agent.service").serve(settings)


def _say(console: Console, spinner: Status) -> Callable[[str], None]:
    """Progress goes to the spinner; warnings are printed so they stay on screen."""

    def say(msg: str) -> None:
        if msg.startswith("warning"):
            console.print(f"[yellow]{msg}[/yellow]", highlight=False)
        else:
            spinner.update(msg)

    return say


@commands.command()
def up(
    hosts: Annotated[int, typer.Option(help="number of hosts (agents)")] = 3,
    use_netns: Annotated[bool, typer.Option(
        "--netns", help="root: each host in its own network namespace, with runc")] = False,
    data: Annotated[Path | None, typer.Option(
        "--data", help="fleet directory (default ~/.local/share/corral/fleet; as root "
        "/var/lib/corral/fleet)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each step")] = 60.0,
    tour: Annotated[bool, typer.Option("--tour", help="then show a short guided tour")] = False,
    disk_backend: Annotated[str, typer.Option(
        "--disk-backend", help="instance disks: dir (rsync) or btrfs (send/receive)")] = "dir",
    disk_root: Annotated[Path | None, typer.Option(
        "--disk-root", help="host i keeps disks in DIR/host<i> (btrfs: on a btrfs "
        "filesystem)")] = None,
) -> None:
    """Start a whole fleet on this machine: server, NATS and N agents."""
    from corral.rig import fleet

    console = render.out()
    opts = fleet.UpOptions(hosts=hosts, use_netns=use_netns, data_dir=data, timeout=timeout,
                           disk_backend=disk_backend, disk_root=disk_root)
    with console.status("starting the fleet") as spinner:
        ctx = fleet.up(opts, say=_say(console, spinner))
    console.print(f"[green]fleet up[/green]: {ctx.url} with {len(ctx.agents)} hosts "
                  f"(data {ctx.data_dir})")
    with client() as c:
        console.print(render.hosts_table(c.hosts()))
    if tour:
        from corral.rig.tour import run_tour

        run_tour(console)
    else:
        console.print("next: [bold]corral run demo -- sleep 600[/bold], [bold]corral ls[/bold], "
                      "[bold]corral top[/bold]; [bold]corral down[/bold] when done")


@commands.command()
def down(
    timeout: Annotated[float, typer.Option(help="grace seconds for each instance")] = 10.0,
) -> None:
    """Stop every instance, then the agents and the server; remove the fleet's network."""
    from corral.rig import fleet

    console = render.out()
    with console.status("stopping the fleet") as spinner:
        ctx = fleet.down(say=_say(console, spinner), instance_timeout=timeout)
    console.print(f"[green]fleet down[/green] (data kept in {ctx.data_dir})")


@commands.command()
def status(json_out: JsonOpt = False) -> None:
    """The fleet at a glance: server, bus, database, hosts, instance counts."""
    from corral.rig.context import resolve

    url, _ = resolve()
    with client() as c:
        st = c.status()
        hosts = c.hosts()
    if json_out:
        render.print_json({"url": url, "status": st, "hosts": hosts})
        return
    console = render.out()
    for line in render.status_lines(st, url):
        console.print(line, highlight=False)
    console.print(render.hosts_table(hosts))


@host_app.command("ls")
def host_ls(json_out: JsonOpt = False) -> None:
    """Hosts with their capacity, reservations and CPU use."""
    with client() as c:
        hosts = sorted(c.hosts(), key=lambda h: h.name)
    if json_out:
        render.print_json(hosts)
    else:
        render.out().print(render.hosts_table(hosts))
