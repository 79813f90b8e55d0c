"""Fixtures for whole fleets; see :mod:`fleetkit` for how they are started and torn down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetkit import Fleet, make_env, parts_missing, teardown


@pytest.fixture(scope="module")
def local_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three unprivileged hosts on loopback with the process driver (the default fleet)."""
    missing = parts_missing()
    if missing:
        pytest.skip(missing)
    tmp = tmp_path_factory.mktemp("fleet")
    fleet = Fleet(tmp=tmp, env=make_env(tmp))
    try:
        fleet.up("--hosts", "3")
        yield fleet
    finally:
        teardown(fleet)


@pytest.fixture
def fresh_fleet_dir(tmp_path: Path) -> Iterator[Fleet]:
    """A fleet the test starts itself (to check up/down/tour); always torn down."""
    missing = parts_missing()
    if missing:
        pytest.skip(missing)
    fleet = Fleet(tmp=tmp_path, env=make_env(tmp_path))
    try:
        yield fleet
    finally:
        teardown(fleet)
