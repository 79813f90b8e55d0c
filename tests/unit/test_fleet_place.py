"""A plain placement asks the database for a shortlist in the spread's order, and a batch
places many over one snapshot; each must choose what the full rule over the whole snapshot
chooses, on fleets of every shape: hosts down, draining, full, without the driver, with equal
shares (the name decides), and hosts with nothing on them."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from corral.config import Settings
from corral.control import fleet as fleet_mod
from corral.control.db import Host, Instance, open_db
from corral.control.fleet import Fleet
from corral.errors import NoCapacity
from corral.scheduling.placement import HostSnapshot, Placer, Request, place

GiB = 1024**3


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    engine, sessions = open_db(Settings(data_dir=tmp_path))
    try:
        yield engine, sessions
    finally:
        engine.dispose()


def fill(sessions: sessionmaker[Session], rng: random.Random, hosts: int) -> None:
    with sessions.begin() as s:
        for i in range(hosts):
            drivers = {"fake": {}} if rng.random() < 0.8 else {"runc": {}}
            s.add(Host(name=f"h{i:03d}", address="x", cores=rng.choice([0, 2, 4, 8]),
                       memory_bytes=rng.choice([0, 1, 4, 16]) * GiB, disk_bytes=0,
                       drivers=drivers, state="up" if rng.random() < 0.85 else "down",
                       draining=rng.random() < 0.1))
        for j in range(hosts * 3):
            s.add(Instance(name=f"i{j}", host=f"h{rng.randrange(hosts):03d}", driver="fake",
                           command=["x"], cpus=rng.choice([0.25, 0.5, 1.0, 2.0]),
                           memory_bytes=rng.choice([64, 512, 2048]) * 1024**2,
                           desired_state="running", state="running", epoch=1,
                           created_at=1.0, updated_at=1.0))


def choose(f: Fleet, s: Session, req: Request) -> str:
    try:
        return f.place(s, req)
    except NoCapacity:
        return "-"


def full(f: Fleet, s: Session, req: Request) -> str:
    try:
        return place(req, f.snapshot(s))
    except NoCapacity:
        return "-"


@pytest.mark.parametrize("seed", range(12))
def test_the_shortlist_chooses_what_the_full_rule_chooses(
        db: tuple[Engine, sessionmaker[Session]], seed: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, sessions = db
    rng = random.Random(seed)
    fill(sessions, rng, rng.choice([12, 40, 120]))
    monkeypatch.setattr(fleet_mod, "SHORTLIST", rng.choice([1, 2, 32]))
    f = Fleet(sessions, Settings())
    asked = 0
    with sessions.begin() as s:
        for _ in range(60):
            req = Request(rng.choice([0.25, 1.0, 3.0, 9.0]),
                          rng.choice([64, 1024, 8192]) * 1024**2,
                          rng.choice(["fake", "fake", "runc", "qemu"]))
            got, want = choose(f, s, req), full(f, s, req)
            assert got == want, (req, got, want)
            asked += got != "-"
            if got != "-":  # taken, as create writes it: the next choice sees it
                s.add(Instance(name=f"n{seed}-{asked}", host=got, driver=req.driver,
                               command=["x"], cpus=req.cpus, memory_bytes=req.memory_bytes,
                               desired_state="running", state="pending", epoch=1,
                               created_at=1.0, updated_at=1.0))
    assert asked > 0


def test_a_full_fleet_still_says_what_each_host_lacks(
        db: tuple[Engine, sessionmaker[Session]]) -> None:
    _, sessions = db
    with sessions.begin() as s:
        s.add(Host(name="a", address="x", cores=1, memory_bytes=GiB, disk_bytes=0,
                   drivers={"fake": {}}))
        s.add(Host(name="b", address="x", cores=4, memory_bytes=GiB, disk_bytes=0,
                   drivers={"runc": {}}))
    f = Fleet(sessions, Settings())
    with sessions.begin() as s, pytest.raises(NoCapacity) as no:
        f.place(s, Request(2.0, 1024, "fake"))
    assert "needs 2 cpus, 1 free" in str(no.value.details) and "no fake driver" in \
        str(no.value.details)


@pytest.mark.parametrize("seed", range(8))
def test_a_batch_placer_chooses_what_one_placement_after_another_would(seed: int) -> None:
    """Placer.place for each request == place() over the snapshot updated after each."""
    rng = random.Random(seed)
    hosts = [HostSnapshot(name=f"h{i:02d}", up=rng.random() < 0.9,
                          cores=rng.choice([0, 2, 4, 8]),
                          memory_bytes=rng.choice([0, 2, 8]) * GiB,
                          reserved_cpus=rng.choice([0.0, 0.5, 1.0]),
                          reserved_memory=rng.choice([0, 512]) * 1024**2,
                          drivers=frozenset(rng.sample(["fake", "runc", "qemu"], 2)),
                          draining=rng.random() < 0.1)
             for i in range(rng.choice([1, 5, 30]))]
    placer, snap = Placer(hosts), {h.name: h for h in hosts}
    for _ in range(150):
        pin = rng.choice(list(snap)) if rng.random() < 0.1 else None
        req = Request(rng.choice([0.25, 0.5, 2.0]), rng.choice([64, 1024]) * 1024**2,
                      rng.choice(["fake", "runc", "qemu"]), host=pin)
        try:
            want: str | None = place(req, list(snap.values()))
        except NoCapacity as no:
            with pytest.raises(NoCapacity) as got_no:
                placer.place(req)
            assert got_no.value.details == no.details
            continue
        assert placer.place(req) == want
        h = snap[want]
        snap[want] = replace(h, reserved_cpus=h.reserved_cpus + req.cpus,
                             reserved_memory=h.reserved_memory + req.memory_bytes)
    assert placer.hosts == snap
