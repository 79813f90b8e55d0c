"""The HTTP API end to end: a real control plane (uvicorn, SQLite, embedded nats-server) and a
tiny fake agent, written here, that answers join and commands over the real bus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from corral.bus import codec, identity, subjects
from corral.bus.connect import connect, request
from corral.bus.messages import (
    Capacity,
    Command,
    Heartbeat,
    HeartbeatReply,
    InstanceReport,
    InstanceSample,
    JoinReply,
    JoinRequest,
    MetricsSample,
    Reply,
    WireSpec,
)
from corral.config import Settings
from corral.control.server import ControlPlane
from corral.errors import CorralError

GiB = 1024**3
TOKEN = "test-token-123"


class FakeAgent:
    """Answers the server like an agent would, keeping instance states in a dict."""

    def __init__(self, nc: Client, name: str, cores: int = 2, memory: int = 4 * GiB,
                 drivers: tuple[str, ...] = ("process",)) -> None:
        self.nc = nc
        self.name = name
        self.cores = cores
        self.memory = memory
        self.drivers = drivers
        self.instances: dict[str, InstanceReport] = {}
        self.calls: list[Command] = []
        #: verb (or "verb:instance") -> error the next such call answers with
        self.fail: dict[str, CorralError] = {}
        self.seq = 0
        self._sub: Any = None

    async def start(self) -> JoinReply:
        self._sub = await self.nc.subscribe(subjects.command(self.name), cb=self._on_cmd)
        return await self.join()

    async def join(self) -> JoinReply:
        req = JoinRequest(host=self.name, address="127.0.0.1",
                          capacity=Capacity(cores=self.cores, memory_bytes=self.memory,
                                            disk_bytes=10 * GiB),
                          drivers={d: {"can_freeze": True} for d in self.drivers},
                          agent_version="fake", instances=list(self.instances.values()))
        return await request(self.nc, subjects.join(self.name), req, JoinReply, 5)

    async def leave(self) -> None:
        """Stop answering commands (as if the agent died)."""
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def heartbeat(self, timeout: float = 5) -> HeartbeatReply:
        self.seq += 1
        hb = Heartbeat(host=self.name, seq=self.seq, sent_at=time.time(),
                       instances=list(self.instances.values()))
        return await request(self.nc, subjects.heartbeat(self.name), hb, HeartbeatReply,
                             timeout)

    async def publish_metrics(self, usage: dict[str, tuple[float, int]],
                              host_cpu_pct: float | None = None) -> None:
        samples = [InstanceSample(name=n, cpu_ns=1, memory_bytes=mem, generation="g",
                                  cpu_core_pct=core, cpu_host_pct=core / self.cores)
                   for n, (core, mem) in usage.items()]
        sample = MetricsSample(host=self.name, wall_ns=time.time_ns(), host_cores=self.cores,
                               interval_s=1.0, instances=samples, host_cpu_pct=host_cpu_pct)
        await self.nc.publish(subjects.metrics(self.name), codec.encode(sample))
        await self.nc.flush()

    def set_state(self, name: str, state: str, exit_code: int | None = None,
                  signal: int | None = None) -> None:
        r = self.instances[name]
        self.instances[name] = r.model_copy(update={
            "state": state, "exit_code": exit_code, "signal": signal,
            "pid": r.pid if state in ("running", "frozen") else None})

    async def _on_cmd(self, msg: Msg) -> None:
        cmd = codec.decode(msg.data, Command)
        self.calls.append(cmd)
        named = cmd.args.get("name") or (cmd.args.get("spec") or {}).get("name")
        err = self.fail.pop(f"{cmd.verb}:{named}", None) or self.fail.pop(cmd.verb, None)
        if err is not None:
            await msg.respond(codec.encode(Reply(ok=False, error=err.to_dict())))
            return
        result = self._do(cmd.verb, cmd.args)
        await msg.respond(codec.encode(Reply(ok=True, result=result)))

    def _do(self, verb: str, args: dict[str, Any]) -> Any:
        if verb == "create":
            spec = WireSpec.model_validate(args["spec"])
            rep = InstanceReport(name=spec.name, driver=spec.driver, state="created",
                                 epoch=spec.epoch)
            self.instances[spec.name] = rep
            return rep.model_dump()
        name = args["name"]
        if verb == "delete":
            self.instances.pop(name, None)
            return None
        r = self.instances[name]
        new = {"start": "running", "stop": "stopped", "kill": "stopped", "freeze": "frozen",
               "thaw": "running", "status": r.state}[verb]
        update: dict[str, Any] = {"state": new, "exit_code": None, "signal": None}
        if verb == "start":
            update |= {"pid": 4000 + len(self.calls), "epoch": args["epoch"]}
        if new not in ("running", "frozen"):
            update["pid"] = None
        if verb == "kill":
            update["signal"] = args["signal"]
        self.instances[name] = r.model_copy(update=update)
        return self.instances[name].model_dump()


async def wait_for(pred: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


class Harness:
    def __init__(self, plane: ControlPlane, http: httpx.AsyncClient, nc: Client) -> None:
        self.plane = plane
        self.http = http
        self.nc = nc
        self.agents: dict[str, FakeAgent] = {}

    async def agent(self, name: str, **kw: Any) -> FakeAgent:
        a = FakeAgent(self.nc, name, **kw)
        await a.start()
        self.agents[name] = a
        return a

    async def create(self, name: str, **kw: Any) -> httpx.Response:
        body = {"name": name, "command": ["sleep", "60"], "cpus": 0.5, **kw}
        return await self.http.post("/v1/instances", json=body)


def settings_for(tmp: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(data_dir=tmp, token=TOKEN, api_port=0, lease_seconds=30.0,
                                heartbeat_seconds=1.0)
    base.update(kw)
    return Settings(**base)


async def start_harness(settings: Settings) -> AsyncIterator[Harness]:
    plane = ControlPlane(settings)
    await plane.start()
    nc: Client | None = None
    try:
        nc = await connect(plane.nats_url, identity.admin(TOKEN), "fake-agents")
        async with httpx.AsyncClient(base_url=plane.api_url, timeout=30,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            yield Harness(plane, http, nc)
    finally:
        if nc is not None:
            await nc.close()
        await plane.stop()


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in start_harness(settings_for(tmp_path)):
        yield harness


# --- auth, health, errors ---------------------------------------------------------------------


async def test_health_needs_no_token_but_everything_else_does(h: Harness) -> None:
    async with httpx.AsyncClient(base_url=h.plane.api_url) as anon:
        assert (await anon.get("/healthz")).status_code == 200
        for path in ("/v1/hosts", "/v1/instances", "/v1/status", "/metrics", "/openapi.json"):
            r = await anon.get(path)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        r = await anon.get("/v1/hosts", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert r.json()["error"]["message"] == "wrong token"
        assert "DATA/token" in r.json()["error"]["hint"]
        r = await anon.post("/v1/instances", json={"name": "x", "command": ["true"]},
                            headers={"Authorization": "Basic eDp5"})
        assert r.status_code == 401


async def test_openapi_lists_the_routes(h: Harness) -> None:
    spec = (await h.http.get("/openapi.json")).json()
    assert {"/v1/instances", "/v1/instances/{name}/{verb}", "/v1/hosts/{name}"} <= set(
        spec["paths"])


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"name": "a", "command": ["x"], "cpus": -1}, "cpus", "greater than 0"),
        ({"name": "a", "command": []}, "command", "at least 1"),
        ({"name": "a", "command": [" "]}, "command", "program"),
        ({"name": "Bad_Name", "command": ["x"]}, "name", "pattern"),
        ({"command": ["x"]}, "name", "required"),
        ({"name": "a", "command": ["x"], "memory_bytes": "lots"}, "memory_bytes", "integer"),
    ],
)
async def test_malformed_input_gets_422_naming_the_field(
        h: Harness, body: dict[str, Any], field: str, words: str) -> None:
    r = await h.http.post("/v1/instances", json=body)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert err["message"].startswith(f"{field}: ")
    fields = err["details"]["fields"]
    assert fields[0]["field"] == field
    assert words in fields[0]["message"]
    if "cpus" in body and field == "cpus":
        assert fields[0]["value"] == -1


async def test_unknown_things_are_404_in_the_error_shape(h: Harness) -> None:
    r = await h.http.get("/v1/instances/nope")
    assert r.status_code == 404
    assert r.json()["error"] == {"code": "not_found", "message": "no instance named 'nope'",
                                 "hint": "see 'corral ls'", "retryable": False, "details": {}}
    r = await h.http.get("/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await h.http.post("/v1/instances/x/dance")
    assert r.status_code == 422 and r.json()["error"]["details"]["fields"][0]["field"] == "verb"


# --- create, place, verbs -----------------------------------------------------------------


async def test_create_places_creates_and_starts(h: Harness) -> None:
    await h.agent("h1")
    r = await h.create("web", env={"A": "1"})
    assert r.status_code == 201, r.text
    view = r.json()
    assert view["host"] == "h1" and view["state"] == "running"
    assert view["desired_state"] == "running" and view["pid"] is not None
    assert "stop" in view["allowed"] and "start" not in view["allowed"]
    calls = h.agents["h1"].calls
    assert [c.verb for c in calls] == ["create", "start"]
    spec = WireSpec.model_validate(calls[0].args["spec"])
    assert spec.command == ["sleep", "60"] and spec.env == {"A": "1"} and spec.cpus == 0.5
    assert calls[1].args == {"name": "web", "epoch": view["epoch"]}
    listed = (await h.http.get("/v1/instances")).json()
    assert [i["name"] for i in listed] == ["web"]
    dup = await h.create("web")
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "conflict"


async def test_create_without_start_stays_created(h: Harness) -> None:
    await h.agent("h1")
    view = (await h.create("idle", start=False)).json()
    assert view["state"] == "created" and view["desired_state"] == "created"
    assert [c.verb for c in h.agents["h1"].calls] == ["create"]


async def test_spread_over_hosts(h: Harness) -> None:
    await h.agent("h1")
    await h.agent("h2")
    hosts = [(await h.create(f"i{n}", cpus=1.0)).json()["host"] for n in range(4)]
    assert sorted(hosts) == ["h1", "h1", "h2", "h2"]


async def test_oversized_request_names_the_shortfall_per_host(h: Harness) -> None:
    await h.agent("h1", cores=2)
    await h.agent("h2", cores=4, drivers=("runc",))
    await h.create("big", cpus=1.5)
    r = await h.create("huge", cpus=3.0)
    assert r.status_code == 409
    err = r.json()["error"]
    assert err["code"] == "no_capacity" and err["retryable"] is True
    assert err["details"]["shortfall"] == {"h1": "needs 3 cpus, 0.5 free",
                                           "h2": "no process driver"}
    assert "h1: needs 3 cpus, 0.5 free; h2: no process driver" in err["message"]
    assert (await h.http.get("/v1/instances/huge")).status_code == 404


async def test_pinning_to_a_host(h: Harness) -> None:
    await h.agent("h1")
    await h.agent("h2")
    assert (await h.create("p", host="h2")).json()["host"] == "h2"
    r = await h.create("q", host="h9")
    assert r.status_code == 409 and r.json()["error"]["details"]["shortfall"] == {
        "h9": "no such host"}


async def test_forbidden_verb_is_refused_with_state_and_allowed(h: Harness) -> None:
    await h.agent("h1")
    await h.create("web")
    r = await h.http.post("/v1/instances/web/start")
    assert r.status_code == 409
    err = r.json()["error"]
    assert err["code"] == "invalid_transition"
    assert err["details"]["state"] == "running"
    assert err["details"]["allowed"] == ["stop", "kill", "restart", "freeze",
                                          "shelve"]
    assert "from running you can: stop, kill, restart, freeze" in err["hint"]
    r = await h.http.post("/v1/instances/web/thaw")
    assert r.status_code == 409


async def test_verbs_follow_the_table_and_set_desired_state(h: Harness) -> None:
    agent = await h.agent("h1")
    first = (await h.create("web")).json()

    async def act(verb: str, **body: Any) -> dict[str, Any]:
        r = await h.http.post(f"/v1/instances/web/{verb}", json=body or None)
        assert r.status_code == 200, r.text
        return dict(r.json())

    v = await act("freeze")
    assert (v["state"], v["desired_state"]) == ("frozen", "frozen")
    v = await act("thaw")
    assert v["state"] == "running"
    v = await act("stop", timeout=3)
    assert (v["state"], v["desired_state"], v["pid"]) == ("stopped", "stopped", None)
    assert agent.calls[-1].args == {"name": "web", "timeout": 3}
    v = await act("start")
    assert v["state"] == "running" and v["epoch"] == first["epoch"] + 1
    v = await act("restart")
    assert [c.verb for c in agent.calls[-2:]] == ["stop", "start"]
    assert v["state"] == "running" and v["epoch"] == first["epoch"] + 2
    v = await act("kill", signal=15)
    assert v["state"] == "stopped" and agent.calls[-1].args == {"name": "web", "signal": 15}


async def test_stopped_instances_keep_their_reservation(h: Harness) -> None:
    await h.agent("h1", cores=2)
    await h.create("a", cpus=1.5)
    await h.http.post("/v1/instances/a/stop")
    host = (await h.http.get("/v1/hosts/h1")).json()
    assert host["reserved"]["cpus"] == 1.5 and host["free"]["cpus"] == 0.5
    assert (await h.create("b", cpus=1.0)).status_code == 409


async def test_delete(h: Harness) -> None:
    agent = await h.agent("h1")
    await h.create("web")
    r = await h.http.delete("/v1/instances/web")
    assert r.status_code == 409
    assert "force" in r.json()["error"]["hint"]
    r = await h.http.delete("/v1/instances/web", params={"force": "true"})
    assert r.status_code == 204
    assert [c.verb for c in agent.calls[-2:]] == ["stop", "delete"]
    assert (await h.http.get("/v1/instances/web")).status_code == 404
    assert (await h.http.get("/v1/hosts/h1")).json()["reserved"]["cpus"] == 0
    await h.create("idle", start=False)
    assert (await h.http.delete("/v1/instances/idle")).status_code == 204
    assert "idle" not in agent.instances


async def test_agent_refusing_create_leaves_nothing_behind(h: Harness) -> None:
    from corral.errors import DriverError

    agent = await h.agent("h1")
    agent.fail["create"] = DriverError("runc: bundle is broken", hint="check the rootfs")
    r = await h.create("bad")
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "driver_error"
    assert err["message"] == "host h1 could not create 'bad': runc: bundle is broken"
    assert err["hint"] == "check the rootfs"
    assert (await h.http.get("/v1/instances/bad")).status_code == 404


async def test_agent_failing_start_records_failed(h: Harness) -> None:
    from corral.errors import DriverError

    agent = await h.agent("h1")
    agent.fail["start"] = DriverError("exec: no such file")
    r = await h.create("nostart")
    assert r.status_code == 502
    assert "created on h1 but did not start" in r.json()["error"]["message"]
    view = (await h.http.get("/v1/instances/nostart")).json()
    assert view["state"] == "failed" and "start" in view["allowed"]


async def test_silent_agent_gives_503_and_a_failed_record(h: Harness) -> None:
    agent = await h.agent("h1")
    await agent.leave()
    r = await h.create("ghost")
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "host_unavailable" and err["retryable"] is True
    assert "recorded as failed" in err["hint"]
    assert (await h.http.get("/v1/instances/ghost")).json()["state"] == "failed"


# --- observed state: heartbeats, leases -------------------------------------------------------


async def test_heartbeats_report_crashes_and_exits(h: Harness) -> None:
    agent = await h.agent("h1")
    await h.create("crashy")
    await h.create("done")
    agent.set_state("crashy", "exited", exit_code=137)
    agent.set_state("done", "exited", exit_code=0)
    reply = await agent.heartbeat()
    assert reply.known and reply.lease_expires_at > time.time()
    crashy = (await h.http.get("/v1/instances/crashy")).json()
    assert (crashy["state"], crashy["exit_code"], crashy["pid"]) == ("failed", 137, None)
    assert crashy["desired_state"] == "running"
    done = (await h.http.get("/v1/instances/done")).json()
    assert (done["state"], done["exit_code"]) == ("exited", 0)


async def test_stale_epoch_reports_are_ignored(h: Harness) -> None:
    agent = await h.agent("h1")
    await h.create("web")
    await h.http.post("/v1/instances/web/restart")
    r = agent.instances["web"]
    agent.instances["web"] = r.model_copy(update={"state": "failed", "epoch": r.epoch - 1,
                                                  "exit_code": 1})
    await agent.heartbeat()
    assert (await h.http.get("/v1/instances/web")).json()["state"] == "running"


async def test_unknown_host_heartbeat_asks_to_rejoin(h: Harness) -> None:
    stranger = FakeAgent(h.nc, "stranger")
    assert (await stranger.heartbeat()).known is False


async def test_join_reports_update_observed_state(h: Harness) -> None:
    agent = await h.agent("h1")
    await h.create("web")
    agent.set_state("web", "exited", exit_code=3)
    agent.instances["unknown"] = InstanceReport(name="unknown", driver="process",
                                                state="running")
    await agent.join()
    assert (await h.http.get("/v1/instances/web")).json()["state"] == "failed"
    assert (await h.http.get("/v1/instances/unknown")).status_code == 404


@pytest.fixture
async def short_lease(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in start_harness(settings_for(tmp_path, lease_seconds=1.0)):
        yield harness


async def test_lease_expiry_marks_host_down_and_instances_lost(short_lease: Harness) -> None:
    h = short_lease
    agent = await h.agent("h1")
    await h.create("web")

    async def down() -> bool:
        return bool((await h.http.get("/v1/hosts/h1")).json()["state"] == "down")

    await wait_for(down, timeout=10)
    view = (await h.http.get("/v1/instances/web")).json()
    assert view["state"] == "lost" and view["allowed"] == ["rm"]
    status = (await h.http.get("/v1/status")).json()
    assert status["hosts_down"] == 1 and status["instances"] == {"lost": 1}
    r = await h.http.post("/v1/instances/web/stop")
    assert r.status_code == 409 and r.json()["error"]["details"]["state"] == "lost"
    # the agent comes back: one heartbeat brings the host up and the instance back
    reply = await agent.heartbeat()
    assert reply.known
    assert (await h.http.get("/v1/hosts/h1")).json()["state"] == "up"
    assert (await h.http.get("/v1/instances/web")).json()["state"] == "running"


async def test_forgetting_an_instance_of_a_down_host_needs_force(short_lease: Harness) -> None:
    h = short_lease
    await h.agent("h1")
    await h.create("web")

    async def lost() -> bool:
        return bool((await h.http.get("/v1/instances/web")).json()["state"] == "lost")

    await wait_for(lost, timeout=10)
    r = await h.http.delete("/v1/instances/web")
    assert r.status_code == 503 and "--force" in r.json()["error"]["hint"]
    assert (await h.http.delete("/v1/instances/web?force=true")).status_code == 204


# --- usage and /metrics -------------------------------------------------------------------


async def test_usage_in_views_and_metrics(h: Harness) -> None:
    agent = await h.agent("h1", cores=2)
    await h.create("burn", cpus=1.0)
    await h.create("idle", cpus=0.5)
    await agent.publish_metrics({"burn": (100.0, 50 * 1024**2), "idle": (2.0, 10 * 1024**2)},
                                host_cpu_pct=60.0)

    async def sampled() -> bool:
        return bool((await h.http.get("/v1/instances/burn")).json()["usage"]["cpu_core_pct"] == 100)

    await wait_for(sampled)
    burn = (await h.http.get("/v1/instances/burn")).json()["usage"]
    assert burn["cpu_host_pct"] == 50.0 and burn["memory_bytes"] == 50 * 1024**2
    host = (await h.http.get("/v1/hosts/h1")).json()
    assert host["usage"]["cpu_core_pct"] == 102.0
    assert host["usage"]["cpu_host_pct"] == 51.0
    assert host["usage"]["memory_bytes"] == 60 * 1024**2
    assert host["rest_host_pct"] == pytest.approx(9.0)
    assert host["reserved"] == {"cpus": 1.5, "memory_bytes": 2 * 64 * 1024**2}

    text = (await h.http.get("/metrics")).text
    assert ('corral_instance_cpu_core_percent{driver="process",host="h1",instance="burn"} 100.0'
            in text)
    assert ('corral_instance_cpu_host_percent{driver="process",host="h1",instance="burn"} 50.0'
            in text)
    assert 'corral_instance_memory_bytes{driver="process",host="h1",instance="idle"}' in text
    assert 'corral_host_up{host="h1"} 1.0' in text
    assert 'corral_host_cpu_percent{host="h1"} 51.0' in text
    assert 'corral_host_reserved_cpus{host="h1"} 1.5' in text
    assert 'corral_host_rest_cpu_percent{host="h1"} 9.0' in text

    # a stopped instance has no usage any more
    await h.http.post("/v1/instances/burn/stop")
    assert (await h.http.get("/v1/instances/burn")).json()["usage"]["cpu_core_pct"] is None


async def test_metrics_operators_alert_on(h: Harness, tmp_path: Path) -> None:
    """Cumulative CPU seconds, standby freshness, operations by outcome with durations, the
    capture lag: present, with the values the fleet holds, and valid for promtool."""
    import shutil
    import subprocess

    from corral.control.db import Standby
    from corral.ops.store import OpRecord, OpState

    agent = await h.agent("h1", cores=2)
    await h.agent("h2", cores=2)
    await h.create("web", cpus=0.5)
    samples = [InstanceSample(name="web", cpu_ns=7_500_000_000, memory_bytes=1, generation="g",
                              cpu_core_pct=10.0, cpu_host_pct=5.0)]
    sample = MetricsSample(host="h1", wall_ns=time.time_ns(), host_cores=2, interval_s=1.0,
                           instances=samples, host_cpu_pct=10.0, log_lag_bytes=4096)
    await agent.nc.publish(subjects.metrics("h1"), codec.encode(sample))
    fleet = h.plane.fleet
    assert fleet is not None and h.plane.ops is not None
    now = time.time()
    with fleet.sessions.begin() as s:
        s.add(Standby(instance="web", host="h2", every_seconds=60.0, state="stale",
                      data_at=now - 90, last_freeze_ms=42.0, syncs=3, total_bytes=1000))
    store = h.plane.ops.store
    for state, secs in ((OpState.SUCCEEDED, 0.3), (OpState.SUCCEEDED, 4.0),
                        (OpState.ROLLED_BACK, 40.0), (OpState.RUNNING, 1.0)):
        store.save(OpRecord(kind="migrate", target="web", params={}, state=state,
                            created_at=now - secs, updated_at=now))

    async def sampled() -> bool:
        return "corral_instance_cpu_seconds_total" in (await h.http.get("/metrics")).text

    await wait_for(sampled)
    text = (await h.http.get("/metrics")).text
    assert ('corral_instance_cpu_seconds_total{driver="process",host="h1",instance="web"} 7.5'
            in text)
    assert 'corral_host_log_capture_lag_bytes{host="h1"} 4096.0' in text
    age = next(line for line in text.splitlines()
               if line.startswith('corral_standby_data_age_seconds{host="h2",instance="web"}'))
    assert 89.0 <= float(age.split()[-1]) < 120.0
    assert 'corral_standby_last_freeze_seconds{host="h2",instance="web"} 0.042' in text
    assert 'corral_standby_failed{host="h2",instance="web"} 1.0' in text
    assert 'corral_standby_refreshes_total{host="h2",instance="web"} 3.0' in text
    assert 'corral_operations_total{kind="migrate",outcome="succeeded"} 2.0' in text
    assert 'corral_operations_total{kind="migrate",outcome="rolled_back"} 1.0' in text
    assert 'corral_operations_running{kind="migrate"} 1.0' in text
    assert 'corral_operation_duration_seconds_bucket{kind="migrate",le="0.5"} 1.0' in text
    assert 'corral_operation_duration_seconds_bucket{kind="migrate",le="5.0"} 2.0' in text
    assert 'corral_operation_duration_seconds_bucket{kind="migrate",le="+Inf"} 3.0' in text
    assert 'corral_operation_duration_seconds_count{kind="migrate"} 3.0' in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/bootstrap installs prometheus"
    checked = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                             capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_status(h: Harness) -> None:
    await h.agent("h1")
    await h.create("a")
    await h.create("b", start=False)
    s = (await h.http.get("/v1/status")).json()
    assert s["hosts_up"] == 1 and s["hosts_down"] == 0
    assert s["instances"] == {"created": 1, "running": 1}
    assert s["nats_url"] == h.plane.nats_url and s["db"].startswith("sqlite:///")


async def test_server_json_is_written_while_running(h: Harness) -> None:
    import json

    info = json.loads((h.plane.data_dir / "server.json").read_text())
    assert info["api_url"] == h.plane.api_url and info["nats_url"] == h.plane.nats_url
    assert Path(info["token_file"]).name == "token"


async def test_a_bug_is_a_500_in_the_error_shape(h: Harness, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    from corral.control.instances import InstanceService

    def broken(self: InstanceService, *args: Any) -> list[Any]:
        raise RuntimeError("oops")

    monkeypatch.setattr(InstanceService, "page", broken)  # what the list reads with
    r = await h.http.get("/v1/instances")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "internal" and "RuntimeError: oops" in err["message"]
    assert "server log" in err["hint"]


async def test_wrong_method_is_an_error_body_too(h: Harness) -> None:
    r = await h.http.put("/v1/instances")
    assert r.status_code == 405 and r.json()["error"]["code"] == "http_error"
