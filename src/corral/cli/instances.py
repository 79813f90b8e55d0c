"""Instance commands: run, ls, show and the lifecycle verbs.

They only shape requests and print replies; the server decides what is allowed (from
:mod:`corral.lifecycle`) and its refusals reach the operator through the error formatter.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.cli import render
from corral.cli.app import client
from corral.errors import InvalidRequest

if TYPE_CHECKING:
    from corral.api.client import Client


def run(name: str, command: list[str], cpus: float, memory: str, host: str | None,
        driver: str | None, rootfs: Path | None, image: str | None, entrypoint: str | None,
        env: list[str] | None, no_start: bool, tail: list[str] | None, vip: str | None,
        json_out: bool, restart: str = "no", restart_attempts: int | None = None,
        restart_interval: str | None = None, restart_delay: str | None = None,
        check: str | None = None, check_interval: str | None = None,
        check_timeout: str | None = None, check_threshold: int | None = None,
        failover_on_unhealthy: bool = False, check_grace: str | None = None,
        count: int | None = None) -> None:
    """The request is checked here against the wire model (a bad name or size is refused
    before any connection is made). With an image the command may be left out: the server
    lays the image's config under what is given (entrypoint, command, ``-e``). ``count``:
    that many instances NAME-1..NAME-N, placed together (``POST /v1/instances/batch``)."""
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
    if count is not None:
        _run_many(spec, count, json_out)
        return
    with client() as c:
        view = c.create(spec)
    if json_out:
        render.print_json(view)
        return
    render.say(f"{view.name}: {view.state} on {view.host or '-'} "
               f"({view.driver}, {render.fmt_cpus(view.cpus)} cpus, "
               f"{render.fmt_bytes(view.memory_bytes)})")


def _run_many(spec: Any, count: int, json_out: bool) -> None:
    """NAME-1..NAME-count, MAX_BATCH_CREATE a call; every instance's outcome is printed, and
    the command fails (exit 1) when any was not made as asked."""
    from corral.api.models import MAX_BATCH_CREATE, BatchItem, CreateInstance
    from corral.errors import CorralError

    if not 1 <= count <= 100_000:
        raise InvalidRequest(f"--count {count} is out of range",
                             hint="give 1 to 100000 (instances NAME-1 .. NAME-N)")
    if spec.vip is not None and count > 1:
        raise InvalidRequest("--vip with --count: instances cannot share one virtual IP",
                             hint="run them one by one, each with its own --vip")
    specs = [CreateInstance.model_validate({**spec.model_dump(), "name": f"{spec.name}-{i}"})
             for i in range(1, count + 1)]
    items: list[BatchItem] = []
    with client() as c:
        for k in range(0, count, MAX_BATCH_CREATE):
            items += c.create_many(specs[k:k + MAX_BATCH_CREATE])
            if count > MAX_BATCH_CREATE and not json_out:
                render.say(f"created {len(items)} of {count}...", stderr=True)
    bad = [i for i in items if i.error is not None]
    if json_out:
        render.print_json(items)
    else:
        for i in items:
            v = i.instance
            where = f"{v.state} on {v.host or '-'}" if v is not None else "not made"
            why = f": {i.error.message}" if i.error is not None else ""
            render.say(f"{i.name}: {where}{why}")
    if bad:
        raise CorralError(f"{len(bad)} of {count} instances were not made as asked "
                          f"(first: {bad[0].name}: {bad[0].error.message if bad[0].error else ''})",
                          hint="see each line above; 'corral rm' what failed, or run the "
                               "missing ones again")


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


def ls(json_out: bool, limit: int | None = None, host: str | None = None,
       state: str | None = None) -> None:
    """Printed page by page as the server sends them (by name), so a fleet of 100k
    instances shows its first rows at once and neither side holds the whole list."""
    with client() as c:
        pages = _pages(c, limit, host, state)
        if json_out:
            _print_json_list(pages)
        else:
            _print_tables(pages, bool(host or state))


def _pages(c: Client, limit: int | None, host: str | None, state: str | None
           ) -> Iterator[list[dict[str, Any]]]:
    """The server's pages, cut at ``limit`` (a server older than paging sends the whole
    list in its first answer: cut there too)."""
    from corral.api.client import PAGE_SIZE

    left = limit
    size = PAGE_SIZE if limit is None else max(1, min(PAGE_SIZE, limit))
    for page in c.instance_pages(host=host, state=state, page_size=size):
        if left is not None:
            page = page[:left]
            left -= len(page)
        yield page
        if left == 0:
            return


def _print_json_list(pages: Iterator[list[dict[str, Any]]]) -> None:
    """One JSON list, written as the pages come: the same bytes ``json.dumps(list,
    indent=2)`` of the whole would be (JSON strings hold no raw newline, so indenting an
    item's lines is safe)."""
    import json
    import sys

    out = sys.stdout
    sep = "[\n  "
    for page in pages:
        for item in page:
            out.write(sep + json.dumps(item, indent=2).replace("\n", "\n  "))
            sep = ",\n  "
        out.flush()
    out.write("[]\n" if sep.startswith("[") else "\n]\n")
    out.flush()


def _print_tables(pages: Iterator[list[dict[str, Any]]], filtered: bool) -> None:
    """The first page as a table with its header, each later one as more rows: a table
    without a header whose columns are at least as wide as those printed before, so the
    rows line up (a wider cell later widens its column from there on)."""
    from rich.cells import cell_len
    from rich.text import Text

    console = None
    widths: list[int] = []
    for page in pages:
        if not page:
            continue
        table = render.instances_table(page)
        if console is None:
            console = render.out()
        else:
            table.show_header = False
            for col, width in zip(table.columns[:-1], widths, strict=False):
                col.min_width = width
        before = widths or [cell_len(str(col.header)) for col in table.columns[:-1]]
        widths = [max(width, *(c.cell_len if isinstance(c, Text) else cell_len(str(c))
                               for c in col.cells))
                  for col, width in zip(table.columns[:-1], before, strict=True)]
        console.print(table)
    if console is None:
        render.say("no instances match" if filtered
                   else "no instances; start one with: corral run NAME -- CMD")


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
