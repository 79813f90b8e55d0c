"""Fixtures for whole fleets; see :mod:`fleetkit` for how they are started and torn down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetkit import Fleet, fleet_for


@pytest.fixture(scope="module")
def local_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three unprivileged hosts on loopback with the process driver (the default fleet)."""
    with fleet_for(tmp_path_factory.mktemp("fleet"), "--hosts", "3") as fleet:
        yield fleet


@pytest.fixture
def fresh_fleet_dir(tmp_path: Path) -> Iterator[Fleet]:
    """A fleet the test starts itself (to check up/down/tour); always torn down."""
    with fleet_for(tmp_path) as fleet:
        yield fleet
