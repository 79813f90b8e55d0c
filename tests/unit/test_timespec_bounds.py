"""``since`` values the server can read a stream from, whatever a client sends."""

from __future__ import annotations

import pytest

from corral.api.timespec import LATEST, parse_since
from corral.errors import InvalidRequest


@pytest.mark.parametrize("text", ["-99999999999", "-inf", "99999999999d", "1960-01-01"])
def test_a_time_before_1970_is_1970(text: str) -> None:
    assert parse_since(text, now=1_000_000.0) == 0.0


@pytest.mark.parametrize("text", ["1e300", "inf", "nan", str(LATEST + 1)])
def test_a_time_past_the_year_9999_or_not_a_number_is_refused(text: str) -> None:
    with pytest.raises(InvalidRequest, match="before the year 10000"):
        parse_since(text)


def test_ordinary_values_are_unchanged() -> None:
    assert parse_since("10m", now=10_000.0) == 9_400.0
    assert parse_since("1700000000") == 1_700_000_000.0
    assert parse_since("2026-01-01T00:00:00Z") == 1_767_225_600.0
