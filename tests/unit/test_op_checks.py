"""Refused operations change nothing (issue 15, item 7), and a migration without ``--to`` keeps
off the standby's host (item 8).

Every operation kind is refused in its first step, on a real (SQLite) database with the
server's own objects (``Operations``, ``Shelves``) and agents that only record calls: once
through the engine's check (the request raises, nothing is recorded), and once with the check
left out, as when the fleet changes between check and plan (the operation rolls back, and its
undos leave the instance and standby records exactly as they were).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from corral.bus import rpc
from corral.config import Settings
from corral.control.db import Host, Instance, Standby, open_db
from corral.control.fleet import Fleet
from corral.control.operations.migrate import KIND as MIGRATE
from corral.control.operations.migrate import Migrate, pick_target
from corral.control.operations.runner import Operations
from corral.control.shelves import Shelves
from corral.errors import Conflict, CorralError, InvalidRequest, NoCapacity
from corral.ops.engine import Check, Engine, Kind, OpContext, Step
from corral.ops.hooks import Hooks
from corral.ops.store import OperationStore, OpRecord, OpState, StepState
from corral.scheduling.placement import HostSnapshot, Request

GiB = 1024**3


class RecordingAgents:
    """Stands in for ``AgentCaller``: a refusal must not reach any agent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def call(self, host: str, call: rpc.Call[Any, Any], args: BaseModel) -> Any:
        self.calls.append((host, call.verb, args.model_dump()))
        raise AssertionError(f"a refused operation called {call.verb} on {host}")


@dataclass
class Server:
    sessions: sessionmaker[Session]
    fleet: Fleet
    ops: Operations
    agents: RecordingAgents



class Refusable(BaseModel):
    refuse: bool = False


def check_of(server: Server, kind: str) -> Check:
    check = server.ops.engine.kinds[kind].check
    assert check is not None
    return check


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    settings = Settings(data_dir=tmp_path)
    db, sessions = open_db(settings)
    fleet = Fleet(sessions, settings)
    agents = RecordingAgents()
    ops = Operations(db, fleet, agents, settings)  # type: ignore[arg-type]
    Shelves(fleet, agents, settings, ops, lambda: None)  # type: ignore[arg-type]
    with sessions.begin() as s:
        for name in ("h1", "h2", "h3"):
            s.add(Host(name=name, address="127.0.0.1", cores=2, memory_bytes=4 * GiB,
                       disk_bytes=10 * GiB, drivers={"process": {}}, state="up",
                       data_port=7000, disk_backend="dir", lease_expires_at=2e9))
    yield Server(sessions, fleet, ops, agents)
    db.dispose()


def add(server: Server, name: str, state: str, host: str | None = "h1", *, cpus: float = 0.5,
        standby: str | None = None, synced: bool = True, **fields: Any) -> None:
    with server.sessions.begin() as s:
        desired = {"frozen": "frozen", "shelved": "shelved"}.get(state, "running")
        s.add(Instance(name=name, host=host, driver="process", command=["sleep", "60"],
                       cpus=cpus, memory_bytes=64 * 2**20, desired_state=desired, state=state,
                       pid=4242 if state in ("running", "frozen") else None, epoch=3,
                       created_at=100.0, updated_at=200.0, **fields))
        s.flush()
        if standby is not None:
            s.add(Standby(instance=name, host=standby, every_seconds=60.0, state="ready",
                          data_at=150.0 if synced else None, last_sync_at=150.0,
                          created_at=100.0, total_bytes=0, syncs=1, last_error=""))


def rows(server: Server, name: str) -> dict[str, Any]:
    """Every column of the instance's row and of its standby's (None when it has none)."""
    with server.sessions() as s:
        out: dict[str, Any] = {}
        for table in (Instance, Standby):
            row = s.get(table, name)
            out[table.__tablename__] = None if row is None else {
                c.key: getattr(row, c.key) for c in sa.inspect(table).columns}
        return out


#: (kind, instance, params, how to set it up, what the refusal says); one per operation kind,
#: each refused by its first step
REFUSALS: list[tuple[str, str, dict[str, Any], dict[str, Any], str]] = [
    ("recreate", "rc", {"to": None}, {"state": "frozen"},
     "cannot recreate instance 'rc': it is frozen"),
    ("migrate", "mg", {"to": "h1", "cold": False}, {"state": "running"},
     "instance 'mg' already runs on h1"),
    ("standby-sync", "sy", {}, {"state": "frozen", "standby": "h2"},
     "cannot sync instance 'sy': it is frozen"),
    ("standby-promote", "pr", {}, {"state": "running", "standby": "h2", "synced": False},
     "the standby of 'pr' on h2 was never synced"),
    ("failover", "fo", {"from": "h1"}, {"state": "running", "standby": "h2"},
     "instance 'fo' is on h1, which is up: no failover"),
    ("shelve", "sh", {"offload_after": None}, {"state": "running", "standby": "h2"},
     "instance 'sh' has a warm standby"),
    # the issue's own scenario: running on h1 with a standby on h2, then "corral unshelve"
    ("unshelve", "un", {"to": None}, {"state": "running", "standby": "h2"},
     "cannot unshelve instance 'un': it is running"),
]
IDS = [r[0] for r in REFUSALS]


@pytest.mark.parametrize(("kind", "name", "params", "setup", "says"), REFUSALS, ids=IDS)
async def test_refused_request_records_nothing_and_changes_nothing(
        server: Server, kind: str, name: str, params: dict[str, Any], setup: dict[str, Any],
        says: str) -> None:
    add(server, name, **setup)
    before = rows(server, name)
    with pytest.raises(CorralError) as refused:
        await server.ops.begin(kind, name, params)
    assert says in refused.value.message
    assert refused.value.hint  # says what to do instead
    assert 400 <= refused.value.http_status < 500
    assert rows(server, name) == before
    assert server.ops.store.list(target=name) == []  # no operation record at all
    assert server.agents.calls == []
    assert name not in server.fleet.locks.instances  # free for the next request


@pytest.mark.parametrize(("kind", "name", "params", "setup", "says"), REFUSALS, ids=IDS)
async def test_plan_refusing_after_a_passed_check_rolls_back_without_a_trace(
        server: Server, kind: str, name: str, params: dict[str, Any], setup: dict[str, Any],
        says: str) -> None:
    """The fleet changed between check and plan (simulated by leaving the check out): the
    plan refuses, and no undo may revert what its ``do`` never did."""
    add(server, name, **setup)
    before = rows(server, name)
    unchecked = Engine(server.ops.store, Hooks(server.ops.hooks_dir), retry_delay=0.01)
    for known in server.ops.engine.kinds.values():
        unchecked.register(dataclasses.replace(known, check=None))
    rec = await unchecked.submit(kind, name, params)
    assert rec.state == OpState.ROLLED_BACK, rec.error
    assert rec.error is not None and rec.error["step"] == "plan" and says in rec.error["message"]
    assert rec.steps[0].state == StepState.UNDONE
    assert rows(server, name) == before
    assert server.agents.calls == []


def test_every_kind_has_a_check(server: Server) -> None:
    kinds = server.ops.engine.kinds
    assert all(k.check is not None for k in kinds.values())
    assert set(IDS) <= set(kinds)


async def test_a_check_runs_before_anything_is_recorded(tmp_path: Path) -> None:
    store = OperationStore(sa.create_engine(f"sqlite:///{tmp_path / 'ops.db'}"), create=True)
    engine = Engine(store, Hooks(tmp_path / "hooks"))
    ran: list[str] = []

    async def do(ctx: OpContext) -> None:
        ran.append(ctx.record.target)

    def check(target: str, params: dict[str, Any]) -> None:
        if params.get("refuse"):
            raise Conflict(f"'{target}' says no", hint="ask again nicely")

    engine.register(Kind("demo", lambda rec: [Step("only", do)], Refusable, check=check))
    with pytest.raises(Conflict, match="'web' says no"):
        await engine.submit("demo", "web", {"refuse": True})
    assert store.list() == [] and ran == []
    done = await engine.submit("demo", "web", {})
    assert done.state == OpState.SUCCEEDED and ran == ["web"]


# --- item 8: a migration without --to ---------------------------------------------------------


def hosts(**free: float) -> list[HostSnapshot]:
    """Two-core hosts with ``free`` cores each (in name order)."""
    return [HostSnapshot(name=n, up=True, cores=2, memory_bytes=4 * GiB,
                         reserved_cpus=2 - f, drivers=frozenset({"process"}))
            for n, f in free.items()]


REQ = Request(0.5, 64 * 2**20, "process", avoid=frozenset({"h1"}))


def test_without_to_the_standby_host_is_avoided_even_when_it_is_the_emptiest() -> None:
    assert pick_target("web", REQ, "h2", hosts(h1=1.5, h2=2.0, h3=1.0)) == "h3"
    assert pick_target("web", REQ, None, hosts(h1=1.5, h2=2.0, h3=1.0)) == "h2"


@pytest.mark.parametrize("fleet", [hosts(h1=1.5, h2=2.0), hosts(h1=1.5, h2=2.0, h3=0.25)],
                         ids=["two-hosts", "third-host-full"])
def test_when_only_the_standby_host_fits_the_error_says_so_and_suggests_promote(
        fleet: list[HostSnapshot]) -> None:
    with pytest.raises(NoCapacity) as refused:
        pick_target("web", REQ, "h2", fleet)
    err = refused.value
    assert "h2 (which holds its standby)" in err.message
    assert "corral standby promote web" in err.hint
    assert err.details["standby"] == "h2"
    expected = {"h3": "needs 0.5 cpus, 0.25 free"} if len(fleet) == 3 else {}
    assert err.details["shortfall"] == expected
    if expected:
        assert "h3: needs 0.5 cpus, 0.25 free" in err.message


async def test_migrate_plan_goes_past_the_standby_host(server: Server) -> None:
    """Through the plan itself: h2 holds the standby and is the emptiest host; h3 takes it."""
    add(server, "mv", "running", standby="h2")
    add(server, "filler", "running", host="h3")  # h3 is now the fuller of the two
    migrate = Migrate(server.fleet, server.agents, server.fleet.settings)  # type: ignore[arg-type]
    rec = OpRecord(kind=MIGRATE, target="mv", params={"to": None})
    await migrate.build(rec)[0].do(OpContext(server.ops.engine, rec))
    assert (rec.data["source"], rec.data["target"]) == ("h1", "h3")


async def test_migrate_without_room_but_the_standby_host_is_refused_with_promote(
        server: Server) -> None:
    add(server, "mv", "running", standby="h2")
    add(server, "big", "running", host="h3", cpus=2.0)
    with pytest.raises(NoCapacity) as refused:
        await server.ops.begin(MIGRATE, "mv", {"to": None})
    assert "corral standby promote mv" in refused.value.hint
    assert server.ops.store.list(target="mv") == []


def test_an_explicit_to_the_standby_host_is_still_refused(server: Server) -> None:
    add(server, "mv", "running", standby="h2")
    with pytest.raises(Conflict, match="h2 holds the standby of 'mv'"):
        check_of(server, MIGRATE)("mv", {"to": "h2"})
    with pytest.raises(InvalidRequest, match="already runs on h1"):
        check_of(server, MIGRATE)("mv", {"to": "h1"})
