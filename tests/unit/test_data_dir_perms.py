"""Data directory permissions: private everywhere, traverse-only (0711) on the way to the disks,
each disk 0711, the slots 0700; a blocking parent of the disk root is named with the fix."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import perms
from corral.agent.disks import PRIVATE_SUBDIRS, HostDisks
from corral.rig import fleet


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory whose parents others may pass (pytest's own tmp is under a 0700 dir)."""
    base = Path(tempfile.mkdtemp(prefix="corral-perms-", dir="/tmp"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_agent_makes_its_data_dir_private_but_the_way_to_its_disks(tmp_path: Path) -> None:
    data = tmp_path / "host1"
    (data / "instances" / "web").mkdir(parents=True, mode=0o755)
    (data / "instances").chmod(0o755)
    (data / "chunks").mkdir(mode=0o755)
    (data / "chunks").chmod(0o755)
    (data / "agent.log").write_text("x")
    (data / "agent.log").chmod(0o644)
    (data / "disks" / "old").mkdir(parents=True)  # a disk an older agent made, 0755
    (data / "disks" / "old").chmod(0o755)
    (data / "data-token").write_text("the fleet's admin token, as an older agent kept it")
    disks = HostDisks(data / "disks", "dir", data, "host1")
    assert mode(data) == 0o711 and mode(data / "disks") == 0o711
    assert mode(data / "instances") == 0o700 and mode(data / "chunks") == 0o700
    assert mode(data / "agent.log") == 0o600
    assert not (data / "data-token").exists()  # agents hold no fleet token any more
    assert mode(data / "instances" / "web") == 0o755  # behind a private parent: left alone
    assert mode(data / "disks" / "old") == 0o711
    for sub in PRIVATE_SUBDIRS:
        assert mode(data / "disks" / sub) == 0o700, sub
    # a new disk appears 0711 at its final path; what the workload made inside keeps its modes
    fill = disks.new_dir("web")
    (fill / "pub").mkdir(mode=0o755)
    (fill / "pub").chmod(0o755)
    assert mode(disks.publish("web", fill)) == 0o711
    assert mode(disks.path("web") / "pub") == 0o755
    # a copy arriving from another host is adopted 0711 as well
    slot = Path(disks.recv_prepare("mig", "incoming")["path"])
    slot.chmod(0o777)
    assert mode(disks.adopt("mig", "incoming")) == 0o711


def test_disks_elsewhere_leave_the_whole_data_dir_private(tmp_path: Path) -> None:
    data = tmp_path / "host1"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    HostDisks(tmp_path / "disks" / "host1", "dir", data, "host1")
    assert mode(data) == 0o700
    assert mode(tmp_path / "disks" / "host1") == 0o711
    assert mode(tmp_path / "disks") == 0o711  # made by the agent: traverse-only


def test_make_dirs_ignores_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        leaf = perms.make_dirs(tmp_path / "a" / "b" / "c", 0o700)
    finally:
        os.umask(old)
    assert (mode(tmp_path / "a"), mode(tmp_path / "a" / "b"), mode(leaf)) == (0o711, 0o711,
                                                                              0o700)


def test_a_blocking_parent_is_named_with_the_fix(open_tmp: Path) -> None:
    closed = open_tmp / "open" / "closed"
    closed.mkdir(parents=True)
    (open_tmp / "open").chmod(0o755)
    closed.chmod(0o700)
    root = closed / "deep" / "disks"
    assert perms.blocking_ancestor(root) == closed
    assert perms.blocking_ancestor(open_tmp / "open" / "disks") is None
    msg = perms.blocked_message(root, closed)
    assert str(closed) in msg and "0700" in msg and "--disk-root" in msg
    assert "disk_root" in msg and "configuration.md" in msg
    closed.chmod(0o711)
    assert perms.blocking_ancestor(root) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="the agent warns only when it runs as root")
async def test_the_agent_warns_at_start_when_its_disks_are_unreachable(
        open_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    closed = open_tmp / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    disks = HostDisks(closed / "host1" / "disks", "dir", closed / "host1", "host1")
    caplog.set_level(logging.WARNING, logger="corral.agent.disks")
    await disks.start()
    try:
        said = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
        assert len(said) == 1 and str(closed) in said[0] and "--disk-root" in said[0]
    finally:
        await disks.stop()


def test_corral_up_prepares_a_private_fleet_dir(tmp_path: Path) -> None:
    data = tmp_path / "fleet"
    (data / "hosts" / "host3").mkdir(parents=True)  # of an earlier, larger fleet
    (data / "hosts" / "host3").chmod(0o755)
    (data / "notes.txt").write_text("the user's own")
    (data / "notes.txt").chmod(0o644)
    said: list[str] = []
    fleet._prepare_data_dir(data, fleet.UpOptions(hosts=2, data_dir=data), said.append)
    assert mode(data) == 0o711 and mode(data / "hosts") == 0o711
    assert mode(data / "hosts" / "host3") == 0o700
    assert mode(data / "notes.txt") == 0o644  # not up's: left as it was
    if os.geteuid() == 0:  # pytest's tmp is under a 0700 directory: that is said at once
        assert said and "cannot reach" in said[0] and "--disk-root" in said[0]
    # with the disks elsewhere nothing in the fleet's directory needs to be passable
    other = tmp_path / "fleet2"
    fleet._prepare_data_dir(other, fleet.UpOptions(hosts=1, data_dir=other,
                                                   disk_root=tmp_path / "disks"), said.append)
    assert mode(other) == 0o700 and mode(other / "hosts") == 0o700
