"""Root filesystems for instances whose driver needs one and whose spec brought none.

A busybox template is built once per host under ``<data_dir>/rootfs-template`` (no network: it
comes from the host's busybox-static) and every such instance gets its own copy in its directory,
so one container writing to its root never touches another's. Both steps are idempotent, so a
create repeated after an agent crash simply finds the work done.
"""

from __future__ import annotations

import threading
from pathlib import Path

from corral.agent.busybox import build_busybox_rootfs, clone_rootfs

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
