"""An ``exec:`` health check runs where the workload runs: inside a container, as the
container's root (a host id of its range), at its root; and at its timeout nothing it started
is left running."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_driver_conformance import IS_ROOT, MOUNTS, Harness, busybox_template  # noqa: F401

from corral.agent.health import parse, run_probe
from corral.drivers import cgroups
from corral.drivers.runc import RuncDriver
from corral.drivers.runc_userns import HOST_BASE


def _procs_with(arg: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if arg.encode() in (d / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def test_a_check_that_times_out_leaves_nothing_running(tmp_path: Path) -> None:
    mark = f"{900 + uuid.uuid4().int % 99}.{uuid.uuid4().int % 10**6}"  # a unique sleep
    why = run_probe(parse(f"exec:sleep {mark} & sleep {mark}"), 0.5, None, str(tmp_path))
    assert "within" in why
    deadline = time.monotonic() + 10
    while _procs_with(mark):
        assert time.monotonic() < deadline, f"left running: {_procs_with(mark)}"
        time.sleep(0.05)


@pytest.fixture
def runc(tmp_path: Path, busybox_template: Path) -> Iterator[Harness]:  # noqa: F811
    if not IS_ROOT:
        pytest.skip("the runc driver needs root")
    scope = f"t{os.getpid()}-{uuid.uuid4().hex[:6]}"
    state_root = tmp_path / "runc-state"
    probe = RuncDriver(scope, str(state_root))
    reason = probe.available()
    if reason:
        pytest.skip(reason)
    h = Harness("runc", scope, tmp_path, lambda: RuncDriver(scope, str(state_root)),
                hierarchy=cgroups.V1Hierarchy(MOUNTS, everywhere=True)
                if not MOUNTS.unified else probe.hierarchy, template=busybox_template)
    try:
        yield h
    finally:
        h.cleanup()


def test_a_containers_check_runs_inside_it_as_its_root(runc: Harness, tmp_path: Path) -> None:
    handle = runc.start(runc.create("touch /ready; while :; do sleep 1; done"))
    assert runc.wait_state(handle, {"running"}).state == "running"
    root = Path(str(handle.data["spec"]["rootfs"]))
    pid = int(handle.data["pid"])
    deadline = time.monotonic() + 10
    while not (root / "ready").exists():
        assert time.monotonic() < deadline, "the container did not start its command"
        time.sleep(0.05)
    host_only = tmp_path / f"host-only-{uuid.uuid4().hex[:6]}"
    host_only.write_text("the host's, not the container's")
    check = (f"exec:test -f /ready && test ! -e {host_only} && id -u > /checked "
             f"&& test \"$(pwd)\" = /")
    assert run_probe(parse(check), 10.0, pid, str(tmp_path)) == ""
    out = root / "checked"
    assert out.read_text().strip() == "0"  # the container's root...
    assert out.stat().st_uid == HOST_BASE  # ...which is a host id of its range, not root
    assert run_probe(parse("exec:test -f /nowhere"), 10.0, pid, None) == "exit 1"
