"""What ``corral down`` ends itself: workloads its agents can no longer end.

``down`` stops instances through the API, but an agent that died (killed with -9, or one whose
host never answered) cannot stop anything, and its workloads would run on outside any fleet. Each
agent keeps every instance's record and driver handle in its data directory
(``agent/store.py``): the session and pid with its start time, the cgroup, the runc container. So
once the agents are stopped, ``down`` reads those handles and, through the very driver the agent
used (built here the same way), stops whatever still runs and deletes what the driver made for
it (cgroups, runc containers). The records themselves stay: a later ``corral up`` on the same
data directory finds the instances stopped, as after a clean ``down``.

Each agent's fence keeper (``agent/keeper.py``) goes first: an agent stopped cleanly with
nothing guarded stopped its own, but one that died leaves it armed, and ``down`` is about to end
those instances anyway. No keeper outlives ``down``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from corral.agent import keeper
from corral.agent.scope import ID_FILE, driver_scope
from corral.agent.store import InstanceRecord, Store
from corral.drivers import cgroups
from corral.drivers.base import Driver
from corral.drivers.registry import BUILTIN
from corral.rig import procs
from corral.rig.context import FleetContext, ProcInfo

log = logging.getLogger(__name__)

Say = Callable[[str], None]

ALIVE_STATES = frozenset({"running", "frozen"})
#: drivers whose instances live in the agent's memory only: nothing is left when it is gone
IN_MEMORY = frozenset({"fake"})


@dataclass(frozen=True)
class Ended:
    """An instance ``down`` had to end itself."""

    host: str
    instance: str
    driver: str
    pid: int | None
    #: its agent had died before ``down`` (else: the stop through the API did not take)
    agent_dead: bool


def agent_data_dir(ctx: FleetContext, agent: ProcInfo) -> Path | None:
    """The agent's ``--data`` (from the command ``up`` recorded), else the fleet's layout."""
    argv = agent.argv
    for i, arg in enumerate(argv[:-1]):
        if arg == "--data":
            return Path(argv[i + 1])
    return Path(ctx.data_dir) / "hosts" / agent.name if ctx.data_dir else None


def records_of(data_dir: Path) -> dict[str, InstanceRecord]:
    """The agent's instance records, read as a restarted agent would (unreadable ones are
    logged and skipped by the store)."""
    if not (data_dir / "instances").is_dir():
        return {}
    return Store(data_dir).load_all()


class Drivers:
    """One driver per (host, name), built as the agent builds it, on first need."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, str], Driver | str] = {}

    def get(self, host: str, data_dir: Path, name: str) -> Driver | str:
        key = (host, name)
        if key not in self._made:
            factory = BUILTIN.get(name)
            if factory is None:
                self._made[key] = f"unknown driver {name!r}"
            else:
                drv = factory(driver_scope(data_dir, host), data_dir)
                self._made[key] = drv.available() or drv
        return self._made[key]


def end_leftovers(ctx: FleetContext, timeout: float, say: Say,
                  dead_before: frozenset[str] = frozenset()) -> list[Ended]:
    """Stop every instance of the fleet's (stopped) agents that still runs, and delete what its
    driver made; returns what had to be ended. An agent still alive is left alone (it owns its
    instances); ``dead_before`` names the agents that had died before ``down``."""
    drivers = Drivers()
    work: list[tuple[str, Path, InstanceRecord]] = []
    for agent in ctx.agents:
        if procs.alive(agent):
            say(f"warning: the agent of {agent.name} is still running; its instances are left "
                f"to it (pid {agent.pid})")
            continue
        data = agent_data_dir(ctx, agent)
        if data is None:
            continue
        stop_keeper(agent.name, data, say)
        work += [(agent.name, data, rec) for rec in records_of(data).values()
                 if rec.driver not in IN_MEMORY]

    def one(item: tuple[str, Path, InstanceRecord]) -> Ended | None:
        host, data, rec = item
        drv = drivers.get(host, data, rec.driver)
        if isinstance(drv, str):
            say(f"warning: cannot check {rec.name} on {host}: driver {rec.driver} is not usable "
                f"here ({drv})")
            return None
        try:
            status = drv.status(rec.handle)
            ended = None
            if status.state in ALIVE_STATES:
                ended = Ended(host, rec.name, rec.driver, status.pid, host in dead_before)
                drv.stop(rec.handle, timeout)
            drv.delete(rec.handle)  # its cgroup, its container: nothing of it outlives down
            return ended
        except Exception as exc:
            say(f"warning: could not end {rec.name} on {host} ({rec.driver}, pid "
                f"{rec.handle.data.get('pid')}): {exc}; end it by hand")
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        done = [e for e in pool.map(one, work) if e is not None]
    for agent in ctx.agents:  # the agents' own parent cgroups, now empty
        data = agent_data_dir(ctx, agent)
        if data is not None and (data / ID_FILE).is_file() and not procs.alive(agent):
            cgroups.remove_scope(driver_scope(data, agent.name))
    for e in done:
        why = "its agent had died" if e.agent_dead else "it still ran after its agent stopped"
        say(f"warning: ended {e.instance} on {e.host} ({e.driver}, pid {e.pid}): {why}")
    return done


def stop_keeper(host: str, data_dir: Path, say: Say) -> list[int]:
    """Stop the fence keeper of a stopped agent, if one still runs (by its pid file, checked
    against its command line and start time, and a walk of /proc for any other)."""
    stopped = keeper.stop(data_dir / keeper.DIR_NAME)
    if stopped:
        say(f"stopped the fence keeper of {host} (pid {', '.join(map(str, stopped))})")
    return stopped
