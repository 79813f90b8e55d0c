"""Every operation kind, with one agent call failing at each point in turn, before or after it
did its work: the operation ends succeeded or rolled back, never with two live copies, and a
rolled-back one leaves the fleet (the server's rows and every host) as it found it.

The e2e fault tests do this with real agents killed -9 at every step; this does it for every
call of every kind in seconds, without root, against the server's own builders and engine
(the hosts are :mod:`fakefleet`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fakefleet import Copy, FakeAgents, FakeHost, Inject
from sqlalchemy.orm import Session, sessionmaker

from corral.config import Settings
from corral.control.db import Host, Instance, Standby, open_db
from corral.control.fleet import Fleet
from corral.control.operations.runner import Operations
from corral.images.store import ImageStore
from corral.images.tree import Manifest
from corral.ops.store import OpRecord, OpState

GiB = 1024**3
HOSTS = ("h1", "h2", "h3")


@dataclass
class Case:
    kind: str
    params: dict[str, Any]
    state: str = "running"
    standby: str | None = None
    #: where it ends up when the operation succeeds
    lands: str | None = None
    down: str | None = None
    shelved: bool = False
    #: the hosts' driver can migrate a running instance (the live path of migrate)
    live: bool = False


CASES = {
    "migrate-warm": Case("migrate", {"to": "h2"}, lands="h2"),
    "migrate-live": Case("migrate", {"to": "h2"}, lands="h2", live=True),
    "migrate-cold": Case("migrate", {"to": "h2", "cold": True}, lands="h2"),
    "migrate-stopped": Case("migrate", {"to": "h2"}, state="stopped", lands="h2"),
    "recreate": Case("recreate", {"to": "h3"}, lands="h3"),
    "standby-sync": Case("standby-sync", {}, standby="h2", lands="h1"),
    "standby-promote": Case("standby-promote", {}, standby="h2", lands="h2"),
    "failover": Case("failover", {"from": "h1"}, state="lost", standby="h2", lands="h2",
                     down="h1"),
    "shelve": Case("shelve", {"offload_after": -1}, lands=None),
    "unshelve": Case("unshelve", {"to": None}, state="shelved", shelved=True, lands="h1"),
}


@dataclass
class Rig:
    sessions: sessionmaker[Session]
    fleet: Fleet
    ops: Operations
    agents: FakeAgents
    store: ImageStore


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    settings = Settings(data_dir=tmp_path)
    db, sessions = open_db(settings)
    fleet = Fleet(sessions, settings)
    store = ImageStore(tmp_path / "images")
    agents = FakeAgents({h: FakeHost() for h in HOSTS}, store)
    ops = Operations(db, fleet, agents, settings, images=lambda: store)  # type: ignore[arg-type]
    ops.engine.retry_delay = 0.001
    yield Rig(sessions, fleet, ops, agents, store)
    store.close()
    db.dispose()


def setup(rig: Rig, case: Case) -> None:
    """The instance ``m`` as the case says, on a clean fleet and clean hosts."""
    with rig.sessions.begin() as s:
        for table in (Standby, Instance, Host):
            s.execute(sa.delete(table))
        s.execute(sa.text("DELETE FROM operations"))
        for name in HOSTS:
            s.add(Host(name=name, address="127.0.0.1", cores=2, memory_bytes=4 * GiB,
                       disk_bytes=10 * GiB,
                       drivers={"process": {"can_live_migrate": True} if case.live else {}},
                       state="down" if name == case.down else "up", data_port=7000,
                       disk_backend="dir", lease_expires_at=2e9))
        s.flush()
        s.add(Instance(
            name="m", host=None if case.shelved else "h1", driver="process",
            command=["sleep", "60"], cpus=0.5, memory_bytes=64 * 2**20,
            desired_state="shelved" if case.shelved else "running", state=case.state,
            epoch=3, created_at=1.0, updated_at=2.0,
            disk_host="h1" if case.shelved else None,
            shelf="@shelf-m-1" if case.shelved else None,
            shelved_from="running" if case.shelved else None))
        s.flush()
        if case.standby:
            s.add(Standby(instance="m", host=case.standby, every_seconds=60.0, state="ready",
                          data_at=150.0, last_sync_at=150.0, created_at=1.0, total_bytes=0,
                          syncs=1, last_error=""))
    for h in rig.agents.hosts.values():
        h.instances.clear()
        h.disks.clear()
        h.slots.clear()
    h1 = rig.agents.hosts["h1"]
    h1.disks.add("m")
    if not case.shelved:
        # a down host fenced itself: its copy stopped before its lease ran out
        h1.instances["m"] = Copy("running" if case.state == "running" else "stopped", 3)
    rig.agents.down = {case.down} if case.down else set()
    if case.standby:
        rig.agents.hosts[case.standby].slots.add(("m", "standby"))
    if case.shelved:
        rig.store.put_manifest("@shelf-m-1", Manifest([]), replace=True)
    rig.agents.calls.clear()
    rig.agents.inject = None
    rig.agents.failed = None


def row(rig: Rig) -> dict[str, Any] | None:
    with rig.sessions() as s:
        inst = s.get(Instance, "m")
        return None if inst is None else {
            k: getattr(inst, k) for k in ("host", "state", "desired_state", "disk_host",
                                          "shelf")}


def alive(rig: Rig) -> list[str]:
    return [h for h, st in rig.agents.hosts.items()
            if (c := st.instances.get("m")) is not None and c.state in ("running", "frozen")]


async def run(rig: Rig, case: Case) -> OpRecord:
    first = await rig.ops.begin(case.kind, "m", dict(case.params))
    return await rig.ops.wait(first.id)


def check_consistent(rig: Rig, case: Case, rec: OpRecord) -> None:
    assert len(alive(rig)) <= 1, f"two live copies: {alive(rig)}"
    r = row(rig)
    assert r is not None
    if r["state"] in ("running", "frozen"):
        assert alive(rig) == [r["host"]], (r, alive(rig))
    for name, h in rig.agents.hosts.items():
        assert ("m", "incoming") not in h.slots, f"a migration's copy left on {name}"


@pytest.mark.parametrize("case_id", list(CASES))
async def test_one_failure_anywhere_finishes_or_leaves_no_trace(rig: Rig, case_id: str) -> None:
    case = CASES[case_id]
    setup(rig, case)
    clean = await run(rig, case)
    assert clean.state == OpState.SUCCEEDED, clean.error
    assert clean.result is not None  # every kind says what it did
    check_consistent(rig, case, clean)
    landed = row(rig)
    assert landed is not None and landed["host"] == case.lands
    calls = len(rig.agents.calls)
    assert calls > 0
    assert (("h1", "live_send") in rig.agents.calls) == case.live
    if case.live:  # the source's paused copy was ended, and QEMU's figures reported
        assert rig.agents.hosts["h1"].instances.get("m") is None
        assert clean.result["live"] is True and clean.result["downtime_ms"] == 20.0
        assert clean.result["memory_bytes"] == 1000 and clean.result["disk_bytes"] == 500
    ended: set[OpState] = set()
    for at in range(1, calls + 1):
        for when in ("before", "after"):
            setup(rig, case)
            before_row, before_hosts = row(rig), copy.deepcopy(rig.agents.hosts)
            rig.agents.inject = Inject(at, when)
            rec = await run(rig, case)
            ended.add(rec.state)
            where = f"{case_id}: call {at} ({rig.agents.failed}) failing {when}"
            assert rec.state in (OpState.SUCCEEDED, OpState.ROLLED_BACK), \
                f"{where}: {rec.state.value} {rec.error} {[s.state for s in rec.steps]}"
            check_consistent(rig, case, rec)
            assert "m" not in rig.fleet.locks.instances, f"{where}: still held"
            if rec.state == OpState.ROLLED_BACK:
                assert row(rig) == before_row, where
                if case.live:  # the source ran all along, its epoch still the row's
                    with rig.sessions() as s:
                        assert s.get(Instance, "m").epoch == 3, where  # type: ignore[union-attr]
                assert alive(rig) == [h for h, st in before_hosts.items()
                                      if "m" in st.instances
                                      and st.instances["m"].state == "running"], where
                for h, st in rig.agents.hosts.items():
                    assert st.slots <= before_hosts[h].slots | {("m", "standby")}, (where, h)
            else:
                assert row(rig) == landed, where
    assert OpState.ROLLED_BACK in ended  # the failures did land somewhere that matters


async def test_an_unshelve_group_runs_each_member_and_says_how_each_ended(rig: Rig) -> None:
    """Three shelved instances as one group, two at a time; one member's agent call fails
    (it rolls back, shelved as before), the others come back; the group's result lists all."""
    case = CASES["unshelve"]
    setup(rig, case)
    with rig.sessions.begin() as s:
        for name in ("m2", "m3"):
            s.add(Instance(name=name, host=None, driver="process", command=["sleep", "60"],
                           cpus=0.5, memory_bytes=64 * 2**20, desired_state="shelved",
                           state="shelved", epoch=3, created_at=1.0, updated_at=2.0,
                           disk_host="h1", shelf=f"@shelf-{name}-1", shelved_from="running"))
    for name in ("m2", "m3"):
        rig.agents.hosts["h1"].disks.add(name)
        rig.store.put_manifest(f"@shelf-{name}-1", Manifest([]), replace=True)
    rig.agents.inject = Inject(at=1, when="before")  # the first member's first call
    first = await rig.ops.begin("unshelve-group", "grp", {"names": ["m", "m2", "m3"],
                                                           "parallel": 2})
    done = await rig.ops.wait(first.id)
    assert done.state == OpState.SUCCEEDED and done.result is not None
    members = {m["name"]: m for m in done.result["members"]}
    assert sorted(members) == ["m", "m2", "m3"]
    states = sorted(m["state"] for m in members.values())
    assert states == ["rolled_back", "succeeded", "succeeded"], members
    failed = next(m for m in members.values() if m["state"] == "rolled_back")
    assert "injected" in failed["error"] and failed["op"]
    with rig.sessions() as s:
        rows = {i.name: (i.state, i.host) for i in s.scalars(sa.select(Instance))}
    assert rows[failed["name"]] == ("shelved", None)  # as it was
    assert sorted(rows[n] for n in members if n != failed["name"]) == \
        [("running", "h1"), ("running", "h1")]
    assert not rig.fleet.locks.busy("group:grp") and not list(rig.fleet.locks.instances)


async def test_an_unshelve_group_refuses_what_is_not_shelved_before_recording(rig: Rig
                                                                             ) -> None:
    setup(rig, CASES["migrate-warm"])  # "m" runs
    from corral.errors import CorralError

    with pytest.raises(CorralError, match="cannot unshelve instance 'm': it is running"):
        await rig.ops.begin("unshelve-group", "grp", {"names": ["m"]})
    with pytest.raises(CorralError, match="no instance named 'ghost'"):
        await rig.ops.begin("unshelve-group", "grp", {"names": ["m", "ghost"]})
    assert rig.ops.store.list() == [] and rig.agents.calls == []


async def test_a_target_that_cannot_take_a_running_instance_gets_a_warm_migration(
        rig: Rig) -> None:
    case = CASES["migrate-live"]
    setup(rig, case)
    with rig.sessions.begin() as s:
        h2 = s.get(Host, "h2")
        assert h2 is not None
        h2.drivers = {"process": {}}  # an older agent, say
    rec = await run(rig, case)
    assert rec.state == OpState.SUCCEEDED, rec.error
    verbs = [v for _, v in rig.agents.calls]
    assert "live_send" not in verbs and "disk_send" in verbs and "start" in verbs
    assert rec.result is not None and rec.result["live"] is False
    assert row(rig) == {"host": "h2", "state": "running", "desired_state": "running",
                        "disk_host": None, "shelf": None}
