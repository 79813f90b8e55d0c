"""Two hosts' disks (``agent.disks.HostDisks``) over the real data channel, for both backends:
a refresh of a disk a real process keeps writing lands a copy equal to the frozen source; the
frozen pass takes only the dirty list (dir) or an incremental send (btrfs); the copy can be
adopted as a live disk and demoted again; and what a crash leaves half-made goes at start."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from loopfs import loop_btrfs, unmount

from corral.agent.disks import HostDisks
from corral.drivers.base import Spec
from corral.drivers.process import ProcessDriver

TOKEN = "t-" + uuid.uuid4().hex
#: about 100 writes a second, as bench/standby.py's writer: faster, a loaded loop btrfs can hold
#: the writer in the kernel (D state) through a commit longer than the freezer waits
WRITER = ("i=0; while :; do i=$((i+1)); echo $i > f$((i % 200)); echo $i >> journal; "
          "sleep 0.01; done")


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Pair:
    a: HostDisks
    b: HostDisks


@pytest.fixture(params=["dir", "btrfs"])
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    kind = str(request.param)
    mounts: list[Path] = []
    if kind == "btrfs":
        if os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None:
            pytest.skip("btrfs needs root and btrfs-progs")
        mounts = [loop_btrfs(tmp_path, "a"), loop_btrfs(tmp_path, "b")]
        roots = mounts
    else:
        if shutil.which("rsync") is None:
            pytest.skip("needs rsync")
        roots = [tmp_path / "a", tmp_path / "b"]
    hosts = [HostDisks(r / "disks", kind, TOKEN, tmp_path / f"state-{i}")
             for i, r in enumerate(roots)]
    try:
        for h in hosts:
            await h.start()
        yield Pair(hosts[0], hosts[1])
    finally:
        for h in hosts:
            await h.stop()
        for m in mounts:
            unmount(m)


def make_disk(h: HostDisks, name: str, files: int = 200) -> Path:
    fill = h.new_dir(name)
    for i in range(files):
        (fill / f"f{i}").write_bytes(os.urandom(2000))
    return h.publish(name, fill)


def target(h: HostDisks, name: str, slot: str) -> dict[str, object]:
    return {**h.recv_prepare(name, slot), "address": "127.0.0.1", "port": h.port}


async def test_refresh_of_a_running_writer_lands_the_frozen_tree(pair: Pair,
                                                                 tmp_path: Path) -> None:
    root = make_disk(pair.a, "web")
    drv = ProcessDriver(scope=f"t{os.getpid()}")
    (tmp_path / "w").mkdir()
    handle = drv.start(drv.create(Spec(name="w", command=["sh", "-c", WRITER],
                                       workdir=str(tmp_path / "w"), rootfs=str(root))))
    frozen: dict[str, str] = {}

    async def freeze() -> None:
        await asyncio.to_thread(drv.freeze, handle)
        await asyncio.sleep(0.05)  # stopped: the tree must not move now
        frozen.clear()
        frozen.update(digest(root))

    async def thaw() -> None:
        await asyncio.to_thread(drv.thaw, handle)

    try:
        await asyncio.sleep(0.2)
        copies = []
        for _ in range(2):
            tgt = target(pair.b, "web", "standby")
            live = await pair.a.send("web", tgt, "live", "", None, None)
            res = await pair.a.send("web", tgt, "frozen", live.gen, freeze, thaw)
            pair.b.prune_received("web", "standby")
            assert res.freeze_ms is not None and res.freeze_ms > 0
            copies.append(res)
            slot = pair.b.slot("web", "standby")
            if pair.b.kind == "btrfs":
                (slot,) = list(slot.iterdir())  # the newest received snapshot only
            assert digest(slot) == frozen  # exactly the frozen source, journal included
        # dir: the frozen pass took the dirty list; btrfs: an incremental send
        assert not copies[1].full
        assert copies[1].bytes_sent < 200 * 2000
    finally:
        from corral.drivers.cgroups import remove_scope

        drv.stop(handle, 5)
        drv.delete(handle)
        remove_scope(f"t{os.getpid()}")


async def test_adopt_demote_and_leftovers(pair: Pair) -> None:
    root = make_disk(pair.a, "db", files=20)
    want = digest(root)
    tgt = target(pair.b, "db", "incoming")
    await pair.a.send("db", tgt, "frozen", "", None, None)
    live = pair.b.adopt("db", "incoming")
    assert live == pair.b.path("db") and digest(live) == want
    assert not pair.b.slot("db", "incoming").exists()
    assert pair.b.adopt("db", "incoming") == live  # idempotent (a retried step)
    pair.b.demote("db")
    assert not pair.b.exists("db")
    if pair.b.kind == "dir":
        assert digest(pair.b.slot("db", "standby")) == want
    # a crash mid-create and mid-migration leaves .new and .incoming: gone at start
    pair.b.new_dir("half")
    target(pair.b, "half", "incoming")
    (pair.b.slot("half", "incoming") / "partial").write_text("x")
    removed = pair.b.cleanup_leftovers()
    assert ".new/half" in removed and ".incoming/half" in removed
    assert not pair.b.slot("half", "incoming").exists()
    pair.a.delete("db")
    assert not pair.a.exists("db")


async def test_send_refuses_a_disk_it_does_not_have_and_a_backend_mix(pair: Pair) -> None:
    from corral.errors import InvalidRequest, NotFound

    with pytest.raises(NotFound, match="no disk"):
        await pair.a.send("ghost", target(pair.b, "ghost", "incoming"), "live", "", None, None)
    make_disk(pair.a, "x", files=1)
    other = "btrfs" if pair.a.kind == "dir" else "dir"
    with pytest.raises(InvalidRequest, match="same disk_backend"):
        await pair.a.send("x", {**target(pair.b, "x", "incoming"), "backend": other},
                          "live", "", None, None)
