"""``GET /v1/instances`` a page at a time (issue 12, "corral ls paging"), against a real
control plane (uvicorn, SQLite, embedded nats-server) and the fake agents of test_api: the
cursor walks every instance once, in order, filters hold across pages, bad bounds are refused
in the error shape; the client and ``corral ls`` page through a fleet larger than a page."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_api import TOKEN, Harness, settings_for, start_harness

from corral.api import client as api_client
from corral.api.client import Client
from corral.cli.main import run_cli

NEXT = "x-corral-next"
#: names not in creation order, so an order by insertion would show
NAMES = [f"i{(k * 7) % 27:02d}" for k in range(27)]
#: names on host h2 (the rest on h1), and those created without being started
ON_H2 = {n for n in NAMES if int(n[1:]) % 3 == 0}
NOT_STARTED = {n for n in NAMES if int(n[1:]) % 4 == 0}


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Harness]:
    async for h in start_harness(settings_for(tmp_path)):
        await h.agent("h1", cores=64, memory=64 << 30)
        await h.agent("h2", cores=64, memory=64 << 30)
        for name in NAMES:
            r = await h.create(name, cpus=0.1, memory_bytes=1 << 20,
                               host="h2" if name in ON_H2 else "h1",
                               start=name not in NOT_STARTED)
            assert r.status_code == 201, r.text
        yield h


async def walk(h: Harness, limit: int, **filters: str) -> list[list[str]]:
    """Every page's names, following the cursor (bounded: at most one page per instance)."""
    pages: list[list[str]] = []
    after: str | None = None
    for _ in range(len(NAMES) + 2):
        params: dict[str, Any] = {"limit": limit, **filters}
        if after is not None:
            params["after"] = after
        r = await h.http.get("/v1/instances", params=params)
        assert r.status_code == 200, r.text
        pages.append([i["name"] for i in r.json()])
        after = r.headers.get(NEXT)
        if after is None:
            return pages
        assert after == pages[-1][-1]  # the cursor is the page's last name
    raise AssertionError(f"the cursor never ended: {pages}")


async def test_pages_are_disjoint_ordered_and_cover_every_instance(fleet: Harness) -> None:
    whole = await fleet.http.get("/v1/instances")
    assert whole.status_code == 200 and NEXT not in whole.headers  # old callers: all at once
    assert [i["name"] for i in whole.json()] == sorted(NAMES)
    for limit in (1, 4, 26, 27, 28, 5000):
        pages = await walk(fleet, limit)
        flat = [n for p in pages for n in p]
        assert flat == sorted(NAMES), limit  # ordered, disjoint, nothing left out
        assert len(pages) == max(1, math.ceil(len(NAMES) / limit)), limit  # a full last
        assert all(0 < len(p) <= limit for p in pages), limit  # page ends it: no empty one
    r = await fleet.http.get("/v1/instances", params={"limit": 3, "after": "i25"})
    assert [i["name"] for i in r.json()] == ["i26"] and NEXT not in r.headers
    r = await fleet.http.get("/v1/instances", params={"limit": 3, "after": "i05x"})
    assert [i["name"] for i in r.json()] == ["i06", "i07", "i08"]  # any string is a cursor
    assert r.headers[NEXT] == "i08"
    r = await fleet.http.get("/v1/instances", params={"limit": 3, "after": "z"})
    assert r.json() == [] and NEXT not in r.headers


async def test_filters_hold_across_pages(fleet: Harness) -> None:
    h2 = [n for p in await walk(fleet, 2, host="h2") for n in p]
    assert h2 == sorted(ON_H2)
    created = [n for p in await walk(fleet, 3, state="created") for n in p]
    assert created == sorted(NOT_STARTED)
    both = [n for p in await walk(fleet, 1, host="h1", state="running") for n in p]
    assert both == sorted(set(NAMES) - ON_H2 - NOT_STARTED)
    r = await fleet.http.get("/v1/instances", params={"host": "nowhere"})
    assert r.status_code == 200 and r.json() == []
    views = (await fleet.http.get("/v1/instances", params={"state": "running",
                                                            "host": "h2"})).json()
    assert views and all(v["state"] == "running" and v["host"] == "h2" for v in views)


BAD = [({"limit": "0"}, "limit"), ({"limit": "-5"}, "limit"), ({"limit": "5001"}, "limit"),
       ({"limit": "ten"}, "limit"), ({"limit": "2.5"}, "limit"),
       ({"limit": "5", "after": "a" * 254}, "after"), ({"after": "a\x00"}, "after"),
       ({"host": "h" * 254}, "host"), ({"host": "no such host!"}, "host"),
       ({"state": "sleeping"}, "state")]


async def test_bad_bounds_are_refused_with_a_hint(fleet: Harness) -> None:
    for params, field in BAD:
        r = await fleet.http.get("/v1/instances", params=params)
        assert r.status_code == 422, (params, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_request" and err["hint"], params
        assert err["details"]["fields"][0]["field"] == field, params
        assert err["message"].startswith(f"{field}: "), params
    r = await fleet.http.get("/v1/instances", params={"limit": 5000, "after": "a" * 253})
    assert r.status_code == 200 and len(r.json()) == len(NAMES)  # the longest is taken


async def test_the_client_pages_through_by_default(fleet: Harness,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_client, "PAGE_SIZE", 4)

    def use() -> None:
        with Client(fleet.plane.api_url, TOKEN) as c:
            pages = list(c.instance_pages())
            assert [len(p) for p in pages] == [4] * 6 + [3]
            assert [i["name"] for i in c.instances_data()] == sorted(NAMES)
            assert [i.name for i in c.instances(host="h2")] == sorted(ON_H2)
            assert [i["name"] for i in c.instances_data(state="created")] == sorted(
                NOT_STARTED)
            page, cursor = c.instances_page(limit=5, after="i10")
            assert [i["name"] for i in page] == ["i11", "i12", "i13", "i14", "i15"]
            assert cursor == "i15"
            assert [i["name"] for i in c.instances_data(limit=2, after=cursor)] == [
                "i16", "i17"]
            whole, cursor = c.instances_page()  # no limit: one answer, no cursor
            assert len(whole) == len(NAMES) and cursor is None

    await asyncio.to_thread(use)


async def test_corral_ls_pages_and_prints_one_list(fleet: Harness,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_URL", fleet.plane.api_url)
    monkeypatch.setenv("CORRAL_TOKEN", TOKEN)
    monkeypatch.setenv("CORRAL_CONTEXT", str(tmp_path / "no-context.json"))
    monkeypatch.setattr(api_client, "PAGE_SIZE", 4)

    def cli(*argv: str) -> tuple[int, str, str]:
        code = run_cli(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    # a long name first: the later pages' narrower names still line up under the header
    long = "a-long-name-sorted-first"
    assert (await fleet.create(long, cpus=0.1, memory_bytes=1 << 20, host="h1")
            ).status_code == 201
    every = sorted([*NAMES, long])
    whole = (await fleet.http.get("/v1/instances")).json()
    code, out, err = await asyncio.to_thread(cli, "ls", "--json")
    assert code == 0, err
    assert json.loads(out) == whole  # seven pages, one valid list
    assert out == json.dumps(whole, indent=2) + "\n"  # byte for byte as before paging

    code, out, err = await asyncio.to_thread(cli, "ls", "--json", "--limit", "6")
    assert code == 0, err
    assert [i["name"] for i in json.loads(out)] == every[:6]

    code, out, err = await asyncio.to_thread(cli, "ls", "--json", "--host", "h1",
                                             "--state", "sleeping")
    assert code != 0 and "state" in err and "running" in err  # the server's refusal
    code, out, err = await asyncio.to_thread(cli, "ls", "--json", "--host", "nowhere")
    assert code == 0 and json.loads(out) == []

    code, out, err = await asyncio.to_thread(cli, "ls")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["NAME", "HOST"] and out.count("NAME") == 1
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == every  # every page's rows, in order
    starts = {line.index(r[1]) for line, r in zip(lines[1:], rows, strict=True)}
    assert starts == {lines[0].index("HOST")}  # later pages line up with the first

    code, out, err = await asyncio.to_thread(cli, "ls", "--host", "h2", "--state", "created",
                                             "--limit", "2")
    assert code == 0, err
    want = sorted(ON_H2 & NOT_STARTED)[:2]
    assert [line.split()[0] for line in out.splitlines()[1:]] == want
    code, out, err = await asyncio.to_thread(cli, "ls", "--host", "nowhere")
    assert code == 0 and "no instances match" in out


@pytest.mark.parametrize("chunk", [1, 2, 5])
async def test_a_list_read_in_chunks_is_the_same_list(
        fleet: Harness, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """A long list is read a chunk a turn of the event loop (app.LIST_CHUNK): whatever the
    chunk, the answers are those of one read, with and without filters and pages, and the
    hosts' list counts every instance of every host."""
    from corral.control.http import app as app_module

    h = fleet
    whole = (await h.http.get("/v1/instances")).json()
    hosts = (await h.http.get("/v1/hosts")).json()
    monkeypatch.setattr(app_module, "LIST_CHUNK", chunk)
    assert (await h.http.get("/v1/instances")).json() == whole
    assert [i["name"] for i in whole] == sorted(NAMES)
    assert await walk(h, 4) == [sorted(NAMES)[k:k + 4] for k in range(0, len(NAMES), 4)]
    on_h2 = [n for page in await walk(h, 3, host="h2") for n in page]
    assert on_h2 == sorted(ON_H2)
    assert (await h.http.get("/v1/hosts")).json() == hosts
    assert {x["name"]: x["instances"] for x in hosts} == {
        "h1": len(NAMES) - len(ON_H2), "h2": len(ON_H2)}
