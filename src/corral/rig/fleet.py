"""``corral up`` / ``corral down``: a whole fleet (server + NATS + N agents) on one machine.

Every process is started detached through :mod:`corral.rig.procs` and recorded in the context
file, so ``corral down`` (from any shell, later) stops exactly what ``up`` started. ``up`` either
finishes with a working fleet or leaves nothing behind: any failure stops what it started and
removes the network it built, and the error carries the tail of the failing process's log.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral import perms
from corral.api.client import Client
from corral.bus.embedded import stable_port
from corral.errors import Conflict, CorralError
from corral.lifecycle import ALIVE
from corral.rig import netns, procs
from corral.rig.context import (
    FleetContext,
    ProcInfo,
    context_path,
    load_context,
    remove_context,
    save_context,
)

Say = Callable[[str], None]


#: where ``corral up`` run by root keeps its fleet: not under /root, which is 0700, so that
#: workloads that drop privileges can still reach their disks (see rig/perms.py)
SYSTEM_FLEET_DIR = Path("/var/lib/corral/fleet")


def default_fleet_dir() -> Path:
    if os.geteuid() == 0:
        return SYSTEM_FLEET_DIR
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "corral" / "fleet"


@dataclass
class UpOptions:
    hosts: int = 3
    use_netns: bool = False
    data_dir: Path | None = None
    #: bound on each wait (server ready, all hosts up)
    timeout: float = 60.0
    #: where the hosts keep instance disks: dir (default) or btrfs (needs ``disk_root``)
    disk_backend: str = "dir"
    #: host i keeps its disks in ``disk_root/host<i>`` (default: its own data dir)
    disk_root: Path | None = None
    #: corral servers (each with a node of the NATS cluster); more than one needs ``postgres``
    servers: int = 1
    #: a PostgreSQL server for the fleet's database (else SQLite in the server's directory)
    postgres: bool = False
    #: a timing preset for every server and agent (``failover = "fast"``, config.PROFILES),
    #: recorded in their commands so restarts keep it; empty: the defaults
    failover: str = ""


def _quiet(_: str) -> None:
    return None


#: settings a fleet's processes take from the caller's environment (timings, logging); the
#: rest (addresses, ports, data dirs, the token) are set by ``up`` itself.
PASSED_SETTINGS = ("HEARTBEAT_SECONDS", "LEASE_SECONDS", "SAMPLE_SECONDS", "STOP_TIMEOUT",
                   "LOG_LEVEL", "FAILOVER_GRACE_SECONDS", "FENCE_MARGIN_SECONDS", "FAILOVER")


def child_env(token: str = "") -> dict[str, str]:
    """The environment of the fleet's processes: a token travels here, not in argv (where
    ``ps`` would show it), and stray ``CORRAL_*`` settings cannot redirect the fleet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update({f"CORRAL_{k}": os.environ[f"CORRAL_{k}"] for k in PASSED_SETTINGS
                if f"CORRAL_{k}" in os.environ})
    if token:
        env["CORRAL_TOKEN"] = token
    return env


def fleet_alive(ctx: FleetContext) -> bool:
    return any(procs.alive(p) for p in [*([ctx.server] if ctx.server else []), *ctx.servers,
                                         *ctx.agents, *([ctx.postgres] if ctx.postgres else [])])


def up(opts: UpOptions, say: Say = _quiet) -> FleetContext:
    """Start a fleet and write the context file; raise with a clear reason if it cannot."""
    if opts.hosts < 1:
        raise CorralError(f"--hosts must be at least 1, not {opts.hosts}")
    if opts.servers < 1:
        raise CorralError(f"--servers must be at least 1, not {opts.servers}")
    if opts.servers > 1 and not opts.postgres:
        raise CorralError("several servers share one database: SQLite is one server's",
                          hint=f"corral up --servers {opts.servers} --postgres")
    _refuse_second_fleet(say)
    if opts.use_netns:
        netns.require_root()
    if opts.disk_backend not in ("dir", "btrfs"):
        raise CorralError(f"--disk-backend {opts.disk_backend!r} is not known",
                          hint="use dir or btrfs")
    if opts.disk_backend == "btrfs" and opts.disk_root is None:
        raise CorralError("--disk-backend btrfs needs --disk-root",
                          hint="give a directory on a btrfs filesystem (each host gets a "
                               "subdirectory)")
    data = (opts.data_dir or default_fleet_dir()).expanduser().resolve()
    _refuse_busy_data_dir(data)
    _prepare_data_dir(data, opts, say)
    token = secrets.token_urlsafe(32)
    perms.write_private(data / "token", token)
    env = child_env(token)
    net: netns.FleetNetwork | None = None
    started: list[ProcInfo] = []
    try:
        if opts.use_netns:
            say(f"building a bridge and {opts.hosts} network namespaces")
            net = netns.create(opts.hosts)
        db_env: dict[str, str] = {}
        pg: ProcInfo | None = None
        if opts.postgres:
            from corral.rig import postgres

            pg, db_url = postgres.start(data / "postgres", say)
            started.append(pg)
            db_env = {"CORRAL_DB_URL": db_url}  # the password stays out of argv
        servers, readies = _start_servers(data, {**env, **db_env}, net, opts, say, started)
        ready = readies[0]
        ctx = FleetContext(
            url=",".join(str(r["api_url"]) for r in readies),
            token=token,
            data_dir=str(data),
            nats_url=",".join(str(r["nats_url"]) for r in readies),
            server=servers[0],
            network=net.to_dict() if net else None,
            ca_file=str(ready.get("ca_file") or "") or None,
            servers=servers[1:],
            postgres=pg,
        )
        grants = _join_tokens(ctx, data, opts.hosts)
        for i in range(1, opts.hosts + 1):
            agent = _start_agent(i, data, env, ctx, grants[f"host{i}"], net, opts)
            started.append(agent)
            ctx.agents.append(agent)
        say(f"waiting for {opts.hosts} agents to join")
        _wait_hosts(ctx, opts.timeout)
        save_context(ctx)
        return ctx
    except BaseException:
        for proc in reversed(started):
            procs.stop(proc, timeout=5)
        if net is not None:
            netns.cleanup(net)
        raise


def _refuse_second_fleet(say: Say) -> None:
    ctx = load_context()
    if ctx is None:
        return
    if fleet_alive(ctx):
        raise Conflict(
            f"a corral fleet is already running at {ctx.url} (data {ctx.data_dir})",
            hint="run 'corral down' first, or set CORRAL_CONTEXT to a different file "
            "to run a second fleet",
        )
    say(f"removing the stale context of a fleet that is no longer running ({context_path()})")
    _teardown(ctx, say)


def _refuse_busy_data_dir(data: Path) -> None:
    info = data / "server" / "server.json"
    try:
        pid = int(json.loads(info.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return
    if "corral" in cmdline and not procs.is_zombie(pid):
        raise Conflict(
            f"a corral server (pid {pid}) is already using {data}",
            hint="stop it ('corral down' with its context) or choose another --data directory",
        )


def host_disk_root(i: int, data: Path, opts: UpOptions | None) -> Path:
    """Where host ``i`` keeps its instance disks (the agent's ``disk_root``)."""
    if opts is not None and opts.disk_root is not None:
        return opts.disk_root.expanduser().resolve() / f"host{i}"
    return data / "hosts" / f"host{i}" / "disks"


def _prepare_data_dir(data: Path, opts: UpOptions, say: Say) -> None:
    """The fleet's directory private (0700), except the way down to the hosts' disks, which
    is traverse-only (0711): see rig/perms.py. Each agent does the same below its own data
    directory. As root, a parent that others cannot pass (a home directory) is reported."""
    roots = [host_disk_root(i, data, opts) for i in range(1, opts.hosts + 1)]
    for d in (data, data / "hosts"):
        perms.make_dirs(d, perms.TRAVERSE if perms.leads_to(d, roots) else perms.PRIVATE_DIR)
    if opts.postgres and os.geteuid() == 0:  # PostgreSQL runs as its own user, in DATA/postgres
        perms.make_dirs(data, perms.TRAVERSE)
    # only what up itself makes in DATA (token, server/, hosts/): a --data pointed at a
    # directory holding other things must not have them changed; hosts/ is all ours (an
    # earlier, larger fleet's host dirs included)
    perms.privatize_children(data / "hosts", keep={p for r in roots for p in (r, *r.parents)})
    if os.geteuid() == 0:
        blocking = perms.blocking_ancestor(roots[0])
        if blocking is not None:
            say(f"warning: {perms.blocked_message(roots[0].parent, blocking)}")


def server_dir(data: Path, i: int) -> Path:
    """Server ``i``'s directory (the first keeps the name a one-server fleet always had)."""
    return data / ("server" if i == 1 else f"server{i}")


#: what the servers of one fleet share (see docs/operations.md, "Several servers")
SHARED_SECRETS = ("token", "pki/ca.crt", "pki/ca.key", "ticket.key", "server.nk")


def _share_secrets(dirs: list[Path], token: str) -> None:
    """The fleet's secrets made once, in the first server's directory, and copied to the
    others: one CA, one ticket key, one bus identity for the servers, one admin token. Each
    server then makes its own certificate for its own addresses with the shared CA."""
    from corral.bus import identity
    from corral.control.pki import Authority
    from corral.disks import tickets

    first = dirs[0]
    perms.write_private(first / "token", token)
    Authority(first / "pki").ensure(["127.0.0.1"])
    tickets.signing_key(first / "ticket.key")
    if not identity.read_seed(first / "server.nk"):
        perms.write_private(first / "server.nk", identity.new_seed() + "\n")
    for d in dirs[1:]:
        perms.make_dirs(d / "pki", perms.PRIVATE_DIR)
        for name in SHARED_SECRETS:
            perms.write_private(d / name, (first / name).read_text())


def _start_servers(data: Path, env: dict[str, str], net: netns.FleetNetwork | None,
                   opts: UpOptions, say: Say, started: list[ProcInfo]
                   ) -> tuple[list[ProcInfo], list[dict[str, Any]]]:
    """Every server at once (a NATS cluster's JetStream needs its nodes together to make a
    replicated stream), then wait until each has written its ready file."""
    host = net.gateway if net else "127.0.0.1"
    n = opts.servers
    dirs = [perms.make_dirs(server_dir(data, i), perms.PRIVATE_DIR) for i in range(1, n + 1)]
    if n > 1:
        _share_secrets(dirs, env["CORRAL_TOKEN"])
    # fixed ports (picked free now, not 0): the recorded commands then restart each server on
    # the addresses the agents and the context already know
    cluster = [stable_port(host) for _ in dirs] if n > 1 else []
    say(f"starting {n} server(s) and their NATS" if n > 1 else "starting the server and its NATS")
    servers: list[ProcInfo] = []
    for i, sdir in enumerate(dirs, start=1):
        (sdir / "server.json").unlink(missing_ok=True)
        argv = procs.corral_argv(
            "server", "--data", str(sdir), "--tls", "on", "--api-host", host,
            "--api-port", str(stable_port(host)),
            "--nats-host", host, "--nats-port", str(stable_port(host)),
        )
        if n > 1:
            routes = ",".join(f"nats-route://{host}:{p}" for j, p in enumerate(cluster)
                              if j != i - 1)
            argv += ["--nats-cluster-port", str(cluster[i - 1]), "--nats-routes", routes,
                     "--server-name", f"s{i}",
                     "--set", f"stream_replicas={3 if n >= 3 else 1}"]
        if opts.failover:
            argv += ["--set", f"failover={opts.failover}"]
        proc = procs.spawn("server" if i == 1 else f"server{i}", argv, sdir / "server.log",
                           env=env)
        servers.append(proc)
        started.append(proc)
    readies = [_wait_ready(proc, sdir / "server.json", opts.timeout)
               for proc, sdir in zip(servers, dirs, strict=True)]
    return servers, readies


def respawn_server(ctx: FleetContext, old: ProcInfo, timeout: float = 120.0,
                   context: Path | None = None) -> ProcInfo:
    """Start a server of the fleet again with its recorded command and the environment ``up``
    gave it (token, database URL), on the same ports (a rolling restart, or one after a
    crash), wait until it is ready, and record it in place of ``old`` in the context."""
    if procs.alive(old):
        raise CorralError(f"{old.name} (pid {old.pid}) still runs",
                          hint="stop it first; a server is restarted, never doubled")
    env = child_env(ctx.token)
    if ctx.postgres is not None and ctx.data_dir:
        from corral.rig import postgres

        env["CORRAL_DB_URL"] = postgres.url_of(ctx.postgres, Path(ctx.data_dir) / "postgres")
    sdir = Path(old.argv[old.argv.index("--data") + 1])
    (sdir / "server.json").unlink(missing_ok=True)
    proc = procs.spawn(old.name, old.argv, Path(old.log), env=env)
    _wait_ready(proc, sdir / "server.json", timeout)
    if ctx.server is not None and ctx.server.name == old.name:
        ctx.server = proc
    else:
        ctx.servers = [proc if p.name == old.name else p for p in ctx.servers]
    save_context(ctx, context)
    return proc


def _wait_ready(server: ProcInfo, ready_file: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready_file.exists():
            try:
                ready = dict(json.loads(ready_file.read_text()))
                if ready.get("api_url") and ready.get("nats_url"):
                    return ready
            except ValueError:
                pass  # written but not complete yet
        if not procs.alive(server):
            raise _died(f"the server ({server.name})", server)
        time.sleep(0.1)
    raise CorralError(
        f"{server.name} did not become ready within {timeout:.0f}s (no {ready_file})",
        hint=f"see {server.log}:\n{procs.tail(server.log)}",
        retryable=True,
    )


def _join_tokens(ctx: FleetContext, data: Path, hosts: int) -> dict[str, str]:
    """A one-time join token for each host not enrolled yet (an earlier ``up`` on this data
    enrolled the others: they log in with the identity they kept). The agents never hold the
    fleet's admin token."""
    names = [f"host{i}" for i in range(1, hosts + 1)]
    new = [n for n in names if not (data / "hosts" / n / "identity" / "identity.json").exists()]
    with Client(ctx.url, ctx.token, timeout=10, ca_file=ctx.ca_file) as client:
        grants = {n: str(client.host_add(n)["token"]) for n in new}
    return {n: grants.get(n, "") for n in names}


def _start_agent(
    i: int, data: Path, env: dict[str, str], ctx: FleetContext, join_token: str,
    net: netns.FleetNetwork | None, opts: UpOptions | None = None,
) -> ProcInfo:
    """An agent that enrolls with ``join_token`` at first start; its recorded command (no
    token in it) restarts it on the identity it then keeps in its data dir."""
    name = f"host{i}"
    hdir = data / "hosts" / name
    disks = host_disk_root(i, data, opts)
    perms.make_dirs(hdir, perms.TRAVERSE if perms.leads_to(hdir, [disks]) else perms.PRIVATE_DIR)
    address = net.address(i) if net else "127.0.0.1"
    drivers = "process,runc" if net else "process"
    argv = procs.corral_argv(
        # --nats too: a later ``up`` on this data picks new ports, the identity keeps the old
        "agent", "--name", name, "--server", ctx.url.split(",")[0],
        "--nats", ctx.nats_url or "",
        "--data", str(hdir),
        "--address", address, "--drivers", drivers,
    )
    if ctx.ca_file:
        argv += ["--ca-file", ctx.ca_file]
    if opts is not None and opts.disk_root is not None:
        argv += ["--set", f"disk_root={disks}"]
    if opts is not None and opts.disk_backend != "dir":
        argv += ["--set", f"disk_backend={opts.disk_backend}"]
    if opts is not None and opts.failover:
        argv += ["--set", f"failover={opts.failover}"]
    ns = net.namespace(i) if net else None
    if ns:
        argv = netns.enter_argv(ns) + argv
    env = {k: v for k, v in env.items() if k != "CORRAL_TOKEN"}
    if join_token:
        env["CORRAL_JOIN_TOKEN"] = join_token
    return procs.spawn(name, argv, hdir / "agent.log", env=env, netns=ns, address=address)


def _wait_hosts(ctx: FleetContext, timeout: float) -> None:
    want = {a.name for a in ctx.agents}
    deadline = time.monotonic() + timeout
    up_now: set[str] = set()
    with Client(ctx.url, ctx.token, timeout=5, ca_file=ctx.ca_file) as client:
        while time.monotonic() < deadline:
            for agent in ctx.agents:
                if not procs.alive(agent):
                    raise _died(f"the agent of {agent.name}", agent)
            try:
                up_now = {h.name for h in client.hosts() if h.state == "up"}
            except CorralError:
                up_now = set()
            if want <= up_now:
                return
            time.sleep(0.2)
    missing = ", ".join(sorted(want - up_now))
    logs = "\n".join(f"{a.log}:\n{procs.tail(a.log, 5)}" for a in ctx.agents if a.name in missing)
    raise CorralError(
        f"hosts did not join within {timeout:.0f}s: {missing}",
        hint=f"see the agents' logs:\n{logs}",
        retryable=True,
    )


def _died(what: str, proc: ProcInfo) -> CorralError:
    procs.reap(proc.pid)
    return CorralError(
        f"{what} exited while starting",
        hint=f"its log {proc.log} ends with:\n{procs.tail(proc.log)}",
    )


def down(say: Say = _quiet, instance_timeout: float = 10.0) -> FleetContext:
    """Stop every instance through the API, then the agents, then the server; remove the context.

    Instances are stopped first so no workload is orphaned when its agent goes away; what an
    agent could not stop (it had died) is ended from its persisted handles once the agents are
    stopped (:mod:`corral.rig.leftovers`), so nothing ``up`` started outlives ``down``.
    """
    ctx = load_context()
    if ctx is None:
        raise CorralError(
            f"no fleet to stop (no context file at {context_path()})",
            hint="'corral down' stops fleets started by 'corral up'; set CORRAL_CONTEXT if "
            "yours wrote its context elsewhere",
        )
    if any(procs.alive(p) for p in [*([ctx.server] if ctx.server else []), *ctx.servers]):
        stop_instances(ctx, instance_timeout, say)
    _teardown(ctx, say, instance_timeout)
    return ctx


def stop_instances(ctx: FleetContext, timeout: float, say: Say) -> None:
    try:
        with Client(ctx.url, ctx.token, timeout=10, ca_file=ctx.ca_file) as client:
            running = [i.name for i in client.instances() if i.state in ALIVE]
            if not running:
                return
            say(f"stopping {len(running)} instance(s)")

            def one(name: str) -> None:
                try:
                    client.action(name, "stop", timeout=timeout)
                except CorralError as exc:
                    say(f"warning: could not stop {name}: {exc}")

            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(one, running))
    except CorralError as exc:
        say(f"warning: could not list instances to stop them: {exc}")


def _teardown(ctx: FleetContext, say: Say, instance_timeout: float = 10.0) -> None:
    from corral.rig.leftovers import end_leftovers  # drivers: only when a fleet goes down

    live_agents = [a for a in ctx.agents if procs.alive(a)]
    dead = frozenset(a.name for a in ctx.agents if a not in live_agents)
    if live_agents:
        say(f"stopping {len(live_agents)} agent(s)")
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda a: procs.stop(a, timeout=10), live_agents))
    say("checking for instances left running")
    end_leftovers(ctx, instance_timeout, say, dead_before=dead)
    servers = [p for p in [*([ctx.server] if ctx.server else []), *ctx.servers]
               if procs.alive(p)]
    if servers:
        say("stopping the server" if len(servers) == 1 else f"stopping {len(servers)} servers")
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda p: procs.stop(p, timeout=15), servers))
    if ctx.postgres and procs.alive(ctx.postgres):
        say("stopping PostgreSQL")
        procs.stop(ctx.postgres, timeout=30, sig=signal.SIGINT)  # "fast": no client waited for
    if ctx.network:
        left = netns.cleanup(str(ctx.network["tag"]))
        if left:
            say(f"warning: could not remove {', '.join(left)}")
    remove_context()
