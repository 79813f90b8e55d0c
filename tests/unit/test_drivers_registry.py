"""The registry builds what is asked for and says why a driver is left out."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from corral.drivers import registry
from corral.drivers.base import Driver
from corral.drivers.fake import FakeDriver
from corral.errors import ConfigError


def test_builds_the_named_drivers(tmp_path: Path) -> None:
    scope = f"t{os.getpid()}"
    drivers, reasons = registry.make_drivers(["fake", "process", "fake"], scope, tmp_path)
    assert sorted(drivers) == ["fake", "process"]
    assert reasons == {}
    for d in drivers.values():
        assert isinstance(d, Driver)


def test_unknown_driver_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        registry.make_drivers(["proces"], "h1", tmp_path)
    assert "process" in err.value.hint


def test_unavailable_drivers_come_back_with_a_reason(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.BUILTIN, "broken",
                        lambda scope, state_dir: FakeDriver(scope, unavailable="no such thing"))
    drivers, reasons = registry.make_drivers(["broken", "fake"], "h1", tmp_path)
    assert list(drivers) == ["fake"]
    assert reasons == {"broken": "no such thing"}


def test_runc_is_offered_or_explained(tmp_path: Path) -> None:
    drivers, reasons = registry.make_drivers(["runc"], "h1", tmp_path)
    if os.geteuid() == 0 and shutil.which("runc"):
        assert "runc" in drivers
    else:
        assert reasons.get("runc")
