"""A btrfs filesystem of a test's own, on a loop-mounted image file under its temp dir (the
image has a unique name, so a crashed run never collides with the next)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path


def loop_btrfs(tmp_path: Path, label: str, size: str = "300M") -> Path:
    img = tmp_path / f"crl-{uuid.uuid4().hex[:8]}-{label}.img"
    mnt = tmp_path / label
    mnt.mkdir()
    subprocess.run(["truncate", "-s", size, str(img)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    return mnt


def unmount(mnt: Path) -> None:
    """Unmount, lazily when something still holds it (a process stuck in the kernel): a failed
    test must not leave its filesystem mounted for the next run."""
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
