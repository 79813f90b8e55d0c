"""``corral server`` tunes its process's garbage collector once it has started
(control/server.py, tune_gc): the start's objects frozen out of the scans, rarer runs."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from corral.control import server


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_tune_gc_freezes_what_exists_and_raises_the_thresholds(restored: None) -> None:
    gc.unfreeze()
    kept = {"a": []}  # tracked by the collector: a dict holding a list
    assert any(o is kept for o in gc.get_objects())
    server.tune_gc()
    assert gc.get_threshold() == server.GC_THRESHOLDS
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # frozen: no longer scanned

