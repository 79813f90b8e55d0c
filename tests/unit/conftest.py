"""Unit tests share pytest's own process: what an in-process agent sets on it is undone.

An agent makes itself a child subreaper (drivers/reaping.py). A unit test that builds one in
this process left pytest a subreaper, so a later test's orphaned workload (its agent killed -9)
became pytest's zombie instead of init's child, and "survived SIGKILL" (seen when integration
tests ran after the unit tests in one pytest run)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from corral.drivers import reaping


@pytest.fixture(autouse=True)
def _not_a_subreaper() -> Iterator[None]:
    yield
    reaping.set_subreaper(False)
