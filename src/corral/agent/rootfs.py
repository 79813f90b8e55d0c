"""Root filesystems for instances whose driver needs one and whose spec brought none.

A busybox template is built once per host under ``<data_dir>/rootfs-template`` (no network: it
comes from the host's busybox-static) and every such instance gets its own copy in its directory,
so one container writing to its root never touches another's. Both steps are idempotent, so a
create repeated after an agent crash simply finds the work done.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from corral.rig.rootfs import MARKER, build_busybox_rootfs, clone_rootfs

#: creates run in worker threads; only one of them builds the template.
_lock = threading.Lock()


def template_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "rootfs-template"


def instance_rootfs(data_dir: Path, instance_dir: Path) -> Path:
    """This instance's own copy of the template, at ``<instance_dir>/rootfs``."""
    with _lock:
        template = build_busybox_rootfs(template_dir(data_dir))
    return clone_rootfs(template, Path(instance_dir) / "rootfs")


def template(data_dir: Path) -> Path:
    """The host's busybox template, built on first use."""
    with _lock:
        return build_busybox_rootfs(template_dir(data_dir))


def fill_from_template(template: Path, dest: Path) -> Path:
    """Copy the template into ``dest``, an empty directory or btrfs subvolume that must stay
    what it is (so no rmtree-and-recreate as :func:`clone_rootfs` does); busybox is hard-linked."""
    binary = (template / "bin" / "busybox").resolve()

    def copy(src: str, dst: str) -> object:
        if Path(src).resolve() == binary:
            try:
                os.link(src, dst)
                return dst
            except OSError:  # another filesystem: fall back to a copy
                pass
        return shutil.copy2(src, dst)

    shutil.copytree(template, dest, symlinks=True, copy_function=copy, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(MARKER))
    for d in ("tmp", "var/tmp"):
        if (dest / d).is_dir():
            os.chmod(dest / d, 0o1777)
    return dest
