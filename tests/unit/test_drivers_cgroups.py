"""Cgroup layout detection and counter parsing (the real hierarchies are exercised by the
driver conformance suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.drivers import cgroups
from corral.errors import DriverError

HYBRID = """\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
36 31 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:16 - cgroup cgroup rw,cpu,cpuacct
37 31 0:32 / /sys/fs/cgroup/memory rw,nosuid shared:17 - cgroup cgroup rw,memory
38 31 0:33 / /sys/fs/cgroup/freezer rw,nosuid shared:18 - cgroup cgroup rw,freezer
"""

UNIFIED = """\
25 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 \
rw,nsdelegate,memory_recursiveprot
"""


def test_hybrid_layout() -> None:
    m = cgroups.parse_mountinfo(HYBRID)
    assert m.v1["cpu"] == m.v1["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert m.v1["memory"] == Path("/sys/fs/cgroup/memory")
    assert "name=systemd" not in m.v1 and "systemd" not in m.v1
    assert m.v2 == Path("/sys/fs/cgroup/unified")
    assert Path("/sys/fs/cgroup/systemd") in m.v1_all
    assert not m.unified


def test_unified_layout() -> None:
    m = cgroups.parse_mountinfo(UNIFIED)
    assert m.v1 == {}
    assert m.v2 == Path("/sys/fs/cgroup")
    assert m.unified


def test_escaped_mount_points() -> None:
    line = "40 31 0:40 / /mnt/my\\040cg rw - cgroup cgroup rw,pids\n"
    assert cgroups.parse_mountinfo(line).v1["pids"] == Path("/mnt/my cg")


def test_no_cgroups_mounted() -> None:
    m = cgroups.parse_mountinfo("25 30 0:22 / /sys rw - sysfs sysfs rw\n")
    assert not m.v1 and m.v2 is None and not m.unified


def test_this_host_is_detected() -> None:
    m = cgroups.read_mounts()
    assert m.v1 or m.v2 is not None


def _fake_tree(tmp_path: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)


def test_v2_counters_and_freezer_state_are_parsed(tmp_path: Path) -> None:
    _fake_tree(tmp_path, {
        "corral/h/x/cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        "corral/h/x/memory.current": "4096\n",
        "corral/h/x/cgroup.events": "populated 1\nfrozen 1\n",
        "corral/h/x/cgroup.procs": "12\n13\n",
    })
    v2 = cgroups.V2Hierarchy(tmp_path)
    assert v2.cpu_ns("corral/h/x") == 1_500_000
    assert v2.memory_bytes("corral/h/x") == 4096
    assert v2.is_frozen("corral/h/x")
    assert v2.pids("corral/h/x") == [12, 13]
    assert v2.cpu_ns("corral/h/gone") is None


def test_v1_counters_are_parsed(tmp_path: Path) -> None:
    mounts = cgroups.Mounts(v1={"cpuacct": tmp_path / "cpuacct", "memory": tmp_path / "memory",
                                "freezer": tmp_path / "freezer"})
    _fake_tree(tmp_path, {
        "cpuacct/corral/h/x/cpuacct.usage": "123456789\n",
        "memory/corral/h/x/memory.usage_in_bytes": "8192\n",
        "freezer/corral/h/x/freezer.state": "FREEZING\n",
    })
    v1 = cgroups.V1Hierarchy(mounts)
    assert v1.cpu_ns("corral/h/x") == 123456789
    assert v1.memory_bytes("corral/h/x") == 8192
    assert not v1.is_frozen("corral/h/x")  # FREEZING is not frozen yet
    assert len(v1.dirs("corral/h/x")) == 3


def test_v1_without_a_freezer_cannot_freeze(tmp_path: Path) -> None:
    v1 = cgroups.V1Hierarchy(cgroups.Mounts(v1={"cpuacct": tmp_path}))
    assert not v1.can_freeze
    with pytest.raises(DriverError):
        v1.set_frozen("x", True)


def test_own_cgroup_v2(tmp_path: Path) -> None:
    f = tmp_path / "cgroup"
    f.write_text("1:name=systemd:/a\n0::/user.slice/agent.scope\n")
    assert cgroups.own_cgroup_v2(f) == "user.slice/agent.scope"


def test_remove_scope_keeps_what_is_in_use(tmp_path: Path) -> None:
    mounts = cgroups.Mounts(v1={"cpuacct": tmp_path / "a"}, v2=tmp_path / "u",
                            v1_all=(tmp_path / "a",))
    (tmp_path / "a" / "corral" / "s1").mkdir(parents=True)
    (tmp_path / "u" / "corral" / "s1" / "busy").mkdir(parents=True)
    left = cgroups.remove_scope("s1", mounts)
    assert left == [tmp_path / "u" / "corral" / "s1"]
    assert not (tmp_path / "a" / "corral" / "s1").exists()


class StubbornFreezer(cgroups.V1Hierarchy):
    """A v1 freezer that stays FREEZING until FROZEN has been written ``needs`` times, as a
    tree that forks mid-freeze does (each write sweeps the tasks the last one missed)."""

    def __init__(self, needs: int) -> None:
        super().__init__(cgroups.Mounts(v1={"freezer": Path("/nonexistent")}))
        self.needs = needs
        self.writes: list[str] = []
        self.state = "THAWED"

    def set_frozen(self, rel: str, frozen: bool) -> None:
        self.writes.append("FROZEN" if frozen else "THAWED")
        if not frozen:
            self.state = "THAWED"
        elif self.writes.count("FROZEN") >= self.needs:
            self.state = "FROZEN"
        else:
            self.state = "FREEZING"

    def _freezer_state(self, rel: str) -> str | None:
        return self.state


def test_a_freeze_that_stays_freezing_is_written_again_until_it_holds() -> None:
    cg = StubbornFreezer(needs=4)
    cg.freeze("corral/x/y", timeout=5.0)
    assert cg.is_frozen("corral/x/y")
    assert cg.writes.count("FROZEN") == 4


def test_a_freeze_that_never_completes_is_undone_with_a_clear_error() -> None:
    cg = StubbornFreezer(needs=10**9)
    with pytest.raises(DriverError) as err:
        cg.freeze("corral/x/y", timeout=0.5)
    assert "did not freeze" in str(err.value) and "thawed again" in str(err.value)
    assert err.value.retryable
    assert cg.writes[-1] == "THAWED"
    assert cg.is_thawed("corral/x/y") and not cg.is_frozen("corral/x/y")


def test_freezing_is_neither_frozen_nor_thawed() -> None:
    cg = StubbornFreezer(needs=2)
    cg.set_frozen("r", True)
    assert cg.state == "FREEZING"
    assert not cg.is_frozen("r") and not cg.is_thawed("r")
