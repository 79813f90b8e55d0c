"""Who may reach what in a data directory: private everywhere, traverse-only on the way to disks.

A fleet's data holds the token, the database, every instance's output: nothing in it is for the
workloads. Yet a workload that drops privileges (PostgreSQL under ``runuser -u postgres``, nginx
workers) must still reach its own disk, and it can only do so if every directory above that disk
lets others *through*. So the directories that lead to a disk root are 0711 (others may pass but
not list), the disk root and each disk are 0711 too (a disk's name must be known to reach it, and
no one but root lists them), and everything else is 0700 (directories) or 0600 (files). The
workload's own files inside its disk keep whatever modes it gives them.

Stdlib only: the agent (``agent/disks.py``) and ``corral up`` (``rig/fleet.py``) both use it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

#: others may pass through, not list
TRAVERSE = 0o711
PRIVATE_DIR = 0o700


def chmod(path: Path, mode: int) -> None:
    """Set ``mode`` unless it is already that (a read-only mount or a file not ours is left as
    it is: permissions are a defence, not a reason to refuse to start)."""
    with contextlib.suppress(OSError):
        if stat.S_IMODE(path.lstat().st_mode) != mode:
            path.chmod(mode)


def make_dirs(path: Path, mode: int, parents_mode: int = TRAVERSE) -> Path:
    """``mkdir -p`` whose new parents get ``parents_mode`` and ``path`` itself ``mode``, whatever
    the umask (directories that already exist above ``path`` are left alone)."""
    path = Path(path)
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir()
        chmod(p, mode if p == path else parents_mode)
    chmod(path, mode)
    return path


def leads_to(d: Path, targets: Iterable[Path]) -> bool:
    """True when some target lies strictly below ``d``: ``d`` is on the way to it."""
    return any(t != d and t.is_relative_to(d) for t in targets)


def privatize_children(d: Path, keep: Iterable[Path] = ()) -> None:
    """Take group and others' permissions away from everything directly in ``d`` but ``keep``
    (deeper entries are behind these). Symlinks are skipped: chmod would follow them."""
    kept = set(keep)
    try:
        entries = list(d.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry in kept or entry.is_symlink():
            continue
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(entry.lstat().st_mode)
            if mode & 0o077:
                entry.chmod(mode & 0o700)


def secure_chain(top: Path, disk_root: Path) -> None:
    """Make ``top`` (a data directory) private, except the directories from ``top`` down to
    ``disk_root``, which become traverse-only, with everything else directly in them private.
    A ``disk_root`` outside ``top`` leaves ``top`` wholly private (0700)."""
    top, disk_root = Path(top), Path(disk_root)
    if disk_root == top:
        return  # disks beside the agent's own files: nothing sensible to enforce
    if not disk_root.is_relative_to(top):
        chmod(top, PRIVATE_DIR)
        return
    chain = [top, *[p for p in disk_root.parents if p.is_relative_to(top) and p != top]]
    for d in chain:
        chmod(d, TRAVERSE)
        privatize_children(d, keep=[*chain, disk_root])


def blocking_ancestor(path: Path) -> Path | None:
    """The topmost directory above ``path`` that others may not pass through (no ``o+x``), if
    any: a workload that dropped privileges cannot reach ``path`` then."""
    for p in reversed(Path(path).absolute().parents):
        try:
            if not p.stat().st_mode & stat.S_IXOTH:
                return p
        except OSError:
            return None  # not there yet: it will be made traversable when it is made
    return None


def blocked_message(disk_root: Path, blocking: Path) -> str:
    try:
        mode = f"mode {stat.S_IMODE(blocking.stat().st_mode):04o}"
    except OSError:
        mode = "not readable"
    return (f"workloads that drop privileges (runuser, setpriv, nginx workers) cannot reach "
            f"their disks under {disk_root}: {blocking} ({mode}) lets only its owner through; "
            f"put the disks where others may traverse: 'corral up --disk-root DIR' or the "
            f"agent's disk_root setting (see docs/configuration.md), e.g. /var/lib/corral/disks, "
            f"or 'chmod o+x {blocking}'")


def write_private(path: Path, text: str) -> None:
    """A secret file, 0600 from its first byte (never a moment readable by others)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
