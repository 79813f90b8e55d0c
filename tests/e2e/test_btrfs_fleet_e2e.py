"""As root: a fleet whose hosts keep instance disks as btrfs subvolumes (``corral up
--disk-backend btrfs``), each host on its own loop-mounted btrfs. A writer's disk gets a
standby (read-only snapshots sent incrementally), is promoted onto it, migrated, and migrated
back, its file a clean prefix at every stop; nothing is left on the hosts it left."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from diskkit import clean_prefix, running_copies, writer_cmd
from fleetkit import Fleet, fleet_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop btrfs"),
    pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="btrfs-progs not installed"),
]


@pytest.fixture(scope="module")
def bfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Path]]:
    tmp = tmp_path_factory.mktemp("btrfsfleet")
    disks = tmp / "disks"
    disks.mkdir()
    mounts = []
    try:
        for i in (1, 2):  # each host its own filesystem, as on two machines
            img, mnt = tmp / f"crl-{os.getpid()}-h{i}.img", disks / f"host{i}"
            mnt.mkdir()
            subprocess.run(["truncate", "-s", "400M", str(img)], check=True)
            subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
            subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
            mounts.append(mnt)
        with fleet_for(tmp, "--hosts", "2", "--disk-backend", "btrfs", "--disk-root",
                       str(disks)) as f:
            yield f, disks
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], check=False)


def subvolumes(mnt: Path) -> list[str]:
    out = subprocess.run(["btrfs", "subvolume", "list", "-o", str(mnt)], capture_output=True,
                         text=True).stdout
    return sorted(line.split(" path ")[-1] for line in out.splitlines() if " path " in line)


def test_btrfs_standby_promote_and_migrate(bfleet: tuple[Fleet, Path]) -> None:
    f, disks = bfleet
    assert {h["name"] for h in f.json("host", "ls")} == {"host1", "host2"}
    marker = f"bt-{os.getpid()}"
    f.ok("run", "db", "--host", "host1", "--cpus", "0.1", "--memory", "32M", "--",
         *writer_cmd(f.tmp, marker))
    f.wait_state("db", {"running"})
    live = disks / "host1" / "db" / "data.log"
    deadline = time.monotonic() + 20
    while not live.exists() or clean_prefix(live) < 50:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "db" in subvolumes(disks / "host1")  # the disk is a subvolume

    f.ok("standby", "add", "db", "--host", "host2", "--every", "1h")
    f.ok("standby", "sync", "db")  # the second refresh is incremental
    op = f.json("ops", "ls", "--target", "db")[0]
    assert op["kind"] == "standby-sync" and op["state"] == "succeeded"
    assert [p["full"] for p in op["data"]["passes"]] == [False, False]
    (snap,) = list((disks / "host2" / ".standby" / "db").iterdir())  # the newest only
    synced = clean_prefix(snap / "data.log")
    (sb,) = f.json("standby", "ls")
    assert sb["state"] == "ready" and sb["last_freeze_ms"] is not None

    f.ok("standby", "promote", "db")
    assert f.wait_state("db", {"running"})["host"] == "host2"
    assert [h for _, h in running_copies(marker)] == ["host2"]
    assert clean_prefix(disks / "host2" / "db" / "data.log") >= synced
    assert not (disks / "host1" / "db").exists()
    (sb,) = f.json("standby", "ls")
    assert sb["host"] == "host1" and sb["state"] == "new"  # a full send next time

    f.ok("standby", "rm", "db")
    f.ok("migrate", "db", "--to", "host1")
    assert [h for _, h in running_copies(marker)] == ["host1"]
    n = clean_prefix(disks / "host1" / "db" / "data.log")
    assert n > synced
    assert not (disks / "host2" / "db").exists()
    f.ok("rm", "--force", "db")
    assert subvolumes(disks / "host1") == [] or all("db" not in v
                                                    for v in subvolumes(disks / "host1"))
