"""Two fleets on one machine: each agent names its cgroups by host *and* its own id, so an
instance ``db`` in one fleet and ``db`` in another never share a cgroup (issue 15, item 4)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from corral.agent.scope import driver_scope
from corral.drivers import cgroups
from corral.drivers.base import Spec
from corral.drivers.process import ProcessDriver


def test_the_scope_is_the_host_and_an_id_kept_in_the_data_dir(tmp_path: Path) -> None:
    a, b = tmp_path / "fleet-a" / "host1", tmp_path / "fleet-b" / "host1"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    sa, sb = driver_scope(a, "host1"), driver_scope(b, "host1")
    assert sa.startswith("host1-") and sb.startswith("host1-")
    assert sa != sb
    assert driver_scope(a, "host1") == sa  # a restarted agent finds its own cgroups
    assert (a / "agent-id").stat().st_mode & 0o077 == 0


def test_a_damaged_id_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "agent-id").write_text("../../etc\n")
    scope = driver_scope(tmp_path, "h")
    assert "/" not in scope and scope.startswith("h-") and len(scope) == len("h-") + 8


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroup v1 needs root")
def test_same_instance_name_in_two_fleets_gets_two_cgroups(tmp_path: Path) -> None:
    found = cgroups.for_process_driver("probe-scopes")
    if isinstance(found, str):
        pytest.skip(found)
    for i in (1, 2):
        (tmp_path / f"f{i}").mkdir()
    scopes = [driver_scope(tmp_path / f"f{i}", "host1") for i in (1, 2)]
    drivers = [ProcessDriver(s, use_cgroup=True) for s in scopes]
    handles = []
    try:
        for i, drv in enumerate(drivers):
            spec = Spec("db", ["sh", "-c", "while :; do :; done" if i == 0 else "sleep 1000"],
                        str(tmp_path / f"wd{i}"))
            handles.append(drv.start(drv.create(spec)))
        assert handles[0].data["cgroup"] != handles[1].data["cgroup"]
        time.sleep(1.0)
        burner, sleeper = (d.stats([h])["db"] for d, h in zip(drivers, handles, strict=True))
        assert burner.cpu_ns > 300_000_000
        assert sleeper.cpu_ns < 100_000_000, "the sleeper's cgroup counts the burner's CPU"
        # removing one leaves the other running, in its own cgroup
        drivers[0].stop(handles[0], 1.0)
        drivers[0].delete(handles[0])
        assert drivers[1].status(handles[1]).state == "running"
    finally:
        for drv, h in zip(drivers, handles, strict=False):
            with contextlib.suppress(Exception):
                drv.stop(h, 1.0)
                drv.delete(h)
        for s in scopes:
            cgroups.remove_scope(s)
