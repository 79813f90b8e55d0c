#!/usr/bin/env python3
"""Figure: listing a large fleet's instances, paged (what ``corral ls`` does) beside one answer.

A real ``corral server`` (SQLite, the embedded bus) holds ``--instances`` instance rows; they
are written straight into its database before it starts (stopped instances of one host that is
down), since placing 100k instances through the API is another bench's figure
(``bench/fleet_scale.py``) and hours of this one. Then, through the product's own client (the
code ``corral ls`` runs), ``--rounds`` times each:

* **one answer** (the baseline: ``GET /v1/instances`` without a limit, the only way before
  paging and still what an old client asks): time and size;
* **paged**: the first page (what a user sees first) and the whole list page by page
  (:data:`corral.api.client.PAGE_SIZE` a page, following ``X-Corral-Next``);
* a page at the start, the middle and the end of the list (a keyset range: the same cost at
  any depth).

Checked every round: the paged list is the one answer's list, same names, same order, each
once, ``--instances`` of them. Median (min/max) of the rounds.

    .venv/bin/python bench/ls_paging.py                 # 20,000 instances, 3 rounds
    .venv/bin/python bench/ls_paging.py --long          # 100,000 (the issue's size)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import waiting
from sqlalchemy import insert

from corral.api.client import PAGE_SIZE, Client
from corral.config import Settings
from corral.control.db import Host, Instance, open_db


def fill(data: Path, n: int) -> None:
    """``n`` stopped instances of a down host, written in one transaction."""
    engine, sessions = open_db(Settings(data_dir=data))
    now = time.time()
    with sessions.begin() as s:
        s.execute(insert(Host), [dict(
            name="gone", address="127.0.0.1", cores=64, memory_bytes=1 << 40,
            disk_bytes=1 << 40, drivers={"fake": {}}, state="down", agent_version="bench",
            joined_at=now)])
        s.execute(insert(Instance), [dict(
            name=f"i{k:07d}", host=None, driver="fake", command=["sleep", "1000"], env={},
            tail={}, cpus=0.1, memory_bytes=64 << 20, desired_state="stopped", state="stopped",
            epoch=1, created_at=now, updated_at=now, restarts=0) for k in range(n)])
    engine.dispose()


def start_server(data: Path, log: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_LOG_LEVEL"] = "warning"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral.cli", "server", "--data", str(data), "--tls", "off",
             "--api-host", "127.0.0.1", "--api-port", "0", "--nats-host", "127.0.0.1",
             "--nats-port", "0"], stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)

    def ready() -> dict[str, Any] | None:
        try:
            info = json.loads((data / "server.json").read_text())
        except (OSError, ValueError):
            return None
        return info if info.get("pid") == proc.pid else None

    try:
        info = waiting.wait(ready, "the server ready", 120, 0.1)
    except BaseException:
        stop_server(proc)
        raise
    return proc, info


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def summary(xs: list[float], unit: str = "ms", scale: float = 1000.0) -> str:
    return (f"median {statistics.median(xs) * scale:,.0f} {unit} "
            f"(min {min(xs) * scale:,.0f}, max {max(xs) * scale:,.0f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=0, help="default 20,000 (--long: 100,000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--long", action="store_true")
    args = ap.parse_args()
    n = args.instances or (100_000 if args.long else 20_000)
    top = Path(tempfile.mkdtemp(prefix="corral-lspaging-"))
    data = top / "server"
    data.mkdir(mode=0o700)
    bad: list[str] = []
    try:
        fill(data, n)
        proc, info = start_server(data, top / "server.log")
        try:
            token = Path(info["token_file"]).read_text().strip()
            one: list[float] = []
            first: list[float] = []
            paged: list[float] = []
            deep: list[float] = []
            size = 0
            with Client(info["api_url"], token, timeout=900) as c:
                for r in range(args.rounds):
                    t = time.monotonic()
                    whole = c.instances_page()[0]
                    one.append(time.monotonic() - t)
                    size = len(json.dumps(whole, separators=(",", ":")))
                    t = time.monotonic()
                    pages = c.instance_pages()
                    got = list(next(pages))
                    first.append(time.monotonic() - t)
                    for page in pages:
                        got += page
                    paged.append(time.monotonic() - t)
                    names = [i["name"] for i in got]
                    if names != [i["name"] for i in whole] or len(names) != n:
                        bad.append(f"round {r + 1}: paged {len(names)} names, one answer "
                                   f"{len(whole)}, wanted {n} in the same order")
                    for k in (0, n // 2, max(0, n - PAGE_SIZE - 1)):
                        t = time.monotonic()
                        c.instances_page(PAGE_SIZE, f"i{k:07d}")
                        deep.append(time.monotonic() - t)
                    print(f"  round {r + 1}: one answer {one[-1]:.2f} s, first page "
                          f"{first[-1] * 1000:.0f} ms, paged whole {paged[-1]:.2f} s",
                          flush=True)
        finally:
            stop_server(proc)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(f"\n{n:,} instances, {args.rounds} rounds, {PAGE_SIZE} a page:")
    print(f"  one answer (baseline): {summary(one)}, {size / 1e6:.1f} MB")
    print(f"  first page:            {summary(first)}")
    print(f"  whole list, paged:     {summary(paged)}")
    print(f"  a page at start/middle/end: {summary(deep)}")
    for line in bad:
        print(f"WRONG: {line}")
    print(f"figure: ls_paging.first_page {statistics.median(first) * 1000:.0f} ms")
    print(f"figure: ls_paging.first_page.baseline {statistics.median(one) * 1000:.0f} ms")
    print(f"figure: ls_paging.whole_paged {statistics.median(paged) * 1000:.0f} ms")
    print(f"figure: ls_paging.page_at_depth {statistics.median(deep) * 1000:.0f} ms")
    print(f"figure: ls_paging.one_answer_bytes {size} bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
