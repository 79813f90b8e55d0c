"""btrfs backend on a real loop-mounted btrfs: snapshot, full and incremental send over the
data channel, partial receive cleanup."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopfs import loop_btrfs, unmount

from corral.disks.btrfs import BtrfsBackend
from corral.disks.channel import DataServer
from corral.disks.rsync import Endpoint, TransferFailed

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a loop btrfs"),
    pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="btrfs-progs not installed"),
]


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two separate btrfs filesystems, as two hosts would have (loop devices freed after)."""
    mounts: list[Path] = []
    try:
        mounts.append(loop_btrfs(tmp_path, "a"))
        mounts.append(loop_btrfs(tmp_path, "b"))
        yield mounts[0], mounts[1]
    finally:
        for m in mounts:
            unmount(m)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


async def test_snapshot_and_incremental_send(two_hosts: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    host_a, host_b = two_hosts
    src = BtrfsBackend(host_a / "disks")
    dst = BtrfsBackend(host_b / "disks")
    (host_a / "disks").mkdir()
    (host_b / "disks").mkdir()
    assert src.available() is None
    disk = src.create("web")
    for i in range(50):
        (disk / f"f{i}").write_bytes(os.urandom(20_000))
    (disk / "big").write_bytes(os.urandom(8 * 1024 * 1024))
    token = tmp_path / "token"
    token.write_text("t0k")
    server = DataServer("t0k", [host_b / "disks"])
    await server.start()
    try:
        recv_dir = dst.snap_dir("web")
        recv_dir.mkdir(parents=True)
        ep = Endpoint("127.0.0.1", server.port, token, str(recv_dir))
        s1 = src.snapshot("web", "1")
        full = await src.send(s1, ep)
        assert full.bytes_sent > 8 * 1024 * 1024
        (disk / "f3").write_bytes(b"changed")
        (disk / "f4").unlink()
        s2 = src.snapshot("web", "2")
        inc = await src.send(s2, ep, parent=s1)
        assert inc.bytes_sent < 1024 * 1024  # only the change, not the 9 MB tree
        promoted = dst.promote("web", recv_dir / "web@2")
        assert digest(promoted) == digest(disk)
        # a send to a host that lacks the parent fails and leaves no half snapshot behind
        (disk / "f5").write_bytes(b"again")
        s3 = src.snapshot("web", "3")
        dst.delete("web")  # the target no longer holds the parent anywhere
        other = host_b / "disks" / "other"
        other.mkdir()
        with pytest.raises(TransferFailed):
            await src.send(s3, Endpoint("127.0.0.1", server.port, token, str(other)), parent=s2)
        assert list(other.iterdir()) == []
    finally:
        await server.stop()
        src.delete("web")
        dst.delete("web")
