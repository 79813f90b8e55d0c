"""As root: runc containers move between hosts in network namespaces. A container appends
numbered, checksummed records to a file in its own root; a standby on a third host is kept,
the container migrates warm to a second host and is then promoted onto its standby, each time
exactly one copy runs and the file stays a clean prefix that goes on growing."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from diskkit import clean_prefix, host_dirs, leftovers
from fleetkit import Fleet, fleet_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="--netns fleets need root"),
    pytest.mark.skipif(shutil.which("runc") is None or shutil.which("rsync") is None,
                       reason="needs runc and rsync"),
]

#: busybox sh inside the container: record i is "i <first 16 hex of sha256(i)>", as diskkit
WRITER = ('i=$(wc -l < /data.log 2>/dev/null || echo 0); while :; do i=$((i+1)); '
          'h=$(echo -n $i | sha256sum | cut -c1-16); echo "$i $h" >> /data.log; '
          'sleep 0.01; done # {marker}')


@pytest.fixture(scope="module")
def nfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet_for(tmp_path_factory.mktemp("netmig"), "--hosts", "3", "--netns") as f:
        yield f


def copies(marker: str) -> list[int]:
    """Pids of the container's shell (its argv carries the marker), zombies left out, and its
    own forks (``$(...)`` subshells carry the same argv for a moment) counted as the shell."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker.encode() not in (d / "cmdline").read_bytes():
                continue
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(d.name)] = int(fields[1])
        except OSError:
            continue
    return sorted(pid for pid, ppid in parents.items() if ppid not in parents)


def log_on(f: Fleet, host: str, where: str = "") -> Path:
    return host_dirs(f)[host] / "disks" / where / "c1" / "data.log"


def grows(path: Path) -> int:
    n = clean_prefix(path)
    deadline = time.monotonic() + 20
    while clean_prefix(path) <= n:
        assert time.monotonic() < deadline, f"{path} stopped growing"
        time.sleep(0.2)
    return clean_prefix(path)


def test_runc_container_migrates_and_is_promoted(nfleet: Fleet) -> None:
    f = nfleet
    marker = f"mig-{os.getpid()}"
    f.ok("run", "c1", "--host", "host1", "--driver", "runc", "--cpus", "0.2", "--memory",
         "32M", "--", "sh", "-c", WRITER.format(marker=marker))
    f.wait_state("c1", {"running"})
    grows(log_on(f, "host1"))
    assert len(copies(marker)) == 1

    f.ok("standby", "add", "c1", "--host", "host3", "--every", "1h")
    synced = clean_prefix(log_on(f, "host3", ".standby"))
    assert synced > 0

    before = f.instance("c1")
    out = f.ok("migrate", "c1", "--to", "host2")
    assert "downtime" in out
    after = f.wait_state("c1", {"running"})
    assert after["host"] == "host2" and after["epoch"] > before["epoch"]
    assert copies(marker) == [after["pid"]]
    n = grows(log_on(f, "host2"))
    assert leftovers(f, "c1", home="host2", standby="host3") == []

    f.ok("standby", "promote", "c1")
    promoted = f.wait_state("c1", {"running"})
    assert promoted["host"] == "host3" and copies(marker) == [promoted["pid"]]
    assert grows(log_on(f, "host3")) > n
    (sb,) = f.json("standby", "ls")
    assert sb["host"] == "host2" and sb["state"] == "ready"
    assert leftovers(f, "c1", home="host3", standby="host2") == []
    f.ok("rm", "--force", "c1")
    assert leftovers(f, "c1", home=None) == []
    assert copies(marker) == []
