"""rsync over the agents' data channel (real rsync, real sockets on loopback), in clear with
tickets; what tickets refuse and the channel over TLS: test_data_channel_tickets.py."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from channelkit import Receiver, digest, receiver, rsync

from corral.disks.channel import check_argv
from corral.disks.rsync import Endpoint

pytestmark = pytest.mark.skipif(not Path("/usr/bin/rsync").exists(), reason="rsync not installed")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    for i in range(30):
        (src / "a" / f"f{i}").write_bytes(os.urandom(1000 + i * 500))
    (src / "a" / "b" / "big").write_bytes(os.urandom(3 * 1024 * 1024))
    return src


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[Receiver]:
    async with receiver(tmp_path) as rx:
        yield rx


def endpoint(rx: Receiver) -> Endpoint:
    return Endpoint("127.0.0.1", rx.port, str(rx.slot()), rx.ticket())


async def test_rsync_through_channel_copies_tree(channel: Receiver, tree: Path) -> None:
    dest = channel.slot()
    assert (await rsync(tree, dest, channel.port, channel.ticket()))[0] == 0
    assert digest(dest) == digest(tree)
    (tree / "a" / "f3").unlink()
    (tree / "a" / "new").write_bytes(b"x" * 10)
    assert (await rsync(tree, dest, channel.port, channel.ticket()))[0] == 0
    assert digest(dest) == digest(tree)


async def test_outside_paths_are_refused(tmp_path: Path, tree: Path,
                                         channel: Receiver) -> None:
    elsewhere = tmp_path / "elsewhere"
    code, err = await rsync(tree, elsewhere, channel.port, channel.ticket())
    assert code != 0 and "outside the slot" in err
    assert not elsewhere.exists()


def test_argv_rules(tmp_path: Path) -> None:
    slot, temp = tmp_path / ".standby" / "i", tmp_path / ".tmp" / "i.standby"
    places = [slot, temp]
    d = str(slot)
    ok = ["rsync", "--server", "-lHogDtpAXre.iLsfxCIvu", "--delete", "-@-1", "--numeric-ids"]
    assert check_argv([*ok, "--temp-dir", str(temp), ".", d], places) is None
    assert check_argv([*ok, "--temp-dir", str(temp), ".", f"{d}/sub"], places) is None
    assert check_argv(["rsync", "--server", "--sender", "-a", ".", d], places) is not None
    assert check_argv(["rsync", "--server", "--log-file=/etc/x", ".", d], places) is not None
    assert check_argv(["rsync", "--server", "--log-file=x", ".", d], places) is not None
    assert check_argv(["rsync", "--server", ".", "/etc"], places) is not None
    assert check_argv(["rsync", "--server", ".", str(temp)], places) is not None  # not a slot
    assert check_argv(["rsync", "--server", ".", str(tmp_path / "i")], places) is not None
    assert check_argv(["rsync", "--server", ".", f"{d}/../../etc"], places) is not None
    assert check_argv(["rsync", "--server", d], places) is not None  # not '. DEST'
    for bad in (["--temp-dir", "/tmp"], ["--temp-dir=/tmp"], ["--temp-dir", "rel"],
                ["--partial-dir", "/tmp/p"], ["--partial-dir=.p"], ["--backup-dir", ".."],
                ["--link-dest=/"], ["--temp-dir"], ["-logKDtpre.iLsfxC"], ["-Trel"],
                ["-logT/tmp"], ["stray"], ["--chmod=/etc"], ["--keep-dirlinks"],
                ["--files-from=-"], ["-"]):
        assert check_argv([*ok, *bad, ".", d], places) is not None, bad
    assert check_argv([*ok, f"--partial-dir={temp}/p", ".", d], places) is None
    assert check_argv(["sh", "-c", "id"], places) is not None
    assert check_argv(["btrfs", "receive", d], places) is None
    assert check_argv(["btrfs", "receive", "-e", "--quiet", d], places) is None
    assert check_argv(["btrfs", "receive", str(temp)], places) is not None
    assert check_argv(["btrfs", "receive", "/"], places) is not None
    assert check_argv(["btrfs", "receive", d, d], places) is not None


async def test_dirty_pass_moves_only_changed_paths(channel: Receiver, tree: Path) -> None:
    from corral.disks.dirty import DirtyTracker
    from corral.disks.rsync import run_pass

    tracker = DirtyTracker(tree)
    tracker.start()
    try:
        ep = endpoint(channel)
        dest = Path(ep.path)
        first = await run_pass(tree, ep)
        assert first.files == 31
        tracker.take()  # the list starts after the full pass
        (tree / "a" / "f1").write_bytes(b"changed")
        (tree / "a" / "f2").unlink()
        (tree / "a" / "c").mkdir()
        (tree / "a" / "c" / "inner").write_bytes(b"new")
        await asyncio.sleep(0.1)
        dirty = tracker.take()
        assert not dirty.overflowed
        result = await run_pass(tree, ep, dirty.paths)
        assert result.files == 2  # f1 and c/inner; nothing else was read or sent
        assert digest(dest) == digest(tree)
        assert not (dest / "a" / "f2").exists()
    finally:
        tracker.stop()


async def test_a_same_size_rewrite_in_the_same_second_is_sent(channel: Receiver,
                                                             tree: Path) -> None:
    """A file rewritten after a pass copied it, keeping its size, with an mtime in the same
    second (a database page or WAL segment written again right after a standby refresh):
    the next live pass must send it. rsync compares whole seconds unless told otherwise."""
    from corral.disks.rsync import run_pass

    ep = endpoint(channel)
    f = tree / "a" / "f7"
    second = f.stat().st_mtime_ns // 1_000_000_000 * 1_000_000_000
    os.utime(f, ns=(second, second + 1_000))
    await run_pass(tree, ep)
    f.write_bytes(os.urandom(f.stat().st_size))
    os.utime(f, ns=(second, second + 2_000))  # the same second, as quick rewrites are
    result = await run_pass(tree, ep)
    assert result.files == 1
    assert digest(Path(ep.path)) == digest(tree)
