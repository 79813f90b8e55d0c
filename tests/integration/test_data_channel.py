"""rsync over the agents' authenticated data channel (real rsync, real sockets on loopback)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.disks.channel import DataServer, check_argv

pytestmark = pytest.mark.skipif(not Path("/usr/bin/rsync").exists(), reason="rsync not installed")


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


async def rsync_via_channel(src: Path, dest: Path, token_file: Path, port: int) -> int:
    rsh = f"{sys.executable} -m corral.disks.rsh --port {port} --token-file {token_file}"
    proc = await asyncio.create_subprocess_exec(
        "rsync", "-a", "--delete", "-e", rsh, f"{src}/", f"127.0.0.1:{dest}/",
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode:
        print(err.decode())
    return proc.returncode or 0


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    for i in range(30):
        (src / "a" / f"f{i}").write_bytes(os.urandom(1000 + i * 500))
    (src / "a" / "b" / "big").write_bytes(os.urandom(3 * 1024 * 1024))
    return src


@dataclass
class Channel:
    server: DataServer
    roots: Path  # the receiving agent's disk root
    token_file: Path  # holds the right token

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[Channel]:
    roots = tmp_path / "disks"
    roots.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    server = DataServer("s3cret", [roots])
    await server.start()
    try:
        yield Channel(server, roots, token_file)
    finally:
        await server.stop()


async def test_rsync_through_channel_copies_tree(channel: Channel, tree: Path) -> None:
    dest = channel.roots / "web"
    assert await rsync_via_channel(tree, dest, channel.token_file, channel.port) == 0
    assert digest(dest) == digest(tree)
    (tree / "a" / "f3").unlink()
    (tree / "a" / "new").write_bytes(b"x" * 10)
    assert await rsync_via_channel(tree, dest, channel.token_file, channel.port) == 0
    assert digest(dest) == digest(tree)


async def test_wrong_token_and_outside_paths_are_refused(tmp_path: Path, tree: Path,
                                                         channel: Channel) -> None:
    bad = tmp_path / "bad-token"
    bad.write_text("guess")
    assert await rsync_via_channel(tree, channel.roots / "x", bad, channel.port) != 0
    assert not (channel.roots / "x").exists()
    elsewhere = tmp_path / "elsewhere"
    assert await rsync_via_channel(tree, elsewhere, channel.token_file, channel.port) != 0
    assert not elsewhere.exists()


def test_argv_rules(tmp_path: Path) -> None:
    roots = [tmp_path]
    d = str(tmp_path / "i")
    assert check_argv(["rsync", "--server", "-logDtpre.iLsfxC", ".", d], roots) is None
    assert check_argv(["rsync", "--server", "--sender", "-a", ".", d], roots) is not None
    assert check_argv(["rsync", "--server", "--log-file=/etc/x", ".", d], roots) is not None
    assert check_argv(["rsync", "--server", ".", "/etc"], roots) is not None
    assert check_argv(["sh", "-c", "id"], roots) is not None
    assert check_argv(["btrfs", "receive", d], roots) is None
    assert check_argv(["btrfs", "receive", "/"], roots) is not None
    assert check_argv(["rsync", "--server", ".", f"{d}/../../etc"], roots) is not None


async def test_dirty_pass_moves_only_changed_paths(channel: Channel, tree: Path) -> None:
    from corral.disks.dirty import DirtyTracker
    from corral.disks.rsync import Endpoint, run_pass

    roots, token_file, server = channel.roots, channel.token_file, channel.server
    tracker = DirtyTracker(tree)
    tracker.start()
    try:
        ep = Endpoint("127.0.0.1", server.port, token_file, str(roots / "web"))
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
        assert digest(roots / "web") == digest(tree)
        assert not (roots / "web" / "a" / "f2").exists()
    finally:
        tracker.stop()


async def test_a_same_size_rewrite_in_the_same_second_is_sent(channel: Channel,
                                                             tree: Path) -> None:
    """A file rewritten after a pass copied it, keeping its size, with an mtime in the same
    second (a database page or WAL segment written again right after a standby refresh):
    the next live pass must send it. rsync compares whole seconds unless told otherwise."""
    from corral.disks.rsync import Endpoint, run_pass

    ep = Endpoint("127.0.0.1", channel.server.port, channel.token_file,
                  str(channel.roots / "web"))
    f = tree / "a" / "f7"
    second = f.stat().st_mtime_ns // 1_000_000_000 * 1_000_000_000
    os.utime(f, ns=(second, second + 1_000))
    await run_pass(tree, ep)
    f.write_bytes(os.urandom(f.stat().st_size))
    os.utime(f, ns=(second, second + 2_000))  # the same second, as quick rewrites are
    result = await run_pass(tree, ep)
    assert result.files == 1
    assert digest(channel.roots / "web") == digest(tree)
