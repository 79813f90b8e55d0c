"""One conformance suite for every disk backend (Litestream's RunWithReplicaClient, Nomad's
harness), run against each one in ``corral.disks.registry.BUILTIN`` that is usable here.

Each backend is driven through ``agent.disks.HostDisks``, the only way the agent uses one, on two
hosts' roots over the real data channel: dir on a small tmpfs (plain directories when not root),
btrfs on loop filesystems (``loopfs.py``). What a backend must do: make, publish and delete a
disk with all it keeps for it; land exactly the frozen tree of a running writer; move only what
changed on a second refresh; adopt a copy and demote a disk; survive a cut-off pass with no
truncated file and the previous copy intact; let the agent drop leftovers at start; refuse what
it cannot do. Where backends may differ, the test asks ``capabilities``, never the name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from diskharness import (
    SITES,
    Pair,
    copy_of,
    digest,
    fill_up,
    host,
    make_disk,
    target,
    unmount_all,
)

from corral.agent.disks import make_shapes
from corral.disks import registry
from corral.disks.base import DiskBackend
from corral.disks.rsync import TransferFailed
from corral.disks.tree import fs_type
from corral.drivers.base import Spec
from corral.drivers.cgroups import remove_scope
from corral.drivers.process import ProcessDriver
from corral.errors import ConfigError, Conflict, InvalidRequest, NotFound

#: about 100 writes a second, as bench/standby.py's writer: faster, a loaded loop btrfs can hold
#: the writer in the kernel (D state) through a commit longer than the freezer waits
WRITER = ("i=0; while :; do i=$((i+1)); echo $i > f$((i % 200)); echo $i >> journal; "
          "sleep 0.01; done")
MB = 1024 * 1024


@pytest.fixture(params=list(registry.BUILTIN))
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    kind = str(request.param)
    site = SITES.get(kind)
    assert site is not None, f"add a Site for the {kind} backend to diskharness.SITES"
    if why := site.unusable():
        pytest.skip(f"{kind}: {why}")
    mounts: list[Path] = []
    p: Pair | None = None
    try:
        roots = []
        for label in ("a", "b"):
            root, mnt = site.make_root(tmp_path, label)
            roots.append(root)
            if mnt is not None:
                mounts.append(mnt)
        key = Ed25519PrivateKey.generate()
        hosts = [host(kind, r / "disks", tmp_path / f"state-{n}", n, key, tmp_path)
                 for n, r in zip("ab", roots, strict=True)]
        p = Pair(kind, hosts[0], hosts[1], tmp_path, bounded=len(mounts) == 2, key=key,
                 hosts=hosts)
        for h in hosts:
            await h.start()
        yield p
    finally:
        for h in p.hosts if p is not None else []:
            await h.stop()
        unmount_all(mounts)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def refresh(p: Pair, name: str, slot: str = "standby") -> tuple[int, int]:
    """A live pass then a frozen one of a disk no instance runs on; bytes of each."""
    tgt = target(p.b, name, slot)
    live = await p.send(name, tgt, "live", "", None, None)
    frozen = await p.send(name, tgt, "frozen", live.gen, None, None)
    p.b.prune_received(name, slot)
    return live.bytes_sent, frozen.bytes_sent


async def test_the_backend_is_a_plugin_of_the_registry(pair: Pair, tmp_path: Path) -> None:
    backend = pair.a.backend
    assert isinstance(backend, DiskBackend)
    assert backend.name == pair.kind == pair.a.kind
    assert isinstance(backend, type(registry.make_backend(pair.kind, pair.a.root)))
    assert backend.available() is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        backend.capabilities.incremental = True  # type: ignore[misc]
    need = backend.capabilities.needs_filesystem
    elsewhere = tmp_path / "plain"
    elsewhere.mkdir()
    if need is not None and fs_type(elsewhere) != need:
        why = registry.BUILTIN[pair.kind](elsewhere).available()
        assert why is not None and need in why
        with pytest.raises(ConfigError, match=f"disk_backend {pair.kind}") as err:
            registry.make_backend(pair.kind, elsewhere)
        assert f"point disk_root at a {need} filesystem" in err.value.hint


async def test_make_publish_delete(pair: Pair) -> None:
    fill = pair.a.new_dir("web")
    assert fill.parent.name == ".new" and list(fill.iterdir()) == []
    (fill / "index.html").write_text("hello")
    disk = pair.a.publish("web", fill)
    assert disk == pair.a.path("web") and pair.a.exists("web") and not fill.exists()
    assert stat.S_IMODE(disk.stat().st_mode) == 0o711
    assert (disk / "index.html").read_text() == "hello"
    await refresh(pair, "web")  # so the backend keeps something for it between passes
    pair.a.delete("web")
    assert not pair.a.exists("web")
    left = [str(p) for p in pair.a.root.rglob("*") if p.name.startswith("web")]
    assert left == []  # snapshots and all
    pair.a.delete("web")  # again: nothing to do
    assert copy_of(pair.b, "web", "standby") == {"index.html": sha256(b"hello")}  # untouched


async def test_refresh_of_a_running_writer_lands_the_frozen_tree(pair: Pair,
                                                                 tmp_path: Path) -> None:
    root = make_disk(pair.a, "web")
    scope = f"t{os.getpid()}"
    drv = ProcessDriver(scope=scope)
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
            live = await pair.send("web", tgt, "live", "", None, None)
            res = await pair.send("web", tgt, "frozen", live.gen, freeze, thaw)
            pair.b.prune_received("web", "standby")
            assert res.freeze_ms is not None and res.freeze_ms > 0
            copies.append(res)
            if pair.caps.incremental:  # the newest received snapshot only
                assert len(list(pair.b.slot("web", "standby").iterdir())) == 1
            assert copy_of(pair.b, "web", "standby") == frozen  # journal included
        # dir: the frozen pass took the dirty list; btrfs: an incremental send
        assert not copies[1].full
        assert copies[1].bytes_sent < 200 * 2000
        assert drv.status(handle).state == "running"  # thawed after every pass
    finally:
        drv.stop(handle, 5)
        drv.delete(handle)
        remove_scope(scope)


async def test_a_second_refresh_moves_only_what_changed(pair: Pair) -> None:
    disk = make_disk(pair.a, "web", files=50, size=20_000)
    (disk / "big").write_bytes(os.urandom(8 * MB))
    live, _ = await refresh(pair, "web")
    assert live > 8 * MB  # the first pass moves everything
    (disk / "f3").write_bytes(b"changed")
    (disk / "f4").unlink()
    live, frozen = await refresh(pair, "web")
    assert live + frozen < MB  # only the change, not the 9 MB tree
    assert copy_of(pair.b, "web", "standby") == digest(disk)
    adopted = pair.b.adopt("web", "standby")
    assert digest(adopted) == digest(disk)


async def test_a_live_pass_may_send_a_files_size_only(pair: Pair) -> None:
    """A VM's raw disk in a live migration: QEMU's stream sends every block, so the pass
    leaves it out and says its size (a backend that cannot leave it out sends it, saying
    nothing); the receiver's ``make_shapes`` then has a file of that size either way, and
    refuses to write through anything else in its place."""
    disk = make_disk(pair.a, "vm", files=5, size=1000)
    (disk / "disk.raw").write_bytes(os.urandom(4 * MB))
    tgt = target(pair.b, "vm", "incoming")
    res = await pair.send("vm", tgt, "live", "", None, None, shape_only=("disk.raw", "gone"))
    # no frozen pass follows a VM's: the dir backend starts no inotify tracker for one
    assert "vm" not in getattr(pair.a.backend, "_tracked", {})
    got = pair.b.adopt("vm", "incoming")
    if res.shapes:
        assert res.shapes == {"disk.raw": 4 * MB} and res.bytes_sent < MB
        assert not (got / "disk.raw").exists()
    else:
        assert digest(got)["disk.raw"] == digest(disk)["disk.raw"]
    make_shapes(got, res.shapes)
    make_shapes(got, res.shapes)  # a retried create: the same file is kept
    assert (got / "disk.raw").stat().st_size == 4 * MB
    assert {k: v for k, v in digest(got).items() if k != "disk.raw"} == \
        {k: v for k, v in digest(disk).items() if k != "disk.raw"}
    with pytest.raises(Conflict, match="not the 8-byte file"):
        make_shapes(got, {"disk.raw": 8})
    outside = pair.a.root.parent / f"outside-{os.getpid()}"
    outside.write_bytes(b"x" * 100)
    try:
        (got / "link").symlink_to(outside)
        with pytest.raises(Conflict):
            make_shapes(got, {"link": 8})
        assert outside.read_bytes() == b"x" * 100  # never truncated through the link
    finally:
        outside.unlink()
    with pytest.raises(InvalidRequest):
        make_shapes(got, {"../escape": 8})


async def test_adopt_demote_and_leftovers(pair: Pair) -> None:
    root = make_disk(pair.a, "db", files=20)
    want = digest(root)
    tgt = target(pair.b, "db", "incoming")
    await pair.send("db", tgt, "frozen", "", None, None)
    live = pair.b.adopt("db", "incoming")
    assert live == pair.b.path("db") and digest(live) == want
    assert not pair.b.slot("db", "incoming").exists()
    assert pair.b.adopt("db", "incoming") == live  # idempotent (a retried step)
    pair.b.demote("db")
    assert not pair.b.exists("db")
    assert pair.b.demote("db") == pair.b.slot("db", "standby")  # idempotent
    assert copy_of(pair.b, "db", "standby") == want
    # a crash mid-create and mid-migration leaves .new and .incoming: gone at start
    pair.b.new_dir("half")
    target(pair.b, "half", "incoming")
    (pair.b.slot("half", "incoming") / "partial").write_text("x")
    removed = pair.b.cleanup_leftovers()
    assert ".new/half" in removed and ".incoming/half" in removed
    assert not pair.b.slot("half", "incoming").exists()
    assert copy_of(pair.b, "db", "standby") == want  # a demoted copy is no leftover
    # promoted back: the demoted copy is the live disk again, and refreshes build on it
    assert digest(pair.b.adopt("db", "standby")) == want
    pair.a.delete("db")
    assert not pair.a.exists("db")


async def test_a_cut_off_pass_leaves_no_truncated_file_and_the_previous_copy(
        pair: Pair) -> None:
    if not pair.bounded:
        pytest.skip("needs root: the target must be a filesystem of its own to fill")
    disk = make_disk(pair.a, "web", files=20, size=50_000)
    await refresh(pair, "web")
    before = copy_of(pair.b, "web", "standby")
    (disk / "f1").write_bytes(os.urandom(60_000))
    (disk / "zz-big").write_bytes(os.urandom(24 * MB))  # more than the target has room for
    source = digest(disk)
    filler = fill_up(pair.b.root.parent, leave=4 * MB)
    try:
        tgt = target(pair.b, "web", "standby")
        with pytest.raises(TransferFailed):
            await pair.send("web", tgt, "live", "", None, None)
        after = copy_of(pair.b, "web", "standby")
        assert "zz-big" not in after  # never a truncated file
        for path, sha in after.items():  # every file as it was, or as it is now
            assert sha in (before.get(path), source.get(path)), path
        if pair.caps.incremental:
            assert after == before  # a snapshot arrives whole or not at all
        slot = pair.b.slot("web", "standby")
        assert [p for p in slot.rglob("*") if p.name.startswith(".")] == []
        assert list(Path(str(tgt["temp_dir"])).iterdir()) == []  # no partial file either
    finally:
        filler.unlink()
    await refresh(pair, "web")  # room again: the next refresh completes the copy
    assert copy_of(pair.b, "web", "standby") == source


async def test_a_target_that_lost_the_base_copy(pair: Pair) -> None:
    disk = make_disk(pair.a, "web", files=20)
    await refresh(pair, "web")
    stale = target(pair.b, "web", "standby")  # names what the slot holds now
    pair.b.discard("web", "standby")
    target(pair.b, "web", "standby")  # an empty slot again
    (disk / "f5").write_bytes(b"again")
    if pair.caps.incremental:  # the pass builds on a snapshot the target no longer has
        with pytest.raises(TransferFailed):
            await pair.send("web", stale, "live", "", None, None)
        assert list(pair.b.slot("web", "standby").iterdir()) == []  # nothing half
        await refresh(pair, "web")  # a fresh prepare says what is there: a full pass
    else:  # rsync builds on whatever files are there: it just sends them all
        await pair.send("web", stale, "live", "", None, None)
    assert copy_of(pair.b, "web", "standby") == digest(disk)


async def test_leftovers_of_a_crash_go_at_start(pair: Pair) -> None:
    make_disk(pair.a, "web", files=20)
    await refresh(pair, "web")
    kept = copy_of(pair.b, "web", "standby")
    await pair.b.stop()  # the agent dies mid-work
    pair.b.new_dir("half")
    (pair.b.slot("mig", "incoming")).mkdir(parents=True)
    (pair.b.slot("mig", "incoming") / "f1").write_text("x")
    SITES[pair.kind].leave_partial(pair.b.slot("web", "standby"))
    restarted = pair.restart_b()
    await restarted.start()
    assert not (restarted.root / ".new" / "half").exists()
    assert not restarted.slot("mig", "incoming").exists()
    assert [p.name for p in (restarted.root / ".tmp").iterdir()] == []
    assert copy_of(restarted, "web", "standby") == kept  # whole copies stay
    assert restarted.cleanup_leftovers() == []


async def test_refusals(pair: Pair) -> None:
    with pytest.raises(NotFound, match="no disk"):
        await pair.send("ghost", target(pair.b, "ghost", "incoming"), "live", "", None, None)
    make_disk(pair.a, "x", files=1)
    other = next(k for k in registry.BUILTIN if k != pair.kind)
    with pytest.raises(InvalidRequest, match="same disk_backend"):
        await pair.send("x", {**target(pair.b, "x", "incoming"), "backend": other},
                          "live", "", None, None)
    with pytest.raises(InvalidRequest, match="unknown pass"):
        await pair.send("x", target(pair.b, "x", "incoming"), "warm", "", None, None)
    with pytest.raises(InvalidRequest, match="unknown disk slot"):
        pair.b.recv_prepare("x", "attic")
    with pytest.raises(NotFound, match="no standby copy of 'ghost'"):
        pair.b.adopt("ghost", "standby")
    with pytest.raises(NotFound, match="no disk for 'ghost'"):
        pair.b.demote("ghost")
    make_disk(pair.b, "x", files=1)
    with pytest.raises(InvalidRequest, match="already has a disk for 'x'"):
        pair.b.adopt("x", "incoming")


async def test_a_disk_set_aside_and_made_again_refreshes_from_its_own_changes(
        pair: Pair) -> None:
    first = digest(make_disk(pair.a, "app", files=20))
    await refresh(pair, "app")
    kept = pair.a.set_aside("app")
    assert digest(kept) == first and not pair.a.exists("app")
    disk = make_disk(pair.a, "app", files=10)  # a new disk under the same name
    tgt = target(pair.b, "app", "standby")
    live = await pair.send("app", tgt, "live", "", None, None)
    (disk / "late").write_text("written after the live pass")
    await pair.send("app", tgt, "frozen", live.gen, None, None)
    pair.b.prune_received("app", "standby")
    assert copy_of(pair.b, "app", "standby") == digest(disk)


async def test_a_directory_swapped_for_a_symlink_never_brings_a_host_file_in(
        pair: Pair, tmp_path: Path) -> None:
    """The workload writes ``d/note``, then replaces ``d`` with a symlink to a host
    directory: the frozen pass must copy the symlink as one, never the host's file behind
    it (rsync's --files-from resolves ``d/note`` through ``d``)."""
    disk = make_disk(pair.a, "web", files=3)
    (disk / "d").mkdir()
    (disk / "d" / "note").write_text("the workload's own")
    outside = tmp_path / "host-secrets"
    outside.mkdir()
    (outside / "note").write_text("HOST SECRET")
    tgt = target(pair.b, "web", "standby")
    live = await pair.send("web", tgt, "live", "", None, None)
    (disk / "d" / "note").write_text("changed since the live pass")
    await asyncio.sleep(0.2)  # the tracker hears it
    shutil.rmtree(disk / "d")
    (disk / "d").symlink_to(outside)
    await asyncio.sleep(0.2)
    await pair.send("web", tgt, "frozen", live.gen, None, None)
    pair.b.prune_received("web", "standby")
    copy = pair.b.copy_path("web", "standby")
    assert copy is not None
    assert (copy / "d").is_symlink() and os.readlink(copy / "d") == str(outside)
    for dirpath, _, files in os.walk(copy):  # never following a link
        for f in files:
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                assert b"HOST SECRET" not in p.read_bytes(), f"host file copied in as {p}"


async def test_a_discarded_copy_is_gone_at_once_and_its_files_soon(pair: Pair) -> None:
    make_disk(pair.a, "web", files=50)
    await refresh(pair, "web")
    trash = pair.b.root / ".trash"
    pair.b.discard("web", "standby")
    assert not pair.b.slot("web", "standby").exists()  # gone before the call returned
    deadline = time.monotonic() + 30
    while trash.is_dir() and any(trash.iterdir()):  # removed by a thread of its own
        assert time.monotonic() < deadline, list(trash.iterdir())
        time.sleep(0.05)
    # what a crash left in the trash goes at the next start
    (trash / "web.standby.left").mkdir(parents=True)
    (trash / "web.standby.left" / "f").write_text("x")
    pair.b.cleanup_leftovers()
    assert list(trash.iterdir()) == []
