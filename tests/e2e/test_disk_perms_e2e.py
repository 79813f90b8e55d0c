"""A workload that drops privileges reaches its own disk and nothing else of the fleet's data.

Root only: the fleet's data and its ``--disk-root`` are in a directory others may traverse (not
pytest's 0700 tmp). One instance chowns a directory of its disk to ``nobody`` as root, drops to
``nobody`` with setpriv, and probes: it must write in its disk, and must neither read the token
nor list the fleet's data, another host's instance directory, the disk root or another
instance's disk (on its host and on the other)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetkit import Fleet, fleet_for

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(os.geteuid() != 0, reason="drops privileges: needs root"),
              pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")]

PROBE = """\
p() {{ label=$1; shift; if "$@" >/dev/null 2>&1; then r=ok; else r=no; fi; echo "$label $r"; }}
p whoami sh -c 'test "$(id -u)" = 65534'
p write sh -c 'echo hello > own/file'
p read-own cat own/file
p own-by-path cat {disks}/host1/{me}/own/file
p read-token cat {data}/token
p list-data ls {data}
p list-hosts ls {data}/hosts
p list-host1 ls {data}/hosts/host1
p own-workdir ls {data}/hosts/host1/instances/{me}
p other-host-workdir ls {data}/hosts/host2/instances/{far}
p other-host-log cat {data}/hosts/host2/instances/{far}/stdout.log
p list-disk-root ls {disks}/host1
p neighbour-disk ls {disks}/host1/{near}
p other-host-disk ls {disks}/host2/{far}
echo probes done
exec sleep 600
"""

EXPECTED = {
    "whoami": "ok", "write": "ok", "read-own": "ok", "own-by-path": "ok",
    "read-token": "no", "list-data": "no", "list-hosts": "no", "list-host1": "no",
    "own-workdir": "no", "other-host-workdir": "no", "other-host-log": "no",
    "list-disk-root": "no", "neighbour-disk": "no", "other-host-disk": "no",
}


def remove_instance_cgroups(data: Path) -> None:
    """rmdir what is left of the fleet's instance cgroups (``down`` removes them; an older
    ``down`` did not), found from the handles the agents persisted."""
    rels = []
    for record in data.glob("hosts/*/instances/*/instance.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            rels.append(str(json.loads(record.read_text())["handle"]["data"]["cgroup"] or ""))
    mounts = [Path(line.split(" - ")[0].split()[4])
              for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split(" - ")[1].split()[0] in ("cgroup", "cgroup2")]
    for rel in filter(None, rels):
        for m in mounts:
            with contextlib.suppress(OSError):
                (m / rel).rmdir()


@pytest.fixture
def open_fleet() -> Iterator[tuple[Fleet, Path]]:
    """A two-host fleet with its data and disks under a traverse-only directory in /tmp."""
    base = Path(tempfile.mkdtemp(prefix="corral-perms-e2e-", dir="/tmp"))
    base.chmod(0o711)
    try:
        with fleet_for(base, "--hosts", "2", "--disk-root", str(base / "disks")) as f:
            yield f, base
    finally:
        remove_instance_cgroups(base / "data")
        shutil.rmtree(base, ignore_errors=True)


def probe_results(f: Fleet, name: str, timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = f.ok("logs", name, "--source", "stdout").splitlines()
        if "probes done" in lines:
            return dict(line.split(" ", 1) for line in lines if line != "probes done")
        assert time.monotonic() < deadline, f"the probes did not finish: {lines}\n{f.logs()}"
        time.sleep(0.3)


def test_a_workload_that_drops_privileges_reaches_only_its_own_disk(
        open_fleet: tuple[Fleet, Path]) -> None:
    f, base = open_fleet
    tag = uuid.uuid4().hex[:6]
    me, near, far = f"perm-me-{tag}", f"perm-near-{tag}", f"perm-far-{tag}"
    data, disks = base / "data", base / "disks"
    f.ok("run", near, "--host", "host1", "--", "sleep", "600")
    f.ok("run", far, "--host", "host2", "--", "sleep", "600")
    for n in (near, far):
        f.wait_state(n, {"running"})
    # what the probes must not reach does exist (so a refusal is not a missing path)
    for p in (data / "token", data / "hosts" / "host2" / "instances" / far / "stdout.log",
              disks / "host1" / near, disks / "host2" / far):
        assert p.exists(), p
    script = base / f"probe-{tag}.sh"
    script.write_text(PROBE.format(data=data, disks=disks, me=me, near=near, far=far))
    script.chmod(0o644)
    drop = ("mkdir -p own && chown nobody:nogroup own && exec setpriv --reuid=nobody "
            f"--regid=nogroup --clear-groups sh {script}")
    f.ok("run", me, "--host", "host1", "--", "sh", "-c", drop)
    got = probe_results(f, me)
    assert got == EXPECTED, {k: (got.get(k), v) for k, v in EXPECTED.items() if got.get(k) != v}
    # the workload's own file is its own, and the way to it stays traverse-only
    own = disks / "host1" / me / "own"
    assert (own / "file").stat().st_uid == 65534
    assert oct((disks / "host1" / me).stat().st_mode & 0o777) == oct(0o711)
