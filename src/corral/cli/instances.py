"""Instance commands: run, ls, show and the lifecycle verbs.

They only shape requests and print replies; the server decides what is allowed (from
:mod:`corral.lifecycle`) and its refusals reach the operator through the error formatter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corral.cli import render
from corral.cli.app import client
from corral.errors import InvalidRequest


def run(name: str, command: list[str], cpus: float, memory: str, host: str | None,
        driver: str | None, rootfs: Path | None, image: str | None, entrypoint: str | None,
        env: list[str] | None, no_start: bool, tail: list[str] | None, vip: str | None,
        json_out: bool, restart: str = "no", restart_attempts: int | None = None,
        restart_interval: str | None = None, restart_delay: str | None = None,
        check: str | None = None, check_interval: str | None = None,
        check_timeout: str | None = None, check_threshold: int | None = None,
        failover_on_unhealthy: bool = False, check_grace: str | None = None) -> None:
    """The request is checked here against the wire model (a bad name or size is refused
    before any connection is made). With an image the command may be left out: the server
    lays the image's config under what is given (entrypoint, command, ``-e``)."""
    if not command and image is None and not entrypoint:
        raise InvalidRequest("no command given", hint="put the workload after --, e.g. "
                             "corral run web -- python3 -m http.server")
    from corral.api.models import CheckSpec, CreateInstance, RestartSpec
    from corral.cli.parse import parse_cpus, parse_duration, parse_env, parse_memory, parse_tail

    policy: dict[str, Any] = {"mode": restart}
    if restart_attempts is not None:
        policy["attempts"] = restart_attempts
    if restart_interval is not None:
        policy["interval"] = parse_duration(restart_interval)
    if restart_delay is not None:
        policy["delay"] = parse_duration(restart_delay)
    probe: dict[str, Any] | None = None
    if check is not None:
        probe = {"target": check}
        if check_interval is not None:
            probe["interval"] = parse_duration(check_interval)
        if check_timeout is not None:
            probe["timeout"] = parse_duration(check_timeout)
        if check_threshold is not None:
            probe["threshold"] = check_threshold
        if check_grace is not None:
            probe["grace"] = parse_duration(check_grace)
        if failover_on_unhealthy:
            probe["failover"] = True
    elif failover_on_unhealthy:
        raise InvalidRequest("--failover-on-unhealthy needs --check (unhealthy is what the "
                             "check says)", hint="e.g. --check tcp::5432 "
                             "--failover-on-unhealthy, then 'corral standby add NAME'")
    elif check_interval or check_timeout or check_grace or check_threshold is not None:
        raise InvalidRequest("--check-interval, --check-timeout, --check-grace and "
                             "--check-threshold need "
                             "--check", hint="e.g. --check http://:8080/health")

    spec = CreateInstance(
        name=name,
        command=command,
        cpus=parse_cpus(cpus),
        memory_bytes=parse_memory(memory),
        driver=driver or ("runc" if rootfs or image else "process"),
        host=host,
        rootfs=str(rootfs.expanduser().resolve()) if rootfs else None,
        image=image,
        entrypoint=None if entrypoint is None else [entrypoint] if entrypoint else [],
        env=parse_env(env or []),
        tail=parse_tail(tail or []),
        start=not no_start,
        vip=vip,
        restart=_option(RestartSpec, policy, "--restart"),
        check=None if probe is None else _option(CheckSpec, probe, "--check"),
    )
    with client() as c:
        view = c.create(spec)
    if json_out:
        render.print_json(view)
        return
    render.say(f"{view.name}: {view.state} on {view.host or '-'} "
               f"({view.driver}, {render.fmt_cpus(view.cpus)} cpus, "
               f"{render.fmt_bytes(view.memory_bytes)})")


def _option(model: Any, values: dict[str, Any], prefix: str) -> Any:
    """``values`` as ``model``, a refusal naming the option (--restart-interval, not
    'interval', which --check has too)."""
    from pydantic import ValidationError

    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first.get("loc", ("",))[0])
        option = prefix if field in ("mode", "target") else f"{prefix}-{field}"
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise InvalidRequest(f"{option}: {msg}", hint=f"see 'corral run --help' for what "
                             f"{option} takes") from None


def ls(json_out: bool) -> None:
    with client() as c:
        items = sorted(c.instances_data(), key=lambda i: str(i["name"]))
    if json_out:
        render.print_json(items)
        return
    if not items:
        render.say("no instances; start one with: corral run NAME -- CMD")
        return
    render.out().print(render.instances_table(items))


def show(name: str, json_out: bool) -> None:
    with client() as c:
        view = c.instance_data(name)
    if json_out:
        render.print_json(view)
        return
    table = render.instance_details(view)
    if view.get("image_config"):  # what the image's config decided (see corral image pull)
        for key, value in _image_rows(view["image_config"]):
            table.add_row(key, value)
    render.out().print(table)


def _image_rows(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    hc = cfg.get("healthcheck") or {}
    test = hc.get("Test") or []
    rows = [("user", f"{cfg.get('user', 'root')} ({cfg.get('uid', 0)}:{cfg.get('gid', 0)})"),
            ("workdir", cfg.get("cwd") or "/"),
            ("stop signal", _signame(int(cfg.get("stop_signal") or 15))),
            ("ports", ", ".join(cfg.get("exposed_ports") or []) or "-"),
            ("healthcheck", " ".join(str(t) for t in test) if test else "-")]
    if hc.get("Interval"):
        rows[-1] = (rows[-1][0], f"{rows[-1][1]} (every {int(hc['Interval']) / 1e9:g}s)")
    return rows


def _signame(n: int) -> str:
    import signal

    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)


def _verb(verb: str, names: list[str], *, timeout: float | None = None,
          sig: int | None = None, json_out: bool = False) -> None:
    wait = 30 if timeout is None else timeout + 60
    views = []
    with client(timeout=max(30, wait)) as c:
        for name in names:
            view = c.action_data(name, verb, timeout=timeout, signal=sig)
            views.append(view)
            if not json_out:
                render.say(f"{view['name']}: {view['state']}")
    if json_out:
        render.print_json(views if len(views) != 1 else views[0])


def start(names: list[str], json_out: bool) -> None:
    _verb("start", names, json_out=json_out)


def stop(names: list[str], timeout: float | None, json_out: bool) -> None:
    _verb("stop", names, timeout=timeout, json_out=json_out)


def restart(names: list[str], json_out: bool) -> None:
    _verb("restart", names, json_out=json_out)


def freeze(names: list[str], json_out: bool) -> None:
    _verb("freeze", names, json_out=json_out)


def thaw(names: list[str], json_out: bool) -> None:
    _verb("thaw", names, json_out=json_out)


def kill(names: list[str], signal: str, json_out: bool) -> None:
    from corral.cli.parse import parse_signal

    _verb("kill", names, sig=parse_signal(signal), json_out=json_out)


def rm(names: list[str], force: bool) -> None:
    with client(timeout=120) as c:
        for name in names:
            c.delete(name, force=force)
            render.say(f"{name}: deleted")
