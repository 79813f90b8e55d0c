"""Agent handlers, dispatch, recovery and the sampling pass, in-process on the fake driver."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from agentkit import call as _call
from agentkit import ok as _ok

from corral.agent.daemon import dispatch
from corral.agent.handlers import HANDLERS
from corral.agent.sampler import sample_pass
from corral.agent.state import AgentState
from corral.bus.codec import encode
from corral.bus.messages import Reply
from corral.drivers.base import Driver
from corral.drivers.fake import FakeDriver, FakeWorld
from corral.errors import DriverError
from corral.telemetry.accounting import CpuAccountant


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _state(tmp_path: Path, world: FakeWorld | None = None) -> tuple[AgentState, FakeDriver]:
    drv = FakeDriver("h1", world)
    drivers: dict[str, Driver] = {"fake": drv}
    return AgentState(tmp_path, drivers, stop_timeout=1.0), drv


def _spec(name: str = "a", epoch: int = 1, **kw: Any) -> dict[str, Any]:
    return {"name": name, "driver": "fake", "command": ["run"], "epoch": epoch, **kw}


def test_handlers_cover_every_call() -> None:
    from corral.bus.rpc import CALLS

    assert sorted(HANDLERS) == sorted(CALLS)


def test_each_handler_takes_its_calls_argument_model() -> None:
    """The table and the handlers agree on types too: a handler annotated with another
    call's model would read fields the dispatcher never validated."""
    import typing

    import corral.agent.disk_handlers
    import corral.agent.handlers
    import corral.agent.shelf
    from corral.bus import rpc

    for verb, handler in HANDLERS.items():
        mod = vars(corral.agent.handlers) | vars(corral.agent.disk_handlers) | vars(
            corral.agent.shelf)
        hints = typing.get_type_hints(handler, globalns=mod)
        assert hints["args"] is rpc.CALLS[verb].args, f"{verb}: {hints['args']}"


async def test_bad_arguments_are_refused_before_the_handler(tmp_path: Path) -> None:
    st, _ = _state(tmp_path)
    for verb, args in [("kill", {"name": "a", "signal": "nine"}),
                       ("stop", {"name": "a", "timeout": -1}),
                       ("status", {"name": "../etc"}),
                       ("delete", {"name": "a", "purge": True}),
                       ("chunks_cached", {"ids": ["zz"]})]:
        reply = await _call(st, verb, **args)
        assert not reply.ok and reply.error is not None
        assert reply.error["code"] == "invalid_request", (verb, reply.error)
        assert f"bad arguments for '{verb}'" in reply.error["message"]


async def test_lifecycle_through_dispatch(tmp_path: Path) -> None:
    st, _ = _state(tmp_path)
    assert (await _ok(st, "create", spec=_spec()))["state"] == "created"
    assert (tmp_path / "instances" / "a" / "instance.json").is_file()
    # create is idempotent for the same spec, refused for another
    assert (await _ok(st, "create", spec=_spec()))["state"] == "created"
    other = await _call(st, "create", spec=_spec(command=["other"]))
    assert other.error and other.error["code"] == "conflict"
    running = await _ok(st, "start", name="a", epoch=1)
    assert running["state"] == "running" and running["pid"]
    assert (await _ok(st, "freeze", name="a"))["state"] == "frozen"
    busy = await _call(st, "delete", name="a")
    assert busy.error and busy.error["code"] == "conflict"
    assert (await _ok(st, "thaw", name="a"))["state"] == "running"
    assert (await _ok(st, "stop", name="a", timeout=1))["state"] == "stopped"
    assert [r["name"] for r in await _ok(st, "list")] == ["a"]
    assert await _ok(st, "delete", name="a") is None
    assert not (tmp_path / "instances" / "a").exists()
    assert await _ok(st, "list") == []
    assert await _ok(st, "delete", name="a") is None  # idempotent


async def test_kill_with_ending_signal_reads_stopped(tmp_path: Path) -> None:
    st, _ = _state(tmp_path)
    await _ok(st, "create", spec=_spec())
    await _ok(st, "start", name="a", epoch=1)
    assert (await _ok(st, "kill", name="a", signal=int(signal.SIGKILL)))["state"] == "stopped"


async def test_crash_reads_failed_and_clean_exit_reads_exited(tmp_path: Path) -> None:
    st, drv = _state(tmp_path)
    for name in ("crash", "clean"):
        await _ok(st, "create", spec=_spec(name))
        await _ok(st, "start", name=name, epoch=1)
    drv.crash("crash", signal=int(signal.SIGKILL))
    drv.crash("clean", code=0)
    assert (await _ok(st, "status", name="crash"))["state"] == "failed"
    clean = await _ok(st, "status", name="clean")
    assert (clean["state"], clean["exit_code"]) == ("exited", 0)
    assert st.changed.is_set()


async def test_stale_epoch_refused_and_newer_accepted(tmp_path: Path) -> None:
    st, drv = _state(tmp_path)
    await _ok(st, "create", spec=_spec(epoch=5))
    stale = await _call(st, "start", name="a", epoch=4)
    assert stale.error and stale.error["code"] == "conflict"
    assert stale.error["details"] == {"epoch": 4, "newest": 5}
    assert ("start", "a") not in drv.calls
    assert (await _ok(st, "start", name="a", epoch=6))["epoch"] == 6
    # the fence survives an agent restart: it is persisted with the record
    st2, _ = _state(tmp_path, drv.world)
    await st2.recover_all()
    again = await _call(st2, "start", name="a", epoch=5)
    assert again.error and again.error["code"] == "conflict"


async def test_bad_input_and_driver_failures_become_typed_errors(tmp_path: Path) -> None:
    st, drv = _state(tmp_path)
    unknown = await _call(st, "bogus")
    assert unknown.error and unknown.error["code"] == "invalid_request"
    garbage = await dispatch(st, b"[1, 2")
    assert garbage.error and garbage.error["code"] == "invalid_request"
    missing = await _call(st, "start", name="nope", epoch=1)
    assert missing.error and missing.error["code"] == "not_found"
    bad_spec = await _call(st, "create", spec={"name": "x"})
    assert bad_spec.error and bad_spec.error["code"] == "invalid_request"
    bad_name = await _call(st, "create", spec=_spec("../x"))
    assert bad_name.error and bad_name.error["code"] == "invalid_request"
    await _ok(st, "create", spec=_spec())
    drv.fail_next("start", DriverError("runc said no", hint="look"))
    failed = await _call(st, "start", name="a", epoch=1)
    assert failed.error == {"code": "driver_error", "message": "runc said no", "hint": "look",
                            "retryable": False}

    def boom(*_: Any) -> None:
        raise RuntimeError("kaboom")

    drv.freeze = boom  # type: ignore[method-assign,assignment]
    await _ok(st, "start", name="a", epoch=1)
    wrapped = await _call(st, "freeze", name="a")
    assert wrapped.error and wrapped.error["code"] == "driver_error"
    assert "kaboom" in wrapped.error["message"]


async def test_recover_reattaches_without_starting_anything(tmp_path: Path) -> None:
    world = FakeWorld()
    st, _ = _state(tmp_path, world)
    await _ok(st, "create", spec=_spec("run"))
    pid = (await _ok(st, "start", name="run", epoch=1))["pid"]
    await _ok(st, "create", spec=_spec("idle"))
    # "kill -9 the agent": a new state object over the same directory and the same world
    st2, drv2 = _state(tmp_path, world)
    await st2.recover_all()
    reports = {r.name: r for r in st2.reports()}
    assert (reports["run"].state, reports["run"].pid) == ("running", pid)
    assert reports["idle"].state == "created"
    assert [v for v, _ in drv2.calls] == ["recover", "recover"]
    assert (await _ok(st2, "stop", name="run"))["state"] == "stopped"


def test_sample_pass_accounts_and_reports_missing(tmp_path: Path) -> None:
    clock = Clock()
    world = FakeWorld(clock=clock)
    drv = FakeDriver("h1", world)
    from corral.drivers.base import Spec

    handles = []
    for name in ("busy", "half", "gone"):
        h = drv.start(drv.create(Spec(name=name, command=["x"], workdir=str(tmp_path))))
        handles.append(h)
    drv.set_cpu_rate("busy", 1.0)
    drv.set_cpu_rate("half", 0.5)
    acc = CpuAccountant(host_cores=4)
    def ns() -> int:
        return int(clock.now * 1e9)

    first = sample_pass({"fake": drv}, handles, acc, "h1", 1.0, ns)
    assert all(i.cpu_core_pct is None for i in first.sample.instances)
    assert first.missing == frozenset()
    drv.crash("gone")
    clock.now += 2.0
    second = sample_pass({"fake": drv}, handles, acc, "h1", 2.0, ns)
    figs = {i.name: (i.cpu_core_pct, i.cpu_host_pct) for i in second.sample.instances}
    assert figs["busy"] == pytest.approx((100.0, 25.0))
    assert figs["half"] == pytest.approx((50.0, 12.5))
    assert second.missing == frozenset({"gone"})
    assert "gone" not in acc.known()
    assert second.sample.host_cores == 4 and second.cpu_s >= 0.0


def test_unwrap_accepts_plain_or_wrapped_replies_and_raises_errors() -> None:
    from corral.agent.daemon import unwrap
    from corral.bus.messages import JoinReply
    from corral.errors import Conflict, CorralError

    plain = JoinReply(lease_seconds=10, heartbeat_seconds=2, sample_seconds=1)
    assert unwrap(encode(plain), JoinReply) == plain
    wrapped = Reply(ok=True, result=plain.model_dump())
    assert unwrap(encode(wrapped), JoinReply) == plain
    refused = Reply(ok=False, error=Conflict("name taken", hint="rename").to_dict())
    with pytest.raises(Conflict, match="name taken"):
        unwrap(encode(refused), JoinReply)
    with pytest.raises(CorralError, match="malformed"):
        unwrap(b'{"what": 1}', JoinReply)


async def test_disks_are_adopted_unless_the_instance_is_new(tmp_path: Path) -> None:
    """A disk already at DISK_ROOT/NAME is the instance's (a migration or a shelf put it
    there) -- unless the server says the instance is new: then it is set aside, not lost."""
    from corral.agent.disks import HostDisks

    st, _ = _state(tmp_path)
    st.disks = HostDisks(tmp_path / "disks", "dir", tmp_path, "h1")
    moved = st.disks.publish("a", st.disks.new_dir("a"))
    (moved / "data").write_text("moved here")
    await _ok(st, "create", spec=_spec())
    assert (st.disks.path("a") / "data").read_text() == "moved here"
    await _ok(st, "delete", name="a", keep_disk=True)
    assert st.disks.exists("a")
    await _ok(st, "create", spec=_spec(), fresh=True)
    assert not (st.disks.path("a") / "data").exists()  # a new, empty disk
    (kept,) = list((tmp_path / "disks" / ".orphaned").iterdir())
    assert (kept / "data").read_text() == "moved here"
    await _ok(st, "delete", name="a")
    assert not st.disks.exists("a") and kept.exists()
