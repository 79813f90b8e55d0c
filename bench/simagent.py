#!/usr/bin/env python3
"""Simulated agents for bench/fleet_scale.py: many hosts in one asyncio process, each speaking
the real agent protocol over its own NATS connection.

Why not real agents: a ``corral agent`` is a process of ~60 MB with a fence keeper beside it;
a thousand of them do not fit on the bench's machine, and what the server sees of a host is
only its bus traffic. So each simulated host logs in with its own enrolled nkey (the bus
checks its permissions exactly as for a real agent: it may publish only on its own subjects),
joins on ``corral.join.<host>``, heartbeats on ``corral.hb.<host>`` at the interval the join
reply gives, publishes a metrics sample every ``sample_seconds`` and answers the server's
calls on ``corral.cmd.<host>`` with the :class:`~corral.drivers.fake.FakeDriver`'s semantics
(create, start, stop, kill, status, list, delete; the disk verbs are refused). Every payload
is the product's own pydantic model (``corral.bus.messages``, ``corral.bus.rpc``).

It is driven over stdin/stdout, one JSON object per line, by the bench:

* first line in: ``{"nats_url", "ca_file", "hosts": [{"name", "seed", "cores",
  "memory_bytes"}], "metrics": true}``; out: ``{"event": "joined", "connect_s", "join_s"}``
  once every host has connected and joined;
* ``{"cmd": "mark"}``: start a new measuring window (``{"event": "marked"}``);
* ``{"cmd": "stats"}``: the window's heartbeat round trips (ms), unanswered heartbeats, the
  longest gap between two answered heartbeats of one host, how many hosts went a whole lease
  without an answer (a real agent would have fenced), and the loop's worst lag;
* ``{"cmd": "inventory"}``: every instance each host holds and its state;
* ``{"cmd": "stop"}``: close every connection and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

import corral
from corral.bus import rpc, subjects
from corral.bus.codec import decode, encode
from corral.bus.identity import Credentials, inbox
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
)
from corral.drivers.base import Handle, Spec
from corral.drivers.fake import FakeDriver
from corral.errors import CorralError, InvalidRequest, NotFound, NotSupported

#: the driver name simulated hosts offer (instances are created with ``driver="fake"``, so
#: no row of this bench can be mistaken for a real process)
DRIVER = "fake"
#: connections opened at once while the fleet starts (TLS handshakes cost the bus CPU)
CONNECT_PARALLEL = 50
#: how long the fleet's start waits for every host to join (the rest go on trying)
JOIN_WAIT = 180.0


@dataclass
class Held:
    handle: Handle
    epoch: int


@dataclass
class Window:
    """What one measuring window saw."""

    rtts_ms: list[float] = field(default_factory=list)
    missed: int = 0
    max_gap_s: float = 0.0
    #: hosts that went a whole lease without an answered heartbeat (a real agent fences)
    lapsed: set[str] = field(default_factory=set)
    max_lag_ms: float = 0.0


class SimHost:
    def __init__(self, fleet: SimFleet, name: str, seed: str, cores: int,
                 memory_bytes: int) -> None:
        self.fleet = fleet
        self.name = name
        self.seed = seed
        self.capacity = Capacity(cores=cores, memory_bytes=memory_bytes,
                                 disk_bytes=500 * 1024**3)
        self.driver = FakeDriver(scope=name)
        self.held: dict[str, Held] = {}
        self.nc: Client | None = None
        self.seq = 0
        self.heartbeat_s = 2.0
        self.sample_s = 1.0
        self.lease_s = 10.0
        self.last_ack = 0.0

    async def connect(self, url: str, ca_file: str) -> None:
        opts = Credentials(seed=self.seed, ca_file=ca_file, inbox_prefix=inbox(self.name)
                           ).options()
        if ca_file:
            opts["tls"] = self.fleet.tls
        self.nc = await nats.connect(url.split(","), name=f"simagent-{self.name}",
                                     allow_reconnect=True, max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.5, connect_timeout=10,
                                     error_cb=self.fleet.on_error, **opts)
        await self.nc.subscribe(subjects.command(self.name), cb=self.on_command)

    def reports(self) -> list[InstanceReport]:
        out = []
        for name, h in self.held.items():
            st = self.driver.status(h.handle)
            out.append(InstanceReport(name=name, driver=DRIVER, state=st.state, pid=st.pid,
                                      exit_code=st.exit_code, signal=st.signal, epoch=h.epoch))
        return out

    async def join(self) -> None:
        assert self.nc is not None
        req = JoinRequest(host=self.name, address="127.0.0.1", capacity=self.capacity,
                          drivers={DRIVER: dataclasses.asdict(self.driver.capabilities)},
                          agent_version=corral.__version__, instances=self.reports())
        delay = 0.2
        while True:  # the agent's own retry, for ever: 5 s a try, backing off up to 10 s
            try:
                msg = await self.nc.request(subjects.join(self.name), encode(req), timeout=5)
                reply = decode(msg.data, JoinReply)
                break
            except Exception:
                await asyncio.sleep(delay)
                delay = min(2 * delay, 10.0)
        self.heartbeat_s, self.sample_s = reply.heartbeat_seconds, reply.sample_seconds
        self.lease_s = reply.lease_seconds
        self.last_ack = time.monotonic()

    async def heartbeat_loop(self) -> None:
        assert self.nc is not None
        # a random phase, as agents started at different moments have
        await asyncio.sleep(random.uniform(0, self.heartbeat_s))
        while True:
            self.seq += 1
            hb = Heartbeat(host=self.name, seq=self.seq, sent_at=time.time(),
                           instances=self.reports())
            sent = time.monotonic()
            w = self.fleet.window
            try:
                wait = max(1.0, min(2 * self.heartbeat_s, self.lease_s / 2))
                msg = await self.nc.request(subjects.heartbeat(self.name), encode(hb),
                                            timeout=wait)
                reply = decode(msg.data, HeartbeatReply)
            except Exception:
                w.missed += 1
            else:
                now = time.monotonic()
                w.rtts_ms.append((now - sent) * 1000)
                if reply.known:
                    # the lease counts from the send (as agent/fence.py's LeaseClock does)
                    w.max_gap_s = max(w.max_gap_s, sent - self.last_ack)
                    if sent - self.last_ack > self.lease_s:
                        w.lapsed.add(self.name)
                    self.last_ack = sent
                    if reply.heartbeat_seconds > 0:  # the fleet's pace (control/pace.py)
                        self.heartbeat_s = reply.heartbeat_seconds
                        self.lease_s = reply.lease_seconds
                        self.sample_s = reply.sample_seconds
                else:
                    await self.join()
            if time.monotonic() - self.last_ack > self.lease_s:
                w.lapsed.add(self.name)
            # the agent's pace: the next one an interval after this one ended (no catching up)
            await asyncio.sleep(self.heartbeat_s)

    async def metrics_loop(self) -> None:
        assert self.nc is not None
        await asyncio.sleep(random.uniform(0, self.sample_s))
        next_at = time.monotonic()
        while True:
            next_at += self.sample_s
            handles = [h.handle for h in self.held.values()]
            stats = self.driver.stats(handles)
            sample = MetricsSample(
                host=self.name, wall_ns=time.time_ns(), host_cores=self.capacity.cores,
                interval_s=self.sample_s, host_cpu_pct=1.0,
                instances=[InstanceSample(name=n, cpu_ns=s.cpu_ns, memory_bytes=s.memory_bytes,
                                          generation=s.generation, cpu_core_pct=0.0,
                                          cpu_host_pct=0.0) for n, s in stats.items()])
            with contextlib.suppress(Exception):
                await self.nc.publish(subjects.metrics(self.name), encode(sample))
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    # --- the server's calls, answered as the fake driver would -------------------------------
    async def on_command(self, msg: Msg) -> None:
        try:
            cmd = decode(msg.data, Command)
            call = rpc.CALLS.get(cmd.verb)
            if call is None:
                raise InvalidRequest(f"unknown verb '{cmd.verb}'")
            result = call.dump(self.handle(cmd.verb, call.args.model_validate(cmd.args)))
            reply = Reply(ok=True, result=result)
        except CorralError as exc:
            reply = Reply(ok=False, error=exc.to_dict())
        except Exception as exc:
            reply = Reply(ok=False, error=CorralError(f"{type(exc).__name__}: {exc}").to_dict())
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(encode(reply))

    def _report(self, name: str) -> InstanceReport:
        h = self.held[name]
        st = self.driver.status(h.handle)
        return InstanceReport(name=name, driver=DRIVER, state=st.state, pid=st.pid,
                              exit_code=st.exit_code, signal=st.signal, epoch=h.epoch)

    def _get(self, name: str) -> Held:
        if name not in self.held:
            raise NotFound(f"instance '{name}' is not on this host")
        return self.held[name]

    def handle(self, verb: str, args: Any) -> Any:
        d = self.driver
        if verb == "create":
            spec = args.spec
            handle = d.create(Spec(name=spec.name, command=spec.command, workdir="",
                                   cpus=spec.cpus, memory_bytes=spec.memory_bytes))
            self.held[spec.name] = Held(handle, spec.epoch)
            return self._report(spec.name)
        if verb == "start":
            h = self._get(args.name)
            h.handle = d.start(h.handle)
            h.epoch = args.epoch if args.epoch is not None else h.epoch
            return self._report(args.name)
        if verb == "stop":
            d.stop(self._get(args.name).handle, args.timeout or 0.0)
            return self._report(args.name)
        if verb == "kill":
            d.kill(self._get(args.name).handle, args.signal)
            return self._report(args.name)
        if verb == "status":
            return self._report(args.name)
        if verb == "list":
            return self.reports()
        if verb == "delete":
            if args.name in self.held:
                d.delete(self.held.pop(args.name).handle)
            return None
        raise NotSupported(f"a simulated host does not do '{verb}'")


class SimFleet:
    def __init__(self, conf: dict[str, Any]) -> None:
        self.url = str(conf["nats_url"])
        self.ca_file = str(conf.get("ca_file") or "")
        self.tls: Any = None
        if self.ca_file:
            import ssl

            self.tls = ssl.create_default_context(cafile=self.ca_file)
        self.hosts = [SimHost(self, h["name"], h["seed"], int(h["cores"]),
                              int(h["memory_bytes"])) for h in conf["hosts"]]
        self.window = Window()
        self.metrics = bool(conf.get("metrics", True))
        self.errors = 0
        self.tasks: list[asyncio.Task[None]] = []

    async def on_error(self, exc: Exception) -> None:
        self.errors += 1

    async def start(self) -> dict[str, Any]:
        t0 = time.monotonic()
        gate = asyncio.Semaphore(CONNECT_PARALLEL)

        async def one(h: SimHost) -> None:
            async with gate:
                await h.connect(self.url, self.ca_file)

        await asyncio.gather(*(one(h) for h in self.hosts))
        t1 = time.monotonic()

        self.tasks.append(asyncio.create_task(self.lag_loop()))

        async def join(h: SimHost) -> None:
            async with gate:
                await h.join()
            # as an agent does: heartbeats from its own join on, not the fleet's
            self.tasks.append(asyncio.create_task(h.heartbeat_loop()))
            if self.metrics:
                self.tasks.append(asyncio.create_task(h.metrics_loop()))

        joins = [asyncio.create_task(join(h)) for h in self.hosts]
        self.tasks += joins
        done, pending = await asyncio.wait(joins, timeout=JOIN_WAIT)
        t2 = time.monotonic()
        # the rest keep trying, as agents would; the bench reports them
        return {"event": "joined", "connect_s": t1 - t0, "join_s": t2 - t1,
                "joined": len(done), "pending": len(pending)}

    async def lag_loop(self) -> None:
        """How late this process's loop runs: when it is late, round trips measured here
        include our own delay, not only the server's."""
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.05)
            lag = (time.monotonic() - t - 0.05) * 1000
            self.window.max_lag_ms = max(self.window.max_lag_ms, lag)

    def stats(self) -> dict[str, Any]:
        w = self.window
        return {"event": "stats", "rtts_ms": [round(x, 3) for x in w.rtts_ms],
                "missed": w.missed, "max_gap_s": w.max_gap_s, "lapsed": sorted(w.lapsed),
                "max_lag_ms": w.max_lag_ms, "bus_errors": self.errors}

    def inventory(self) -> dict[str, Any]:
        return {"event": "inventory", "held": {
            h.name: {n: h.driver.status(x.handle).state for n, x in h.held.items()}
            for h in self.hosts}}

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for h in self.hosts:
            if h.nc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(h.nc.close(), 5)


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    conf = json.loads(await reader.readline())
    fleet = SimFleet(conf)
    try:
        say(await fleet.start())
        while line := await reader.readline():
            cmd = json.loads(line).get("cmd")
            if cmd == "mark":
                fleet.window = Window()
                say({"event": "marked"})
            elif cmd == "stats":
                say(fleet.stats())
            elif cmd == "inventory":
                say(fleet.inventory())
            elif cmd == "stop":
                break
    finally:
        await fleet.stop()
    say({"event": "stopped"})


if __name__ == "__main__":
    asyncio.run(main())
