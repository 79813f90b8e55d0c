"""A kept disk is removed from its host only once the store's copy of it is verified whole:
every chunk of the shelf's manifest present and reading back as its id says. Both ways a disk
goes (the offload loop, and shelve's own offload step with ``offload_after`` 0) check first;
while the copy is damaged the disk stays where it is, the one good copy left."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from fakefleet import Copy, FakeAgents, FakeHost
from sqlalchemy.orm import Session, sessionmaker

from corral.bus import rpc
from corral.config import Settings
from corral.control.db import Host, Instance, open_db
from corral.control.fleet import Fleet
from corral.control.operations.runner import Operations
from corral.control.shelves import Shelves
from corral.images.store import ImageStore
from corral.images.tree import Entry, Manifest
from corral.ops.store import OpState

GiB = 1024**3


@dataclass
class Rig:
    sessions: sessionmaker[Session]
    fleet: Fleet
    ops: Operations
    shelves: Shelves
    agents: FakeAgents
    store: ImageStore


def build(tmp_path: Path, agents_cls: type[FakeAgents]) -> Iterator[Rig]:
    settings = Settings(data_dir=tmp_path)
    db, sessions = open_db(settings)
    fleet = Fleet(sessions, settings)
    store = ImageStore(tmp_path / "images")
    agents = agents_cls({"h1": FakeHost(), "h2": FakeHost()}, store)
    ops = Operations(db, fleet, agents, settings, images=lambda: store)  # type: ignore[arg-type]
    ops.engine.retry_delay = 0.001
    shelves = Shelves(fleet, agents, settings, ops, lambda: store)  # type: ignore[arg-type]
    with sessions.begin() as s:
        for name in ("h1", "h2"):
            s.add(Host(name=name, address="127.0.0.1", cores=2, memory_bytes=4 * GiB,
                       disk_bytes=10 * GiB, drivers={"process": {}}, state="up",
                       data_port=7000, disk_backend="dir", lease_expires_at=2e9))
    try:
        yield Rig(sessions, fleet, ops, shelves, agents, store)
    finally:
        store.close()
        db.dispose()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from build(tmp_path, FakeAgents)


def shelf_manifest(store: ImageStore) -> tuple[Manifest, bytes]:
    """A one-file manifest whose chunk is stored; and that chunk's id."""
    data = os.urandom(50_000)
    cid = store.packs.put(data)
    f = Entry("data", "f", 0o644, 0, 0, 1, size=len(data), extents=[[0, [cid.hex()]]])
    return Manifest([Entry(".", "d", 0o755, 0, 0, 1), f]), cid


def damage(store: ImageStore, cid: bytes) -> None:
    """Flip a byte of a stored chunk behind the store's back (bit rot, a bad disk)."""
    loc = store.packs.locate(cid)
    assert loc is not None
    pack = store.packs.root / "packs" / f"pack-{loc.pack:08d}.dat"
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + 3] ^= 0xFF
    pack.write_bytes(bytes(raw))


def lose(store: ImageStore, cid: bytes) -> None:
    """Drop a chunk from the index (what a gc racing a push did)."""
    keep = {c for c, _ in store.packs if c != cid}
    store.packs.sweep(keep, min_dead_ratio=1.0)
    assert store.packs.locate(cid) is None


def shelved(rig: Rig, name: str, shelf: str, offload_at: float = 1.0) -> None:
    with rig.sessions.begin() as s:
        s.add(Instance(name=name, host=None, driver="process", command=["sleep", "60"],
                       cpus=0.5, memory_bytes=64 * 2**20, desired_state="shelved",
                       state="shelved", epoch=3, created_at=1.0, updated_at=2.0,
                       disk_host="h1", shelf=shelf, shelved_from="running",
                       offload_at=offload_at))
    rig.agents.hosts["h1"].disks.add(name)


def disk_host(rig: Rig, name: str) -> str | None:
    with rig.sessions() as s:
        inst = s.get(Instance, name)
        assert inst is not None
        return inst.disk_host


@pytest.mark.parametrize("harm", [damage, lose])
async def test_the_offload_loop_keeps_a_disk_whose_store_copy_is_not_whole(rig: Rig,
                                                                           harm: object
                                                                           ) -> None:
    m, cid = shelf_manifest(rig.store)
    rig.store.put_manifest("@shelf-bad-00000001", m)
    shelved(rig, "bad", "@shelf-bad-00000001")
    good, _ = shelf_manifest(rig.store)
    rig.store.put_manifest("@shelf-good-00000001", good)
    shelved(rig, "good", "@shelf-good-00000001")
    harm(rig.store, cid)  # type: ignore[operator]

    assert await rig.shelves.offload_due() == ["good"]
    assert "bad" in rig.agents.hosts["h1"].disks  # the only good copy stays
    assert "good" not in rig.agents.hosts["h1"].disks
    assert disk_host(rig, "bad") == "h1" and disk_host(rig, "good") is None
    assert ("h1", rpc.DISK_DROP.verb) in rig.agents.calls  # for good only
    drops = [c for c in rig.agents.calls if c[1] == rpc.DISK_DROP.verb]
    assert len(drops) == 1
    assert await rig.shelves.offload_due() == []  # and it stays, pass after pass
    assert "bad" in rig.agents.hosts["h1"].disks


class DamagingAgents(FakeAgents):
    """Agents whose disk push names a shelf whose chunk the store then loses."""

    def _disk_push(self, h: FakeHost, host: str, a: rpc.PushArgs) -> rpc.PushResult:
        assert self.store is not None
        m, cid = shelf_manifest(self.store)
        self.store.put_manifest(a.image, m)
        damage(self.store, cid)
        return rpc.PushResult(uploaded_chunks=1, uploaded_bytes=50_000)


@pytest.fixture
def damaging(tmp_path: Path) -> Iterator[Rig]:
    yield from build(tmp_path, DamagingAgents)


def running(rig: Rig) -> None:
    with rig.sessions.begin() as s:
        s.add(Instance(name="m", host="h1", driver="process", command=["sleep", "60"],
                       cpus=0.5, memory_bytes=64 * 2**20, desired_state="running",
                       state="running", epoch=3, created_at=1.0, updated_at=2.0))
    rig.agents.hosts["h1"].instances["m"] = Copy("running", 3)
    rig.agents.hosts["h1"].disks.add("m")


async def test_shelve_with_offload_0_keeps_the_disk_when_the_store_copy_is_damaged(
        damaging: Rig) -> None:
    rig = damaging
    running(rig)
    first = await rig.ops.begin("shelve", "m", {"offload_after": 0})
    rec = await rig.ops.wait(first.id)
    assert rec.state == OpState.SUCCEEDED, rec.error  # shelved; the disk just stays
    assert "m" in rig.agents.hosts["h1"].disks
    assert disk_host(rig, "m") == "h1"
    assert not any(c[1] == rpc.DISK_DROP.verb for c in rig.agents.calls)
    assert await rig.shelves.offload_due() == []  # nor does the loop take it later
    assert "m" in rig.agents.hosts["h1"].disks


async def test_shelve_with_offload_0_drops_a_verified_copy_at_once(rig: Rig) -> None:
    running(rig)
    first = await rig.ops.begin("shelve", "m", {"offload_after": 0})
    rec = await rig.ops.wait(first.id)
    assert rec.state == OpState.SUCCEEDED, rec.error
    assert "m" not in rig.agents.hosts["h1"].disks
    assert disk_host(rig, "m") is None
    with rig.sessions() as s:
        assert s.scalar(sa.select(Instance.state).where(Instance.name == "m")) == "shelved"


async def test_an_old_copy_of_an_instance_back_elsewhere_goes_without_a_shelf(rig: Rig
                                                                             ) -> None:
    """Unshelved on another host, the instance has its own disk there and no shelf any more:
    the copy left on the old host is an old one and goes at once."""
    with rig.sessions.begin() as s:
        s.add(Instance(name="back", host="h2", driver="process", command=["sleep", "60"],
                       cpus=0.5, memory_bytes=64 * 2**20, desired_state="running",
                       state="running", epoch=4, created_at=1.0, updated_at=2.0,
                       disk_host="h1", shelf=None, offload_at=1.0))
    rig.agents.hosts["h1"].disks.add("back")
    assert await rig.shelves.offload_due() == ["back"]
    assert "back" not in rig.agents.hosts["h1"].disks and disk_host(rig, "back") is None


async def test_a_shelved_instance_without_a_shelf_keeps_its_disk(rig: Rig) -> None:
    shelved(rig, "odd", "")
    assert await rig.shelves.offload_due() == []
    assert "odd" in rig.agents.hosts["h1"].disks
