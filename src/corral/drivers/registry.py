"""The built-in drivers, by name, and how an agent builds the ones it was asked to offer.

One explicit dict (Ganeti's ``_HYPERVISOR_MAP``): adding a hypervisor is one module plus one line
here. Every factory takes the same two things: the agent's ``scope`` (its host name, so several
agents on one machine never share a cgroup or a container name) and its ``state_dir``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from corral.drivers.base import Driver
from corral.drivers.fake import FakeDriver
from corral.drivers.process import ProcessDriver
from corral.drivers.qemu import QemuDriver
from corral.drivers.runc import RuncDriver
from corral.errors import ConfigError


def _process(scope: str, state_dir: Path) -> Driver:
    return ProcessDriver(scope)


def _runc(scope: str, state_dir: Path) -> Driver:
    return RuncDriver(scope, str(Path(state_dir) / "runc"))


def _qemu(scope: str, state_dir: Path) -> Driver:
    return QemuDriver(scope, state_dir)


def _fake(scope: str, state_dir: Path) -> Driver:
    return FakeDriver(scope)


BUILTIN: dict[str, Callable[[str, Path], Driver]] = {
    "process": _process,
    "runc": _runc,
    "qemu": _qemu,
    "fake": _fake,
}


def make_drivers(names: list[str], scope: str, state_dir: Path
                 ) -> tuple[dict[str, Driver], dict[str, str]]:
    """Build the named drivers; those not usable here are left out with the reason why.

    Returns ``(drivers, reasons)``. An unknown name is a configuration mistake, not a property
    of the host, so it raises :class:`ConfigError` instead of being skipped.
    """
    drivers: dict[str, Driver] = {}
    reasons: dict[str, str] = {}
    for raw in names:
        name = raw.strip()
        if not name or name in drivers or name in reasons:
            continue
        factory = BUILTIN.get(name)
        if factory is None:
            raise ConfigError(f"unknown driver {name!r}",
                              hint=f"choose among: {', '.join(sorted(BUILTIN))}")
        driver = factory(scope, state_dir)
        reason = driver.available()
        if reason:
            reasons[name] = reason
        else:
            drivers[name] = driver
    return drivers, reasons
