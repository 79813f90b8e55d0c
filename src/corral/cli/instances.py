"""Instance commands: run, ls, show and the lifecycle verbs.

They only shape requests and print replies; the server decides what is allowed (from
:mod:`corral.lifecycle`) and its refusals reach the operator through the error formatter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from corral.cli import render
from corral.cli.app import JSON_HELP, client
from corral.cli.parse import parse_cpus, parse_env, parse_memory, parse_signal, parse_tail
from corral.errors import InvalidRequest

commands = typer.Typer()
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
Names = Annotated[list[str], typer.Argument(help="instance name(s)")]


@commands.command()
def run(
    name: Annotated[str, typer.Argument(help="instance name: lowercase letters, digits, dashes")],
    command: Annotated[list[str], typer.Argument(help="the workload's argv, after --")],
    cpus: Annotated[float, typer.Option(help="CPU reservation, in cores")] = 0.1,
    memory: Annotated[str, typer.Option(help="memory reservation: 64M, 1G, 512Ki...")] = "64M",
    host: Annotated[str | None, typer.Option(help="pin to this host")] = None,
    driver: Annotated[
        str | None,
        typer.Option(help="process or runc (default: runc with --from or --image, else process)"),
    ] = None,
    rootfs: Annotated[
        Path | None, typer.Option("--from", help="root filesystem directory (on the host)")
    ] = None,
    image: Annotated[str | None, typer.Option(
        "--image", help="image to run from (see 'corral image ls'); not with --from")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE, repeatable")
                   ] = None,
    no_start: Annotated[bool, typer.Option("--no-start", help="create without starting")] = False,
    tail: Annotated[list[str] | None, typer.Option(
        "--tail", help="capture a file too: SOURCE=PATH (inside the rootfs), repeatable")] = None,
    vip: Annotated[str | None, typer.Option(
        "--vip", help="virtual IP ADDR/PREFIX held while it runs; moves with failover")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create an instance and start it: corral run NAME OPTIONS -- CMD ARGS..."""
    if not command:
        raise InvalidRequest("no command given", hint="put the workload after --, e.g. "
                             "corral run web -- python3 -m http.server")
    from corral.api.models import CreateInstance

    spec = CreateInstance(
        name=name,
        command=command,
        cpus=parse_cpus(cpus),
        memory_bytes=parse_memory(memory),
        driver=driver or ("runc" if rootfs or image else "process"),
        host=host,
        rootfs=str(rootfs.expanduser().resolve()) if rootfs else None,
        image=image,
        env=parse_env(env or []),
        tail=parse_tail(tail or []),
        start=not no_start,
        vip=vip,
    )
    with client() as c:
        view = c.create(spec)
    if json_out:
        render.print_json(view)
        return
    render.out().print(f"{view.name}: {view.state} on {view.host or '-'} "
                       f"({view.driver}, {render.fmt_cpus(view.cpus)} cpus, "
                       f"{render.fmt_bytes(view.memory_bytes)})")


@commands.command("ls")
def ls(json_out: JsonOpt = False) -> None:
    """List instances with their CPU (% of a core, % of the host) and memory."""
    with client() as c:
        items = sorted(c.instances(), key=lambda i: i.name)
    if json_out:
        render.print_json(items)
        return
    if not items:
        render.out().print("no instances; start one with: corral run NAME -- CMD")
        return
    render.out().print(render.instances_table(items))


@commands.command()
def show(name: str, json_out: JsonOpt = False) -> None:
    """Everything about one instance, including what you can do with it next."""
    with client() as c:
        view = c.instance(name)
    if json_out:
        render.print_json(view)
    else:
        render.out().print(render.instance_details(view))


def _verb(verb: str, names: list[str], *, timeout: float | None = None,
          sig: int | None = None, json_out: bool = False) -> None:
    wait = 30 if timeout is None else timeout + 60
    views = []
    with client(timeout=max(30, wait)) as c:
        for name in names:
            view = c.action(name, verb, timeout=timeout, signal=sig)
            views.append(view)
            if not json_out:
                render.out().print(f"{view.name}: {view.state}")
    if json_out:
        render.print_json(views if len(views) != 1 else views[0])


@commands.command()
def start(names: Names, json_out: JsonOpt = False) -> None:
    """Start stopped, exited or failed instances."""
    _verb("start", names, json_out=json_out)


@commands.command()
def stop(
    names: Names,
    timeout: Annotated[float | None, typer.Option(help="seconds before SIGKILL")] = None,
    json_out: JsonOpt = False,
) -> None:
    """SIGTERM, then SIGKILL after the timeout."""
    _verb("stop", names, timeout=timeout, json_out=json_out)


@commands.command()
def restart(names: Names, json_out: JsonOpt = False) -> None:
    """Stop (if running) and start again."""
    _verb("restart", names, json_out=json_out)


@commands.command()
def freeze(names: Names, json_out: JsonOpt = False) -> None:
    """Pause every process of the instance (cgroup freezer)."""
    _verb("freeze", names, json_out=json_out)


@commands.command()
def thaw(names: Names, json_out: JsonOpt = False) -> None:
    """Resume a frozen instance."""
    _verb("thaw", names, json_out=json_out)


@commands.command()
def kill(
    names: Names,
    signal: Annotated[str, typer.Option("--signal", "-s", help="name or number")] = "KILL",
    json_out: JsonOpt = False,
) -> None:
    """Send a signal to the whole instance."""
    _verb("kill", names, sig=parse_signal(signal), json_out=json_out)


@commands.command()
def rm(
    names: Names,
    force: Annotated[bool, typer.Option("--force", "-f", help="stop it first if alive")] = False,
) -> None:
    """Delete instances (they must be stopped, unless --force)."""
    with client(timeout=120) as c:
        for name in names:
            c.delete(name, force=force)
            render.out().print(f"{name}: deleted")
