"""The base of every operation builder: reads and writes of the fleet that steps share.

A step never holds a database transaction across an agent call: it reads what it needs, calls,
then writes what the agent answered, each in its own short transaction (:meth:`OpBase.record`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from corral.bus import rpc
from corral.bus.messages import InstanceReport, WireSpec
from corral.config import Settings
from corral.control.agents import AgentCaller
from corral.control.db import Host, Instance, Standby
from corral.control.fleet import Fleet
from corral.errors import DriverError, HostUnavailable, NotFound
from corral.lifecycle import ALIVE, State
from corral.ops import locks
from corral.ops.engine import OpContext
from corral.ops.locks import LockSet


class OpBase:
    """What every operation's builder needs: the fleet, the agents, the settings, and the
    few reads and writes all steps make (one short transaction each, never across a call)."""

    def __init__(self, fleet: Fleet, agents: AgentCaller, settings: Settings) -> None:
        self.fleet = fleet
        self.agents = agents
        self.settings = settings

    # -- reading the fleet -----------------------------------------------------------------------
    @staticmethod
    def host_up(s: Session, name: str, role: str) -> Host:
        host = s.get(Host, name)
        if host is None:
            raise NotFound(f"no host named '{name}'", hint="see 'corral host ls'")
        if host.state != "up":
            raise HostUnavailable(f"{role} host {name} is down",
                                  hint="wait for its agent to re-join (see 'corral host ls')")
        return host

    @staticmethod
    def instance(s: Session, name: str) -> Instance:
        inst = s.get(Instance, name)
        if inst is None:
            raise NotFound(f"no instance named '{name}'", hint="see 'corral ls'")
        return inst

    @staticmethod
    def spec(inst: Instance) -> dict[str, Any]:
        """The spec as the operation writes it down (``ctx.data['spec']``, JSON)."""
        return inst.wire_spec().model_dump(mode="json")

    def held(self, name: str, params: dict[str, Any]) -> LockSet:
        """What an operation on ``name`` holds while it runs: the instance itself, and shared
        holds on every host it may touch (its host, the one keeping its disk, its standby's,
        the one asked for), so a host can be emptied or forgotten only when none is in use."""
        with self.fleet.sessions() as s:
            inst = s.get(Instance, name)
            sb = s.get(Standby, name)
            hosts = {params.get("to"), sb.host if sb is not None else None}
            if inst is not None:
                hosts |= {inst.host, inst.disk_host}
        return LockSet.of([locks.instance(name)],
                          [locks.host(h) for h in hosts if isinstance(h, str) and h])

    def recorded_spec(self, ctx: OpContext) -> WireSpec:
        """The spec the operation wrote down when it planned, with the row's current epoch
        (every start since has made a new one)."""
        with self.fleet.sessions() as s:
            inst = s.get(Instance, ctx.record.target)
            epoch = inst.epoch if inst is not None else 1
        return WireSpec.model_validate({**ctx.data["spec"], "epoch": epoch})

    # -- writing the fleet -----------------------------------------------------------------------
    def record(self, name: str, host: str, state: State, report: InstanceReport | None,
               **fields: Any) -> None:
        """The instance now lives on ``host`` in ``state`` (refined by the agent's report)."""
        self.fleet.move(name, state, report=report, host=host, **fields)

    def new_epoch(self, name: str) -> int:
        with self.fleet.sessions.begin() as s:
            inst = self.instance(s, name)
            self.fleet.move_in(inst, epoch=inst.epoch + 1)
            return int(inst.epoch)

    @staticmethod
    def ensure_ended(report: InstanceReport, host: str) -> InstanceReport:
        """Refuse to go on while any process of the copy on ``host`` is left (the agent
        reports it alive until every one is reaped): the next step may start a copy
        elsewhere, and two copies of an instance must never exist at once."""
        if State(report.state) in ALIVE:
            raise DriverError(f"instance '{report.name}' on {host} still has processes after "
                              "SIGKILL", hint="a process stuck in the kernel (D state)? the "
                              "operation rolls back; retry later", retryable=True)
        return report

    async def stop_if_alive(self, host: str, name: str, signal: int | None = None
                            ) -> InstanceReport | None:
        """The undo of a start on ``host``: stop the copy there if it runs (with ``signal``: kill
        it, no grace); None when it was never made there or is not alive."""
        try:
            now = await self.agents.call(host, rpc.STATUS, rpc.NameArgs(name=name))
        except NotFound:
            return None
        if State(now.state) not in ALIVE:
            return None
        if signal is not None:
            report = await self.agents.call(host, rpc.KILL, rpc.KillArgs(name=name, signal=signal))
        else:
            report = await self.agents.call(host, rpc.STOP,
                                            rpc.StopArgs(name=name,
                                                         timeout=self.settings.stop_timeout))
        return self.ensure_ended(report, host)
