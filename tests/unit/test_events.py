"""Events built from committed changes (a real SQLite DB), the publisher's order and retries,
filters, and ``--since`` parsing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from corral.api.models import Event
from corral.api.timespec import iso, parse_since
from corral.config import Settings
from corral.control import events
from corral.control.db import Host, Instance, open_db
from corral.errors import CorralError, InvalidRequest, NoCapacity


class Collect:
    def __init__(self) -> None:
        self.got: list[Event] = []

    def publish(self, ev: Event) -> None:
        self.got.append(ev)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[sessionmaker[Session], Collect, set[str]]]:
    engine, sessions = open_db(Settings(data_dir=tmp_path))
    sink, busy = Collect(), set[str]()
    events.watch(sessions, sink, busy)  # type: ignore[arg-type]
    yield sessions, sink, busy
    engine.dispose()


def _host(name: str) -> Host:
    return Host(name=name, address="127.0.0.1", cores=2, memory_bytes=2**30, disk_bytes=2**30,
                drivers={}, state="up")


def _inst(name: str, host: str) -> Instance:
    return Instance(name=name, host=host, driver="process", command=["sleep", "1"], cpus=0.5,
                    memory_bytes=2**20, desired_state="running", state="pending", epoch=1)


def types(got: list[Event]) -> list[str]:
    return [e.type for e in got]


def test_committed_changes_become_events_in_order(db: Any) -> None:
    sessions, sink, busy = db
    with sessions.begin() as s:
        s.add(_host("h1"))
    with sessions.begin() as s:
        s.add(_inst("web", "h1"))
    assert types(sink.got) == ["host.joined", "instance.created", "instance.placed"]
    assert sink.got[2].host == "h1" and sink.got[2].data["cpus"] == 0.5
    busy.add("web")
    with sessions.begin() as s:
        s.get(Instance, "web").state = "running"
    busy.discard("web")
    with sessions.begin() as s:  # an observation (heartbeat): not busy
        inst = s.get(Instance, "web")
        inst.state, inst.exit_code = "failed", 3
    with sessions.begin() as s:
        s.get(Host, "h1").state = "down"
        s.get(Instance, "web").state = "lost"
    with sessions.begin() as s:
        s.get(Host, "h1").state = "up"
    with sessions.begin() as s:
        s.delete(s.get(Instance, "web"))
    tail = sink.got[3:]
    assert types(tail) == ["instance.state", "instance.state", "host.down", "instance.state",
                           "host.up", "instance.deleted"]
    assert [(e.data["from"], e.data["to"], e.data["cause"]) for e in tail
            if e.type == "instance.state"] == [
        ("pending", "running", "verb"), ("running", "failed", "observed"),
        ("failed", "lost", "lease")]
    assert tail[1].data["exit_code"] == 3
    assert all(e.index == 0 for e in sink.got)  # the stream gives the index


def test_rolled_back_and_unchanged_writes_make_no_events(db: Any) -> None:
    sessions, sink, _ = db
    with sessions.begin() as s:
        s.add(_host("h1"))
    sink.got.clear()
    with pytest.raises(RuntimeError), sessions.begin() as s:
        s.get(Host, "h1").state = "down"
        s.flush()  # flushed, then rolled back: must not be an event
        raise RuntimeError("boom")
    with sessions.begin() as s:
        h = s.get(Host, "h1")
        h.state = "up"  # same value
        h.last_heartbeat = 5.0
    assert sink.got == []


def test_make_refuses_unregistered_types_and_filters_match_prefixes() -> None:
    with pytest.raises(InvalidRequest, match="unknown event type"):
        events.make("instance.exploded")
    ev = events.make("instance.state", instance="web", host="h1")
    assert events.matches(ev)
    assert events.matches(ev, ["instance"]) and events.matches(ev, ["instance.state"])
    assert not events.matches(ev, ["instance.st"]) and not events.matches(ev, ["host"])
    assert events.matches(ev, ["host", "instance"], "web")
    assert not events.matches(ev, (), "db")


class FlakyJS:
    """Fails the first ``fail`` publishes, records the rest."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.sent: list[tuple[bytes, str]] = []

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("nats is away")
        self.sent.append((data, headers["Nats-Msg-Id"]))


def test_publisher_keeps_order_through_failures_and_tells_listeners() -> None:
    async def run() -> tuple[FlakyJS, list[str], events.EventPublisher]:
        js = FlakyJS(fail=2)
        pub = events.EventPublisher(js)
        heard: list[str] = []
        pub.listeners.append(lambda e: heard.append(e.type))
        pub.start()
        for i in range(5):
            pub.emit("instance.error", instance=f"i{i}", verb="stop", code="x", message="m")
        pub.verb_error("i5", "start", NoCapacity("no room"))
        await asyncio.to_thread(pub.emit, "host.down", host="h9")  # from another thread
        await pub.stop(timeout=10)
        return js, heard, pub

    js, heard, pub = asyncio.run(run())
    sent = [Event.model_validate_json(d) for d, _ in js.sent]
    assert [e.instance for e in sent[:6]] == [f"i{i}" for i in range(6)]
    assert sent[5].data == {"verb": "start", "code": "no_capacity", "message": "no room"}
    assert sent[6].type == "host.down" and sent[6].host == "h9"
    assert len({mid for _, mid in js.sent}) == 7  # one dedup id per event
    assert heard == ["instance.error"] * 6 + ["host.down"]
    assert pub.published == 7 and pub.dropped == 0


def test_on_op_change_emits_operation_events() -> None:
    from corral.ops.store import OpRecord

    pub = events.EventPublisher(FlakyJS(0))
    got: list[Event] = []
    pub.listeners.append(got.append)
    pub.on_op_change(OpRecord(kind="migrate", target="web", params={}))
    assert got[0].type == "operation.changed" and got[0].instance == "web"
    assert got[0].data["kind"] == "migrate" and got[0].data["state"] == "running"


def test_since_accepts_durations_times_and_numbers() -> None:
    now = 1_700_000_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("2h", now) == now - 7200
    assert parse_since("1.5d", now) == now - 1.5 * 86400
    assert parse_since("1700000000", now) == now
    assert parse_since(iso(now - 5.25), now) == pytest.approx(now - 5.25)
    assert parse_since("2023-11-14T22:13:20", now) == now  # no zone: UTC
    with pytest.raises(CorralError, match="bad since 'yesterday'"):
        parse_since("yesterday", now)


def test_every_event_type_is_documented() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    missing = [t for t in events.TYPES if f"| `{t}` |" not in text]
    assert not missing, f"event types missing from docs/operations.md: {missing}"
