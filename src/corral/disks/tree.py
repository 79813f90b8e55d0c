"""Removing trees under a disk root, whatever filesystem they are on.

Shared by every backend because any disk may hold subvolumes: a btrfs backend's own (a disk,
received read-only snapshots) and, on a dir backend whose root happens to be on btrfs, ones a
workload made inside its disk. ``shutil.rmtree`` cannot remove a read-only snapshot, so they are
deleted as subvolumes first; a leftover must never survive a cleanup because of what is in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from corral.errors import DriverError


def fs_type(path: Path) -> str:
    """The filesystem type of ``path`` as the kernel names it (``btrfs``, ``ext2/ext3``...)."""
    proc = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DriverError(f"stat -f {path} failed: {proc.stderr.strip()[-500:]}",
                          hint="check that the disk root exists and is readable")
    return proc.stdout.strip()


def is_subvolume(path: Path) -> bool:
    """A subvolume's root is inode 256 on btrfs (checked first: no subprocess on other
    filesystems but for the rare directory that happens to be inode 256)."""
    try:
        return (path.stat().st_ino == 256 and shutil.which("btrfs") is not None
                and fs_type(path) == "btrfs")
    except (OSError, DriverError):
        return False


def remove_tree(path: Path) -> None:
    """Remove a file or a tree (missing: nothing to do), subvolumes in it included."""
    if not os.path.lexists(path):
        return
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    if is_subvolume(path) and subprocess.run(["btrfs", "subvolume", "delete", str(path)],
                                             capture_output=True).returncode == 0:
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink() and is_subvolume(child):
            remove_tree(child)
    shutil.rmtree(path, ignore_errors=True)
