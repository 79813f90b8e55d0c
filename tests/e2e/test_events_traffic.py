"""Events and live traffic on a real fleet (3 hosts, process driver), through the API and CLI."""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fleetkit import CLI, Fleet

from corral.api.client import Client
from corral.api.models import Event
from corral.api.timespec import iso
from corral.bus import streams, subjects
from corral.bus.connect import connect
from corral.bus.messages import LogBatch

pytestmark = pytest.mark.timeout(600)


def api(f: Fleet) -> Client:
    assert f.ctx is not None
    return Client(f.ctx.url, f.ctx.token, ca_file=f.ctx.ca_file)


def cli_events(f: Fleet, *args: str) -> list[Event]:
    out = f.ok("events", "--json", *args)
    return [Event.model_validate_json(line) for line in out.splitlines() if line.strip()]


def last_index(f: Fleet) -> int:
    with api(f) as c:
        return max((e.index for e in c.events()), default=0)


def test_events_follow_create_stop_and_crash(local_fleet: Fleet) -> None:
    f = local_fleet
    joined = cli_events(f, "--type", "host.joined")
    assert {e.host for e in joined} == {"host1", "host2", "host3"}
    start = last_index(f)

    f.ok("run", "ev1", "--", "sleep", "600")
    time.sleep(0.3)
    mid = time.time()
    time.sleep(0.3)
    f.ok("run", "ev-crash", "--", "sh", "-c", "sleep 1; exit 3")
    f.wait_state("ev-crash", {"failed"})
    f.ok("stop", "ev1", "--timeout", "5")

    with api(f) as c:
        got = list(c.events(after=start))
    assert got == cli_events(f, "--after", str(start))
    indexes = [e.index for e in got]
    assert indexes == sorted(set(indexes)) and indexes[0] > start

    ev1 = [e for e in got if e.instance == "ev1"]
    assert [e.type for e in ev1][:2] == ["instance.created", "instance.placed"]
    moves = [(e.data["from"], e.data["to"]) for e in ev1 if e.type == "instance.state"]
    assert moves == [("pending", "created"), ("created", "running"), ("running", "stopped")]
    crash = [e for e in got if e.instance == "ev-crash" and e.type == "instance.state"]
    assert crash[-1].data["to"] == "failed" and crash[-1].data["exit_code"] == 3
    assert crash[-1].data["cause"] == "observed"
    placed = next(e for e in ev1 if e.type == "instance.placed")
    assert placed.host == f.instance("ev1")["host"]

    # --since: a time between the two creates keeps the crash, drops ev1's creation
    since = cli_events(f, "--since", iso(mid))
    assert since and all(e.index > ev1[1].index for e in since)
    assert any(e.instance == "ev-crash" and e.type == "instance.created" for e in since)
    assert [e.index for e in cli_events(f, "--since", iso(mid), "--instance", "ev1",
                                        "--type", "instance.state")] == [
        e.index for e in ev1 if e.type == "instance.state" and e.data["to"] == "stopped"]

    # a refused verb is an event too
    assert f.cli("thaw", "ev1").returncode != 0
    err = cli_events(f, "--type", "instance.error", "--instance", "ev1")
    assert err[-1].data["verb"] == "thaw" and err[-1].data["code"] == "invalid_transition"

    # -f delivers a new event while it runs
    after = last_index(f)
    proc = subprocess.Popen([*CLI, "events", "-f", "--json", "--after", str(after),
                             "--instance", "ev1"], env=f.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def pump() -> None:
        for x in stdout:
            lines.put(x)

    threading.Thread(target=pump, daemon=True).start()
    try:
        time.sleep(1.0)
        f.ok("start", "ev1")
        first = Event.model_validate_json(lines.get(timeout=20))
        assert first.index > after and first.instance == "ev1"
        assert first.type == "instance.state" and first.data["to"] == "running"
    finally:
        proc.kill()
        proc.wait(10)
    f.ok("rm", "--force", "ev1")
    f.ok("rm", "ev-crash")


def clf(client: str, url: str, status: int, ts: float) -> str:
    when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(ts))
    return f'{client} - - [{when}] "GET {url} HTTP/1.1" {status} 99 "-" "e2e"'


async def _publish(nats_url: str, token: str, ca_file: str, batches: list[LogBatch]) -> None:
    from nats.js.errors import NotFoundError

    from corral.bus.identity import admin

    nc = await connect(nats_url, admin(token, ca_file), "e2e-traffic")
    try:
        js = nc.jetstream()
        try:
            await js.stream_info(streams.LOGS)
        except NotFoundError:
            await js.add_stream(streams.logs_config())
        for b in batches:
            await js.publish(subjects.logs(b.host, b.instance), b.model_dump_json().encode(),
                             headers={"Nats-Msg-Id": b.msg_id})
    finally:
        await nc.close()


def wait_traffic(f: Fleet, name: str, lines: int, *args: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    view = json.loads(f.ok("traffic", name, "--json", *args))
    while view["lines"] < lines and time.monotonic() < deadline:
        time.sleep(0.3)
        view = json.loads(f.ok("traffic", name, "--json", *args))
    assert view["lines"] == lines, view
    return dict(view)


def test_traffic_from_access_batches_on_jetstream(local_fleet: Fleet) -> None:
    f = local_fleet
    assert f.ctx is not None
    f.ok("run", "tr1", "--", "sleep", "600")
    view = f.instance("tr1")
    now = time.time()
    statuses = [200, 200, 301, 404, 500]
    reqs = [(f"10.2.0.{i % 9}", f"/p{i % 4}", statuses[i % 5], now) for i in range(60)]
    lines = [clf(*r) for r in reqs] + ["this is not an access log line"]
    batches = [LogBatch(host=view["host"], instance="tr1", source="access", first_seq=1 + k,
                        lines=lines[k:k + 16], ts=now) for k in range(0, len(lines), 16)]
    stdout = LogBatch(host=view["host"], instance="tr1", source="stdout", first_seq=1,
                      lines=lines, ts=now)
    nats_url = api(f).status().nats_url
    asyncio.run(_publish(nats_url, f.ctx.token, f.ctx.ca_file or "",
                         [*batches, stdout, batches[1]]))

    got = wait_traffic(f, "tr1", len(lines), "--url", "/p1", "--limit", "3")
    assert (got["hits"], got["bad_lines"]) == (60, 1)
    last: dict[str, tuple[str, int]] = {}
    for i, (client, url, _, _) in enumerate(reqs):
        last[client] = (url, i)
    assert got["online"] == len(last)
    on_p1 = sorted((i, c) for c, (u, i) in last.items() if u == "/p1")
    assert got["url_online"] == len(on_p1)
    assert [c["client"] for c in got["clients"]] == [c for _, c in reversed(on_p1)][:3]
    w60 = next(w for w in got["windows"] if w["seconds"] == 60)
    assert w60["hits"] == 60
    for code in set(statuses):
        assert w60["status_per_s"][str(code)] == pytest.approx(
            sum(1 for r in reqs if r[2] == code) / 60)
    assert w60["class_per_s"]["5xx"] == pytest.approx(12 / 60)
    metrics = api(f).metrics_text()
    assert f'corral_instance_online_clients{{instance="tr1"}} {float(len(last))}' in metrics
    assert 'corral_instance_http_requests_per_second{instance="tr1",window="60s"} 1.0' \
        in metrics
    missing = f.cli("traffic", "no-such-instance", "--json")
    assert missing.returncode != 0 and "no instance named" in missing.stderr
    f.ok("rm", "--force", "tr1")


def test_traffic_from_a_tailed_access_log(local_fleet: Fleet, tmp_path: Path) -> None:
    f = local_fleet
    log = tmp_path / "access.log"
    script = (
        'i=0; while [ $i -lt 30 ]; do '
        'echo "10.3.0.$((i % 5)) - - [$(date -u +%d/%b/%Y:%H:%M:%S) +0000] '
        '\\"GET /shop/$((i % 2)) HTTP/1.1\\" $((200 + (i % 3) * 100)) 5 \\"-\\" \\"sh\\"" '
        f'>> {log}; i=$((i+1)); done; echo not-a-request >> {log}; sleep 600')
    f.ok("run", "tr2", "--tail", f"access={log}", "--", "sh", "-c", script)
    got = wait_traffic(f, "tr2", 31, "--url", "/shop/1")
    assert (got["hits"], got["bad_lines"], got["online"]) == (30, 1, 5)
    w60 = next(w for w in got["windows"] if w["seconds"] == 60)
    assert w60["status_per_s"] == pytest.approx({"200": 10 / 60, "300": 10 / 60,
                                                 "400": 10 / 60})
    # clients whose latest request was /shop/1: i odd, last i per client 25..29
    latest = {f"10.3.0.{i % 5}": i for i in range(30)}
    assert {c["client"] for c in got["clients"]} == {c for c, i in latest.items() if i % 2}
    f.ok("rm", "--force", "tr2")
