"""``--offload-after`` as the CLI reads it, and the shelf name the store reserves."""

from __future__ import annotations

import pytest

from corral.cli.shelve_cmd import parse_offload
from corral.control.operations.shelve import shelf_name
from corral.errors import InvalidRequest
from corral.images.store import is_shelf


@pytest.mark.parametrize(("text", "seconds"), [
    ("never", -1.0), ("NEVER", -1.0), ("-1", -1.0), ("0", 0.0), ("90s", 90.0), ("30m", 1800.0),
    ("1h", 3600.0), ("2d", 172800.0),
])
def test_offload_after(text: str, seconds: float) -> None:
    assert parse_offload(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "1y", ""])
def test_offload_after_refuses_what_is_not_a_delay(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_offload(text)


def test_shelf_names_are_reserved_and_unique_per_operation() -> None:
    a, b = shelf_name("web", "0123456789ab"), shelf_name("web", "ba9876543210")
    assert a == "@shelf-web-01234567" and a != b
    assert is_shelf(a) and not is_shelf("web") and not is_shelf("shelf-web")
