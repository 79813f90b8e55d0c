"""Giving a root filesystem to the containers' user namespace: what moves, and what never does.

Root only (chown to any id, mounts). Each test builds a small tree in its own temp directory;
a mount a test makes is unmounted in a finalizer, even when the test fails.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.drivers.runc_userns import CONTAINER_IDS, HOST_BASE, shift_tree, to_host

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="chown to any id needs root")]


def owner(p: Path) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for m in reversed(made):
        subprocess.run(["umount", "-l", str(m)], capture_output=True, check=False)


def test_owners_move_into_the_range_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "home").mkdir()
    os.chown(root / "home", 1000, 100)
    (root / "far").write_text("x")
    os.chown(root / "far", 70000, 70000)  # no container id: left as it is
    (root / "mine").write_text("x")
    os.chown(root / "mine", HOST_BASE + 5, HOST_BASE + 6)  # already the container's
    (root / "link").symlink_to("etc/passwd")
    done = shift_tree(root)
    assert owner(root) == (HOST_BASE, HOST_BASE)
    assert owner(root / "etc" / "passwd") == (HOST_BASE, HOST_BASE)
    assert owner(root / "home") == (HOST_BASE + 1000, HOST_BASE + 100)
    assert owner(root / "far") == (70000, 70000)
    assert owner(root / "mine") == (HOST_BASE + 5, HOST_BASE + 6)
    assert owner(root / "link") == (HOST_BASE, HOST_BASE)
    assert done.chowned == 5 and done.seen == 7
    again = shift_tree(root)
    assert (again.chowned, again.stripped) == (0, 0)


def test_nothing_outside_the_tree_changes(tmp_path: Path, mounts: list[Path]) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    host_file = outside / "shadow"
    host_file.write_text("secret")
    (root / "to-file").symlink_to(host_file)
    (root / "to-dir").symlink_to(outside)
    shared = outside / "busybox"  # a file also linked from outside (the template's binary)
    shared.write_text("bin")
    os.link(shared, root / "busybox")
    (root / "a").write_text("a")  # a hard-link pair wholly inside
    os.link(root / "a", root / "b")
    mnt = root / "mnt"  # another filesystem mounted in the tree
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    mounts.append(mnt)
    (mnt / "f").write_text("f")
    shift_tree(root)
    assert owner(host_file) == (0, 0) and owner(outside) == (0, 0)
    assert owner(shared) == (0, 0)
    assert owner(root / "to-file") == owner(root / "to-dir") == (HOST_BASE, HOST_BASE)
    assert owner(root / "a") == (HOST_BASE, HOST_BASE)
    assert owner(mnt / "f") == (0, 0)


def test_setuid_and_setgid_bits_come_off(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    files = {"su": 0o4755, "sg": 0o2755, "mine-su": 0o4755, "sg-no-exec": 0o2644}
    for name, mode in files.items():
        (root / name).write_text("x")
        if name == "mine-su":  # made by the container's root (a chown takes setuid off)
            os.chown(root / name, to_host(0), to_host(0))
        (root / name).chmod(mode)
    (root / "shared").mkdir()
    (root / "shared").chmod(0o2775)  # setgid on a directory: group inheritance, kept
    done = shift_tree(root)
    modes = {n: stat.S_IMODE(os.lstat(root / n).st_mode) for n in (*files, "shared")}
    assert modes == {"su": 0o755, "sg": 0o755, "mine-su": 0o755, "sg-no-exec": 0o2644,
                    "shared": 0o2775}
    assert done.stripped == 1  # mine-su; the kernel took the others' off with the chown


def test_a_read_only_tree_is_left_as_it_is(tmp_path: Path, mounts: list[Path]) -> None:
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    (src / "f").write_text("x")
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    mounts.append(ro)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
    done = shift_tree(ro)
    assert done.chowned == 0
    assert owner(src / "f") == (0, 0)


def test_the_range_is_the_same_everywhere() -> None:
    """Disks move host to host keeping numeric owners: the range is a constant, never a
    per-host choice (a change of it is a migration of every disk)."""
    assert (HOST_BASE, CONTAINER_IDS) == (0x7000_0000, 65536)
    assert to_host(0) == HOST_BASE and to_host(65535) == HOST_BASE + 65535
    assert to_host(65536) == 65536
