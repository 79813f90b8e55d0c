"""The built-in disk backends, by name, and how an agent builds the one it was configured with.

One explicit dict, as for drivers (Ganeti's ``_HYPERVISOR_MAP``): adding a backend is one module
plus one line here. Unlike drivers an agent has exactly one backend, and one it cannot use is a
configuration mistake, not a property to report: it refuses to start, saying why and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from corral.disks.base import DiskBackend
from corral.disks.btrfs import BtrfsBackend
from corral.disks.dir import DirBackend
from corral.errors import ConfigError

#: in the order they are offered to a person (the first is the default)
BUILTIN: dict[str, Callable[[Path], DiskBackend]] = {
    "dir": DirBackend,
    "btrfs": BtrfsBackend,
}


def make_backend(name: str, root: Path) -> DiskBackend:
    """The backend ``name`` on the disk root ``root`` (which must exist), checked usable."""
    factory = BUILTIN.get(name)
    if factory is None:
        raise ConfigError(f"disk_backend {name!r} is not known",
                          hint=f"use one of: {', '.join(BUILTIN)}")
    backend = factory(Path(root))
    why = backend.available()
    if why:
        others = " or ".join(n for n in BUILTIN if n != name)
        need = backend.capabilities.needs_filesystem
        fix = (f"point disk_root at a {need} filesystem" if need
               else "fix that on this host")
        raise ConfigError(f"disk_backend {name}: {why}", hint=f"{fix}, or use {others}")
    return backend
