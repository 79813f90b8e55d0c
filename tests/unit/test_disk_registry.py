"""The disk backend registry and the freeze window every backend's frozen pass runs in."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.agent.disks import HostDisks
from corral.disks import registry
from corral.disks.base import DiskBackend, FreezeWindow, Hold
from corral.disks.tree import fs_type
from corral.errors import ConfigError


def test_an_unknown_backend_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="disk_backend 'zfs' is not known") as err:
        registry.make_backend("zfs", tmp_path)
    assert err.value.hint == "use one of: dir, btrfs"
    with pytest.raises(ConfigError, match="'zfs' is not known"):
        HostDisks(tmp_path / "disks", "zfs", tmp_path, "h1")


def test_an_unusable_backend_says_why_and_what_to_do(tmp_path: Path) -> None:
    if fs_type(tmp_path) == "btrfs":
        pytest.skip("the temp dir is on btrfs")
    with pytest.raises(ConfigError, match="is not on a btrfs filesystem") as err:
        registry.make_backend("btrfs", tmp_path)
    assert err.value.hint == "point disk_root at a btrfs filesystem, or use dir"


def test_every_builtin_is_a_disk_backend(tmp_path: Path) -> None:
    for name, factory in registry.BUILTIN.items():
        backend = factory(tmp_path)
        assert isinstance(backend, DiskBackend) and backend.name == name


class Calls:
    def __init__(self, fail_freeze: bool = False) -> None:
        self.log: list[str] = []
        self.fail_freeze = fail_freeze

    async def freeze(self) -> None:
        self.log.append("freeze")
        if self.fail_freeze:
            raise RuntimeError("freezer broke")

    async def thaw(self) -> None:
        self.log.append("thaw")


async def test_the_window_thaws_once_after_the_frozen_work() -> None:
    c = Calls()
    async with FreezeWindow(Hold(c.freeze, c.thaw)) as w:
        await w.freeze()
        c.log.append("work")
        ms = await w.thaw()
    assert c.log == ["freeze", "work", "thaw"] and ms is not None and ms >= 0


@pytest.mark.parametrize("keep_frozen", [False, True])
async def test_a_failed_pass_never_leaves_the_instance_frozen(keep_frozen: bool) -> None:
    c = Calls()
    with pytest.raises(OSError):
        async with FreezeWindow(Hold(c.freeze, c.thaw, keep_frozen)) as w:
            await w.freeze()
            raise OSError("transfer cut off")
    assert c.log == ["freeze", "thaw"]


async def test_a_failed_freeze_is_thawed_too() -> None:
    c = Calls(fail_freeze=True)
    with pytest.raises(RuntimeError):
        async with FreezeWindow(Hold(c.freeze, c.thaw)) as w:
            await w.freeze()
    assert c.log == ["freeze", "thaw"]


async def test_kept_frozen_on_success_and_nothing_to_hold_when_not_running() -> None:
    c = Calls()
    async with FreezeWindow(Hold(c.freeze, c.thaw, keep_frozen=True)) as w:
        await w.freeze()
        assert await w.thaw() is not None
    assert c.log == ["freeze"]  # the migration stops it next
    async with FreezeWindow(Hold()) as w:
        await w.freeze()
        assert await w.thaw() is None  # no freeze, no freeze time
