"""Database rows plus the latest metric samples, shaped into the API's wire models.

Usage figures come from the newest sample of the instance's host (the agent computed the
percentages from cumulative counters); a sample older than one lease is not shown, because a
number that stopped moving is worse than no number.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from sqlalchemy import select

import corral
from corral.api.models import (
    CheckSpec,
    FleetStatus,
    HostView,
    InstanceView,
    Resources,
    RestartSpec,
    Usage,
)
from corral.control.db import Host, Instance
from corral.control.fleet import Fleet
from corral.control.pace import repace
from corral.lifecycle import ALIVE, State, allowed_verbs


def instance_usage(fleet: Fleet, inst: Instance) -> Usage:
    if inst.host is None or inst.state not in ALIVE:
        return Usage()
    m = fleet.fresh_metrics(inst.host)
    sample = m.by_name.get(inst.name) if m else None
    if m is None or sample is None:
        return Usage()
    return Usage(cpu_core_pct=sample.cpu_core_pct, cpu_host_pct=sample.cpu_host_pct,
                 memory_bytes=sample.memory_bytes, sampled_at=m.received_at)


def instance_view(fleet: Fleet, inst: Instance) -> InstanceView:
    return InstanceView(
        name=inst.name, host=inst.host, driver=inst.driver, command=list(inst.command),
        cpus=inst.cpus, memory_bytes=inst.memory_bytes, rootfs=inst.rootfs,
        image=inst.image,
        tail=dict(inst.tail or {}), vip=inst.vip,
        desired_state=inst.desired_state, state=inst.state, pid=inst.pid,
        exit_code=inst.exit_code, epoch=inst.epoch, created_at=inst.created_at,
        updated_at=inst.updated_at, usage=instance_usage(fleet, inst),
        allowed=[v.value for v in allowed_verbs(State(inst.state))],
        disk_host=inst.disk_host, shelf=inst.shelf, image_config=inst.image_config,
        restart=RestartSpec.model_validate(inst.restart_policy or {}),
        restarts=inst.restarts or 0,
        check=CheckSpec.model_validate(inst.check_spec) if inst.check_spec else None,
        health=inst.health if inst.health or not inst.check_spec else "unknown",
    )


def _sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def host_view(fleet: Fleet, host: Host, instances: Sequence[Instance]) -> HostView:
    mine = [i for i in instances if i.host == host.name]
    rc = round(sum(i.cpus for i in mine), 6)  # 0.1 + 0.2 shows as 0.3
    rm = sum(i.memory_bytes for i in mine)
    usages = [instance_usage(fleet, i) for i in mine]
    m = fleet.fresh_metrics(host.name) if host.state == "up" else None
    usage = Usage()
    rest: float | None = None
    if m is not None:
        host_pct = _sum([u.cpu_host_pct for u in usages])
        usage = Usage(
            cpu_core_pct=_sum([u.cpu_core_pct for u in usages]) or 0.0,
            cpu_host_pct=host_pct or 0.0,
            memory_bytes=sum(u.memory_bytes or 0 for u in usages),
            sampled_at=m.received_at,
        )
        if m.sample.host_cpu_pct is not None:
            rest = max(0.0, m.sample.host_cpu_pct - (host_pct or 0.0))
    return HostView(
        name=host.name, address=host.address, state=host.state, cores=host.cores,
        memory_bytes=host.memory_bytes, disk_bytes=host.disk_bytes, drivers=dict(host.drivers),
        reserved=Resources(cpus=rc, memory_bytes=rm),
        free=Resources(cpus=round(host.cores - rc, 6), memory_bytes=host.memory_bytes - rm),
        instances=len(mine), usage=usage, rest_host_pct=rest,
        # the leader's own figures are newer than the row's (written every half lease)
        last_heartbeat=max(host.last_heartbeat or 0.0, fleet.last_beat.get(host.name, 0.0))
        or None,
        lease_expires_at=max(host.lease_expires_at or 0.0,
                             fleet.lease_until.get(host.name, 0.0)) or None,
        agent_version=host.agent_version, draining=bool(host.draining),
    )


def host_views(fleet: Fleet, after: str | None = None, limit: int | None = None
               ) -> list[HostView]:
    """Hosts by name (``limit`` of them after ``after``; default all), each with its
    instances: one read of the hosts, one of their instances."""
    query = select(Host).order_by(Host.name)
    if after is not None:
        query = query.where(Host.name > after)
    if limit is not None:
        query = query.limit(limit)
    with fleet.sessions() as s:
        hosts = list(s.scalars(query))
        if limit is None and after is None:
            instances = list(s.scalars(select(Instance)))
        else:
            instances = list(s.scalars(select(Instance).where(
                Instance.host.in_([h.name for h in hosts]))))
    by_host: dict[str | None, list[Instance]] = {}
    for i in instances:  # once: each host scanning every instance grew as hosts x instances
        by_host.setdefault(i.host, []).append(i)
    return [host_view(fleet, h, by_host.get(h.name, [])) for h in hosts]


def fleet_status(fleet: Fleet, nats_url: str, db: str) -> FleetStatus:
    with fleet.sessions() as s:
        hosts = list(s.scalars(select(Host)))
        states = Counter(s.scalars(select(Instance.state)))
    up = sum(1 for h in hosts if h.state == "up")
    # the leader's own pace; a follower works out the same from the fleet's size
    pace = repace(fleet.pace, fleet.settings, len(hosts))
    return FleetStatus(version=corral.__version__, hosts_up=up, hosts_down=len(hosts) - up,
                       instances=dict(sorted(states.items())), nats_url=nats_url, db=db,
                       heartbeat_seconds=pace.heartbeat_seconds,
                       lease_seconds=pace.lease_seconds)
