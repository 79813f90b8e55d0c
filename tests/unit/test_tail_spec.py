"""``tail`` sources on create: names and paths are checked at the edge (API model and CLI)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from corral.api.models import CreateInstance
from corral.bus.messages import LogBatch, WireSpec
from corral.cli.parse import parse_tail
from corral.control.http.logs import lines_of
from corral.errors import InvalidRequest


def make(tail: dict[str, str]) -> CreateInstance:
    return CreateInstance(name="web", command=["true"], tail=tail)


def test_good_sources_pass_and_default_is_empty() -> None:
    assert make({"access": "/var/log/access.log", "app_2-x": "/a"}).tail["access"].endswith(
        "access.log")
    assert CreateInstance(name="web", command=["true"]).tail == {}
    assert WireSpec(name="web", driver="process", command=["true"]).tail == {}


@pytest.mark.parametrize("source", ["stdout", "stderr", "Access", "1abc", "a.b", "", "a" * 33,
                                    "has space"])
def test_bad_source_names_are_refused(source: str) -> None:
    with pytest.raises(ValidationError, match="tail source"):
        make({source: "/var/log/x.log"})


@pytest.mark.parametrize(("path", "why"), [("", "is empty"), ("/nul\0byte", "NUL byte")])
def test_empty_paths_and_nul_bytes_are_refused(path: str, why: str) -> None:
    # relative paths are allowed (inside the instance's disk): tests/unit/test_tail_relative.py
    with pytest.raises(ValidationError, match=why):
        make({"access": path})


def test_parse_tail() -> None:
    assert parse_tail(["access=/var/log/a.log", "err=/x=y"]) == {
        "access": "/var/log/a.log", "err": "/x=y"}
    for bad in (["access"], ["=/x"], ["access="]):
        with pytest.raises(InvalidRequest, match="SOURCE=PATH"):
            parse_tail(bad)
    with pytest.raises(InvalidRequest, match="twice"):
        parse_tail(["a=/x", "a=/y"])


def test_ndjson_lines_are_numbered_and_filtered() -> None:
    batch = LogBatch(host="h1", instance="web", source="stderr", first_seq=7,
                     lines=["a", "b"], ts=1.5)
    out = lines_of(batch, None)
    assert [o.decode() for o in out] == [
        '{"ts": 1.5, "host": "h1", "source": "stderr", "seq": 7, "line": "a"}\n',
        '{"ts": 1.5, "host": "h1", "source": "stderr", "seq": 8, "line": "b"}\n']
    assert lines_of(batch, "stdout") == []


def test_ndjson_lines_decode_to_each_line_whatever_it_holds() -> None:
    lines = ['say "hi"', "back\\slash", "tab\tand\x00nul", "ünïcödé ☃ 𝄞", "", "{}", "x" * 5000]
    batch = LogBatch(host="h-1", instance="web", source="access", first_seq=41,
                     lines=lines, ts=1764626400.123456)
    out = lines_of(batch, "access")
    assert all(o.endswith(b"\n") and o.count(b"\n") == 1 for o in out)
    assert [json.loads(o) for o in out] == [
        {"ts": 1764626400.123456, "host": "h-1", "source": "access", "seq": 41 + i,
         "line": line} for i, line in enumerate(lines)]
