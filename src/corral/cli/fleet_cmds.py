"""Fleet commands: the two long-running processes (server, agent), up/down, status, host ls.

``server`` and ``agent`` import their process packages lazily, inside the command, so every other
command stays a thin client of the API (the CLI never depends on control/ or agent/ otherwise);
``up``/``down`` import the local-fleet rig and settings the same way, so ``corral status`` and
``corral host ls`` start as fast as ``corral ls``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.cli import render
from corral.cli.app import client
from corral.errors import ConfigError, CorralError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

    from corral import config
    from corral.rig.context import FleetContext


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


def server(data: Path | None, api_host: str | None, api_port: int | None, nats: str | None,
           nats_host: str | None, nats_port: int | None, nats_cluster_port: int | None,
           nats_routes: str | None, server_name: str | None, db: str | None, tls: str | None,
           token: str | None, log_level: str | None, set_: list[str] | None,
           cfg: Path | None) -> None:
    """The control plane, imported only now: no other command loads the server's packages."""
    settings = _settings(
        {"data_dir": data, "api_host": api_host, "api_port": api_port, "nats_url": nats,
         "nats_host": nats_host, "nats_port": nats_port, "nats_cluster_port": nats_cluster_port,
         "nats_routes": nats_routes, "server_name": server_name, "db_url": db, "tls": tls,
         "token": token, "log_level": log_level},
        set_, cfg,
    )
    _process_module("corral.control.server").serve(settings)


def agent(name: str | None, nats: str | None, join_token: str | None, server_url: str | None,
          ca_file: str | None, token: str | None, data: Path | None, address: str | None,
          drivers: str | None, log_level: str | None, set_: list[str] | None,
          cfg: Path | None) -> None:
    """One host's agent, imported only now (see :func:`server`)."""
    settings = _settings(
        {"host_name": name, "nats_url": nats, "join_token": join_token,
         "server_url": server_url, "ca_file": ca_file, "token": token, "data_dir": data,
         "host_address": address, "drivers": drivers, "log_level": log_level},
        set_, cfg,
    )
    _process_module("corral.agent.main", "corral.agent.daemon").serve(settings)


def _say(console: Console, spinner: Status) -> Callable[[str], None]:
    """Progress goes to the spinner; warnings are printed so they stay on screen."""

    def say(msg: str) -> None:
        if msg.startswith("warning"):
            console.print(f"[yellow]{msg}[/yellow]", highlight=False)
        else:
            spinner.update(msg)

    return say


def up(hosts: int, use_netns: bool, data: Path | None, timeout: float, tour: bool,
       disk_backend: str, disk_root: Path | None, servers: int, postgres: bool) -> None:
    """Progress shows on a spinner; the fleet's hosts are listed once it is up."""
    from corral.rig import fleet

    console = render.out()
    opts = fleet.UpOptions(hosts=hosts, use_netns=use_netns, data_dir=data, timeout=timeout,
                           disk_backend=disk_backend, disk_root=disk_root, servers=servers,
                           postgres=postgres)
    if tour and not os.environ.get("CORRAL_FAILOVER"):  # the tour's failover in seconds
        opts.failover = "fast"
    with console.status("starting the fleet") as spinner:
        ctx = fleet.up(opts, say=_say(console, spinner))
    console.print(f"[green]fleet up[/green]: {ctx.url} with {len(ctx.agents)} hosts "
                  f"(data {ctx.data_dir})")
    console.print(f"dashboard: {ctx.url.split(',')[0]}/?token={ctx.token}", soft_wrap=True,
                  highlight=False, markup=False)
    with client() as c:
        console.print(render.hosts_table(c.hosts()))
    if tour:
        from corral.rig.tour import run_tour

        run_tour(console)
    else:
        console.print("next: [bold]corral run demo -- sleep 600[/bold], [bold]corral ls[/bold], "
                      "[bold]corral top[/bold]; [bold]corral down[/bold] when done")


def rig_kill_host(name: str) -> None:
    """Only for a fleet this machine's ``corral up`` started: its processes are known here."""
    from corral.rig.hostkill import kill_host

    console = render.out()
    killed = kill_host(_local_fleet(), name, say=lambda m: console.print(m, highlight=False))
    console.print(f"{name} is dead: agent, {len(killed.keepers)} fence keeper(s) and "
                  f"{len(killed.workloads)} workload(s) killed; the server marks it down when "
                  f"its lease runs out and fails over what has a standby.\n"
                  f"bring it back: [bold]corral rig revive-host {name}[/bold]")


def rig_revive_host(name: str, timeout: float) -> None:
    from corral.rig.hostkill import revive_host

    new = revive_host(_local_fleet(), name, timeout=timeout)
    render.say(f"{name}: agent started again (pid {new.pid}) and joined")


def _local_fleet() -> FleetContext:
    from corral.rig.context import context_path, load_context

    ctx = load_context()
    if ctx is None:
        raise CorralError(f"no local fleet (no context file at {context_path()})",
                          hint="'corral rig' acts on the fleet 'corral up' started on this "
                               "machine; set CORRAL_CONTEXT if yours wrote it elsewhere")
    return ctx


def down(timeout: float) -> None:
    """The fleet's processes and network are those the context file records."""
    from corral.rig import fleet

    console = render.out()
    with console.status("stopping the fleet") as spinner:
        ctx = fleet.down(say=_say(console, spinner), instance_timeout=timeout)
    console.print(f"[green]fleet down[/green] (data kept in {ctx.data_dir})")


def status(json_out: bool) -> None:
    from corral.rig.context import resolve

    url, _ = resolve()
    with client() as c:
        st = c.status_data()
        hosts = c.hosts_data()
    if json_out:
        render.print_json({"url": url, "status": st, "hosts": hosts})
        return
    console = render.out()
    for line in render.status_lines(st, url):
        console.print(line, highlight=False)
    console.print(render.hosts_table(hosts))


def host_add(name: str, json_out: bool) -> None:
    with client() as c:
        grant = c.host_add(name)
    if json_out:
        render.print_json(grant)
        return
    import time as _time

    left = max(0, int(float(grant["expires_at"]) - _time.time()))
    render.say(f"join token for {name} (shown once, good for {left // 60} min):")
    render.out().print(str(grant["token"]), highlight=False)
    render.say(f"on {name}: corral agent --name {name} --join TOKEN --server SERVER_API_URL "
               "[--ca-file CA]")


def host_rm(name: str) -> None:
    with client() as c:
        c.host_rm(name)
    render.say(f"host {name} removed: its key no longer opens the bus")


def host_ls(json_out: bool) -> None:
    with client() as c:
        hosts = sorted(c.hosts_data(), key=lambda h: str(h["name"]))
    if json_out:
        render.print_json(hosts)
    else:
        render.out().print(render.hosts_table(hosts))
