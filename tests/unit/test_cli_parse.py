"""Command-line parsing: sizes, env pairs, signals; each bad input names itself and what works."""

from __future__ import annotations

import pytest

from corral.cli.parse import parse_cpus, parse_env, parse_memory, parse_signal
from corral.errors import InvalidRequest


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000", 1000),
        ("64M", 64 * 1024**2),
        ("64m", 64 * 1024**2),
        ("1G", 1024**3),
        ("1.5G", int(1.5 * 1024**3)),
        ("512Ki", 512 * 1024),
        ("512KiB", 512 * 1024),
        ("2Gi", 2 * 1024**3),
        ("100MB", 100 * 1000**2),
        ("1T", 1024**4),
        (" 8 M ", 8 * 1024**2),
    ],
)
def test_memory_sizes(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "M", "64X", "-5M", "0", "1.2.3G", "64 MiBs"])
def test_bad_memory_sizes_name_the_input(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_memory(text)
    assert repr(text) in info.value.message
    assert "64M" in info.value.hint


def test_env_pairs() -> None:
    assert parse_env(["A=1", "B=", "C=x=y"]) == {"A": "1", "B": "", "C": "x=y"}
    for bad in ("NOEQ", "=v", "1A=2", "A-B=1"):
        with pytest.raises(InvalidRequest, match="KEY=VALUE"):
            parse_env([bad])


def test_signals() -> None:
    assert parse_signal("9") == 9
    assert parse_signal("KILL") == 9
    assert parse_signal("sigterm") == 15
    assert parse_signal("HUP") == 1
    for bad in ("0", "65", "NOPE", ""):
        with pytest.raises(InvalidRequest, match="bad signal"):
            parse_signal(bad)


def test_cpus() -> None:
    assert parse_cpus(0.5) == 0.5
    with pytest.raises(InvalidRequest):
        parse_cpus(0)
