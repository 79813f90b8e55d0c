"""``corral rig kill-host`` / ``revive-host``: a host's death, and its return, on a local fleet.

A fleet on one machine has no power cable to pull, yet failover is what corral exists for, and
an operator (or the tour) should be able to watch it happen without root or a network of
namespaces. Killing the host's agent alone is not a death: its fence keeper would still kill
the guarded instances at the lease's end, but an instance nobody guards would run on, as it
would not on a dead machine. So this ends everything the host runs, the way a power cut would:
the agent with SIGKILL (no goodbye to the server, which therefore learns of the death only when
the lease runs out, as with a real host), its fence keeper, and every workload its records
name, each with SIGKILL through the very driver the agent used. Disks and records stay, as on a
machine that lost power: ``revive-host`` starts the agent again with its recorded command, it
rejoins on the identity it kept, and the server's reconcile removes its stale copies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from corral.agent import keeper
from corral.errors import Conflict, CorralError, NotFound
from corral.rig import procs
from corral.rig.context import FleetContext, ProcInfo, save_context
from corral.rig.leftovers import ALIVE_STATES, IN_MEMORY, Drivers, agent_data_dir, records_of

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclass
class KilledHost:
    """What died with the host."""

    host: str
    agent_pid: int
    keepers: list[int] = field(default_factory=list)
    #: (instance, pid) of every workload that was still running
    workloads: list[tuple[str, int | None]] = field(default_factory=list)


def agent_of(ctx: FleetContext, host: str) -> ProcInfo:
    for agent in ctx.agents:
        if agent.name == host:
            return agent
    names = ", ".join(a.name for a in ctx.agents) or "none"
    raise NotFound(f"this fleet has no host named {host!r}",
                   hint=f"its hosts: {names} (see 'corral host ls')")


def kill_host(ctx: FleetContext, host: str, say: Say = _quiet) -> KilledHost:
    """Kill ``host``'s agent, keeper and workloads with SIGKILL; raise if it is not running."""
    agent = agent_of(ctx, host)
    if not procs.alive(agent):
        raise Conflict(f"the agent of {host} is not running (pid {agent.pid})",
                       hint=f"bring it back with 'corral rig revive-host {host}'")
    data = agent_data_dir(ctx, agent)
    with contextlib.suppress(ProcessLookupError):
        os.kill(agent.pid, signal.SIGKILL)
    _wait_gone(agent)
    killed = KilledHost(host, agent.pid)
    if data is None:
        return killed
    say(f"killed the agent of {host} (pid {agent.pid})")
    killed.keepers = keeper.stop(data / keeper.DIR_NAME, timeout=2.0)
    drivers = Drivers()
    for rec in records_of(data).values():
        if rec.driver in IN_MEMORY:
            continue
        drv = drivers.get(host, data, rec.driver)
        if isinstance(drv, str):
            say(f"warning: cannot reach {rec.name} on {host}: driver {rec.driver} is not "
                f"usable here ({drv})")
            continue
        try:
            status = drv.status(rec.handle)
            if status.state not in ALIVE_STATES:
                continue
            drv.kill(rec.handle, signal.SIGKILL)
            killed.workloads.append((rec.name, status.pid))
            say(f"killed {rec.name} on {host} (pid {status.pid})")
        except Exception as exc:  # a power cut has no error path: report and go on
            say(f"warning: could not kill {rec.name} on {host}: {exc}")
    return killed


def revive_host(ctx: FleetContext, host: str, context: Path | None = None,
                timeout: float = 60.0) -> ProcInfo:
    """Start ``host``'s agent again with its recorded command (its identity is kept in its
    data directory: no join token), record it in the context, and wait until it has joined."""
    from corral.rig.fleet import child_env

    old = agent_of(ctx, host)
    if procs.alive(old):
        raise Conflict(f"the agent of {host} still runs (pid {old.pid})",
                       hint=f"kill it first ('corral rig kill-host {host}'); a host is "
                            "restarted, never doubled")
    log = Path(old.log)
    start = log.stat().st_size if log.exists() else 0
    env = child_env()  # no token: an agent never holds the fleet's admin token
    new = procs.spawn(old.name, old.argv, log, env=env, netns=old.netns, address=old.address)
    ctx.agents = [new if a.name == host else a for a in ctx.agents]
    save_context(ctx, context)
    deadline = time.monotonic() + timeout
    while True:  # joined: its log says so (the lease of the dead one may not have ended yet)
        with log.open("rb") as fh:
            fh.seek(start)
            if b"joined as " in fh.read():
                return new
        if not procs.alive(new):
            procs.reap(new.pid)
            raise CorralError(f"the restarted agent of {host} exited",
                              hint=f"its log {log} ends with:\n{procs.tail(log)}")
        if time.monotonic() > deadline:
            raise CorralError(f"the restarted agent of {host} did not join within "
                              f"{timeout:.0f}s", hint=f"see {log}", retryable=True)
        time.sleep(0.1)


def _wait_gone(agent: ProcInfo, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while procs.alive(agent) and time.monotonic() < deadline:
        procs.reap(agent.pid)
        time.sleep(0.02)


def set_aside(ctx: FleetContext, host: str, name: str) -> list[Path]:
    """The disks of ``name`` that ``host``'s agent kept aside (``DISK_ROOT/.orphaned``) when
    the server removed a stale copy there; ``DISK_ROOT`` as the agent was started with it."""
    agent = agent_of(ctx, host)
    root: Path | None = None
    for i, arg in enumerate(agent.argv[:-1]):
        if arg == "--set" and agent.argv[i + 1].startswith("disk_root="):
            root = Path(agent.argv[i + 1].split("=", 1)[1])
    if root is None:
        data = agent_data_dir(ctx, agent)
        if data is None:
            return []
        root = data / "disks"
    return sorted(p for p in (root / ".orphaned").glob(f"{name}.*") if p.is_dir())
