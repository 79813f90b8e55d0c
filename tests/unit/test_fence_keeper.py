"""The fence keeper on its own (``agent/keeper.py`` as the agent starts it: a real process, stdlib
only), and the agent's side of it (``agent/fence.py``: the file it writes, what it learns).

Every process a test starts is killed and every cgroup it makes is removed by the fixtures,
whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agentkit import ok as _ok

from corral.agent import keeper as kp
from corral.agent.fence import FenceKeeper, Guarded, LeaseClock
from corral.agent.state import AgentState
from corral.agent.store import InstanceRecord
from corral.agent.vips import Vips
from corral.bus.messages import WireSpec
from corral.drivers.base import Driver, Handle
from corral.drivers.fake import FakeDriver

#: a session leader with two children: what the process driver runs, in small
TREE = ["/bin/sh", "-c", "sleep 600 & sleep 600 & wait"]


class Procs:
    """Processes a test started (and keepers it ran), all killed at the end."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.dirs: list[Path] = []

    def tree(self) -> tuple[int, int, list[int]]:
        """(leader pid, its start time, every pid of its session once all are there)."""
        p = subprocess.Popen(TREE, start_new_session=True, stdin=subprocess.DEVNULL)
        self.popens.append(p)
        wait_for(lambda: len(session(p.pid)) == 3, "the tree to start")
        start = kp.start_time(p.pid)
        assert start is not None
        return p.pid, start, session(p.pid)

    def keeper(self, d: Path, *extra: str) -> subprocess.Popen[bytes]:
        self.dirs.append(d)
        p = subprocess.Popen([*kp.argv_for(d), *extra], start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.popens.append(p)
        return p

    def close(self) -> None:
        for d in self.dirs:
            kp.stop(d, timeout=2)
        for p in self.popens:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(5)


@pytest.fixture
def procs() -> Iterator[Procs]:
    made = Procs()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def fdir(tmp_path: Path) -> Path:
    d = tmp_path / "fence"
    d.mkdir(mode=0o700)
    return d


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    until = time.monotonic() + timeout
    while not (got := pred()):
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(0.02)
    return got


def session(sid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (p := kp.proc(int(name))) is not None and p.session == sid \
                and p.alive:
            out.append(p.pid)
    return sorted(out)


def write_state(d: Path, deadline_in: float, *entries: kp.Entry, agent: int | None = None,
                roots: tuple[str, ...] = ()) -> None:
    me = os.getpid() if agent is None else agent
    state = kp.LeaseState(deadline=kp.monotonic() + deadline_in, boot=kp.boot_id(),
                          agent_pid=me, agent_start=kp.start_time(me), cgroup_roots=roots,
                          instances=entries, lease=10.0, window=8.0)
    kp.write_private(d / kp.STATE_FILE, kp.encode_state(state))


def log_of(d: Path) -> str:
    try:
        return (d / kp.LOG_FILE).read_text()
    except OSError:
        return ""


# --- the keeper process ---------------------------------------------------------------------------

def test_a_lease_run_out_kills_the_whole_session_and_records_it(procs: Procs, fdir: Path) -> None:
    pid, start, tree = procs.tree()
    write_state(fdir, -0.1, kp.Entry("web", f"{pid}-{start}", pid, start, sid=pid))
    began = time.time()
    keeper = procs.keeper(fdir)
    wait_for(lambda: not session(pid), "the fence", 5)
    assert all(not kp.is_alive(p, None) for p in tree)
    (fence,) = wait_for(lambda: kp.read_fenced(fdir), "the fence record")
    assert fence["by"] == "keeper" and began <= fence["at"] <= time.time()
    (inst,) = fence["instances"]
    assert inst["name"] == "web" and inst["generation"] == f"{pid}-{start}"
    assert set(inst["killed"]) == set(tree) and inst["left"] == []
    assert "FENCE" in log_of(fdir) and "web" in log_of(fdir)
    for name in (kp.LOG_FILE, kp.FENCED_FILE, kp.PID_FILE, kp.STATE_FILE):
        assert (fdir / name).stat().st_mode & 0o077 == 0, name
    assert keeper.poll() is None  # its agent (this test) lives: it keeps guarding
    time.sleep(0.3)
    assert len(kp.read_fenced(fdir)) == 1  # fenced once per deadline, not on every look


def test_a_deadline_in_the_future_kills_nothing_until_it_passes(procs: Procs,
                                                                fdir: Path) -> None:
    pid, start, tree = procs.tree()
    entry = kp.Entry("web", "g", pid, start, sid=pid)
    write_state(fdir, 30.0, entry)
    procs.keeper(fdir)
    wait_for(lambda: "guarding 1 instance" in log_of(fdir), "the keeper to read the file")
    time.sleep(0.5)
    assert session(pid) == tree and not (fdir / kp.FENCED_FILE).exists()
    write_state(fdir, 0.3, entry)  # the agent stopped being acknowledged
    wait_for(lambda: not session(pid), "the fence", 5)


def test_a_reused_pid_is_not_killed(procs: Procs, fdir: Path) -> None:
    """The handle's pid now belongs to another process (other start time): neither it nor
    its session is touched."""
    pid, start, tree = procs.tree()
    write_state(fdir, -1.0, kp.Entry("old", "g", pid, start - 1, sid=pid))
    procs.keeper(fdir)
    (fence,) = wait_for(lambda: kp.read_fenced(fdir), "the fence record")
    assert fence["instances"][0]["killed_count"] == 0
    assert session(pid) == tree


def test_bad_state_files_are_logged_and_ignored_and_the_last_good_one_stands(
        procs: Procs, fdir: Path) -> None:
    pid, start, _ = procs.tree()
    write_state(fdir, 2.0, kp.Entry("web", "g", pid, start, sid=pid))
    keeper = procs.keeper(fdir)
    wait_for(lambda: "guarding 1 instance" in log_of(fdir), "the keeper to read the file")
    good = json.loads((fdir / kp.STATE_FILE).read_text())
    bad_ones: list[bytes] = [
        b"{not json",
        b"[]",
        json.dumps({**good, "deadline": "soon"}).encode(),
        json.dumps({**good, "instances": [{"name": "../x", "pid": 5, "start": 1}]}).encode(),
        json.dumps({**good, "instances": [{"name": "x", "cgroup": "../../.."}]}).encode(),
        json.dumps({**good, "instances": [{"name": "x", "pid": 1, "start": 1}]}).encode(),
        json.dumps({**good, "version": 99}).encode(),
        json.dumps({**good, "boot": "another-boot"}).encode(),
        b" " * (kp.MAX_STATE_BYTES + 1),
    ]
    def logged(n: int) -> Callable[[], bool]:
        return lambda: log_of(fdir).count("ignoring") >= n

    for n, raw in enumerate(bad_ones, 1):
        kp.write_private(fdir / kp.STATE_FILE, raw)
        wait_for(logged(n), f"bad file {n} logged")
        assert keeper.poll() is None, log_of(fdir)
    assert "the last good one stands" in log_of(fdir)
    wait_for(lambda: not session(pid), "the fence by the last good file", 5)
    assert keeper.poll() is None


def test_state_files_are_bounded() -> None:
    big = tuple(kp.Entry(f"i{n}", cgroup="c/" + "x" * 4000) for n in range(1100))
    state = kp.LeaseState(deadline=1.0, boot="b", instances=big)
    with pytest.raises(ValueError, match="over"):
        kp.encode_state(state)
    many = tuple(kp.Entry(f"i{n}", cgroup="c") for n in range(kp.MAX_INSTANCES + 1))
    with pytest.raises(ValueError, match="over"):
        kp.encode_state(kp.LeaseState(deadline=1.0, boot="b", instances=many))
    with pytest.raises(ValueError, match="over"):
        kp.parse_state(b" " * (kp.MAX_STATE_BYTES + 1))
    ok = kp.LeaseState(deadline=1.0, boot="b", agent_pid=10, agent_start=3,
                       cgroup_roots=("/sys/fs/cgroup",), instances=(
                           kp.Entry("a", "g", 10, 3, 10, "corral/h/a",
                                    (kp.Vip("10.1.2.3/24", "eth0"),)),))
    assert kp.parse_state(kp.encode_state(ok)) == ok


@pytest.mark.parametrize("change", [
    {"cgroup_roots": ["relative"]}, {"cgroup_roots": ["/a/../b"]},
    {"agent": {"pid": True}}, {"deadline": float("nan")},
    {"instances": [{"name": "a"}]},  # nothing to kill it by
    {"instances": [{"name": "a", "pid": 5}]},  # a pid without its start time
    {"instances": [{"name": "a", "cgroup": "/abs"}]},
    {"instances": [{"name": "a", "cgroup": "c", "vips": [{"address": "10.1.2.300/24",
                                                          "interface": "eth0"}]}]},
    {"instances": [{"name": "a", "cgroup": "c", "vips": [{"address": "10.1.2.3/24",
                                                          "interface": "eth0; rm"}]}]},
    {"instances": [{"name": "a", "cgroup": "c"}, {"name": "a", "cgroup": "c"}]},
])
def test_parse_refuses_what_it_cannot_trust(change: dict[str, Any]) -> None:
    base = kp.LeaseState(deadline=1.0, boot="b").to_json()
    with pytest.raises(ValueError):
        kp.parse_state(json.dumps({**base, **change}).encode())


@pytest.mark.skipif(os.geteuid() != 0, reason="making cgroups needs root")
@pytest.mark.parametrize("frozen", [False, True])
def test_every_process_of_a_cgroup_is_killed_even_frozen(procs: Procs, fdir: Path,
                                                         frozen: bool) -> None:
    """No pid in the entry at all: the cgroup alone names the instance (as for runc)."""
    roots = [r for r in sorted(kp.cgroup_mounts()) if os.access(r, os.W_OK)]
    if not roots:
        pytest.skip("no writable cgroup hierarchy")
    rel = f"corral-keeper-test-{secrets.token_hex(3)}/web"
    made = [Path(r) / rel for r in roots]
    try:
        for d in made:
            d.mkdir(parents=True)
        _pid, _start, tree = procs.tree()
        for d in made:  # the children forked before: move each
            for p in tree:
                with contextlib.suppress(OSError):
                    (d / "cgroup.procs").write_text(str(p))
        assert set(kp._read_pids(made[0] / "cgroup.procs")) == set(tree)
        freezer = [d for d in made if (d / "freezer.state").exists()]
        if frozen:
            if not freezer:
                pytest.skip("no v1 freezer here")
            (freezer[0] / "freezer.state").write_text("FROZEN")
            wait_for(lambda: (freezer[0] / "freezer.state").read_text().strip() == "FROZEN",
                     "the freeze")
        write_state(fdir, -0.1, kp.Entry("web", "g", cgroup=rel), roots=tuple(roots))
        procs.keeper(fdir)
        wait_for(lambda: not any(kp.is_alive(p, None) for p in tree), "the fence", 5)
        (fence,) = wait_for(lambda: kp.read_fenced(fdir), "the fence record")
        assert set(fence["instances"][0]["killed"]) == set(tree)
    finally:
        procs.close()
        for d in made:
            for target in (d, d.parent):
                for _ in range(100):
                    try:
                        target.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.05)


def test_one_keeper_per_directory_and_the_agent_can_find_it(procs: Procs, fdir: Path) -> None:
    write_state(fdir, 60.0)
    first = procs.keeper(fdir)
    found = wait_for(lambda: kp.identify(fdir), "the pid file")
    assert found.pid == first.pid and found.version == kp.VERSION
    second = procs.keeper(fdir)
    assert second.wait(10) == 0  # the lock is taken: it leaves at once
    assert [f.pid for f in kp.find_all(fdir)] == [first.pid]
    assert "this one exits" in log_of(fdir)
    assert kp.stop(fdir) == [first.pid]
    assert first.wait(5) == 0 and kp.identify(fdir) is None
    assert "asked to stop" in log_of(fdir)


def test_it_exits_when_its_agent_is_gone_with_nothing_left_to_guard(procs: Procs,
                                                                    fdir: Path) -> None:
    agent = subprocess.Popen(["sleep", "600"])
    procs.popens.append(agent)
    write_state(fdir, 60.0, agent=agent.pid)
    keeper = procs.keeper(fdir)
    time.sleep(1.5)
    assert keeper.poll() is None  # the agent lives: the keeper stays
    agent.kill()
    agent.wait()
    assert keeper.wait(5) == 0
    assert "its agent is gone" in log_of(fdir)


def test_a_dead_agent_s_instances_are_fenced_before_the_keeper_leaves(procs: Procs,
                                                                     fdir: Path) -> None:
    agent = subprocess.Popen(["sleep", "600"])
    procs.popens.append(agent)
    pid, start, _ = procs.tree()
    write_state(fdir, 1.0, kp.Entry("web", "g", pid, start, sid=pid), agent=agent.pid)
    keeper = procs.keeper(fdir)
    agent.kill()  # kill -9 of the agent: the keeper still fences at the deadline
    agent.wait()
    time.sleep(0.5)
    assert session(pid) and keeper.poll() is None
    wait_for(lambda: not session(pid), "the fence", 5)
    assert keeper.wait(5) == 0
    assert "agent gone" in kp.read_fenced(fdir)[0]["why"]


def test_it_exits_when_its_directory_is_removed(procs: Procs, fdir: Path) -> None:
    write_state(fdir, 60.0)
    keeper = procs.keeper(fdir)
    wait_for(lambda: kp.identify(fdir), "the pid file")
    for f in fdir.iterdir():
        f.unlink()
    fdir.rmdir()
    assert keeper.wait(5) == 0


def test_it_outlives_a_kill_9_of_the_process_that_started_it(procs: Procs, fdir: Path) -> None:
    write_state(fdir, 60.0)
    code = ("import subprocess, sys, time; "
            f"subprocess.Popen({kp.argv_for(fdir)!r}, start_new_session=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    procs.popens.append(parent)
    procs.dirs.append(fdir)
    found = wait_for(lambda: kp.identify(fdir), "the keeper")
    assert os.getsid(found.pid) == found.pid  # a session (and process group) of its own
    parent.kill()
    parent.wait()
    time.sleep(0.3)
    assert kp.identify(fdir) == found


# --- the agent's side -----------------------------------------------------------------------------

def _record(name: str, pid: int, start: int, vip: str | None = None, state: str = "running",
            driver: str = "process") -> InstanceRecord:
    spec = WireSpec(name=name, driver=driver, command=["x"], vip=vip)
    data = {"pid": pid, "starttime": start, "sid": pid, "pgid": pid, "cgroup": f"corral/h/{name}",
            "generation": f"{pid}-{start}"}
    return InstanceRecord(spec=spec, handle=Handle(driver, name, data), state=state)


def _agent_side(tmp_path: Path) -> tuple[AgentState, FenceKeeper, Guarded, Vips]:
    drivers: dict[str, Driver] = {"fake": FakeDriver("h1")}
    st = AgentState(tmp_path, drivers, stop_timeout=1.0)
    vips = Vips("eth9", "10.214.9.11")
    guarded = Guarded(tmp_path / "guarded.json")
    keeper = FenceKeeper(tmp_path, st, LeaseClock(10.0, 2.0), guarded, vips)
    return st, keeper, guarded, vips


def test_the_agent_tells_the_keeper_exactly_what_to_kill(tmp_path: Path) -> None:
    st, keeper, guarded, vips = _agent_side(tmp_path)
    vips.added = {"10.214.9.50", "10.214.9.60"}
    st.records = {
        "web": _record("web", 4001, 77, "10.214.9.50/24"),
        "twin": _record("twin", 4002, 78, "10.214.9.60/24"),  # shares its VIP with "free"
        "free": _record("free", 4003, 79, "10.214.9.60/24"),
        "gone": _record("gone", 4004, 80, state="stopped"),
        "fake": _record("fake", 4005, 81, driver="fake"),
    }
    guarded.update(["web", "twin", "gone", "fake"])
    keeper.publish()
    state = kp.read_state(keeper.dir)
    assert (keeper.dir.stat().st_mode & 0o777, (keeper.dir / kp.STATE_FILE).stat().st_mode
            & 0o777) == (0o700, 0o600)
    assert {e.name for e in state.instances} == {"web", "twin"}
    web = next(e for e in state.instances if e.name == "web")
    assert (web.pid, web.start, web.sid, web.cgroup, web.generation) == (
        4001, 77, 4001, "corral/h/web", "4001-77")
    assert web.vips == (kp.Vip("10.214.9.50/24", "eth9"),)
    twin = next(e for e in state.instances if e.name == "twin")
    assert twin.vips == ()  # "free" (not guarded) still holds that address
    assert state.agent_pid == os.getpid() and state.boot == kp.boot_id()
    assert state.deadline == pytest.approx(keeper.lease.deadline)
    assert set(state.cgroup_roots) == set(keeper.roots)
    # written again only when something changed
    before = (keeper.dir / kp.STATE_FILE).stat().st_mtime_ns
    keeper.publish()
    assert (keeper.dir / kp.STATE_FILE).stat().st_mtime_ns == before
    keeper.changed.clear()
    keeper.lease.acked()
    assert keeper.changed.is_set()  # an acknowledgement moves the deadline: rewrite at once


def test_a_restarted_agent_keeps_the_deadline_it_inherits(tmp_path: Path) -> None:
    _, keeper, _, _ = _agent_side(tmp_path)
    keeper.publish()
    lease = LeaseClock(10.0, 2.0)
    lease.arm(not_after=keeper.inherited_deadline())
    assert lease.deadline == pytest.approx(keeper.lease.deadline)  # not now + 8 s
    state = json.loads((keeper.dir / kp.STATE_FILE).read_text())
    kp.write_private(keeper.dir / kp.STATE_FILE,
                     json.dumps({**state, "boot": "other"}).encode())
    assert keeper.inherited_deadline() is None  # another boot's clock means nothing
    past = LeaseClock(10.0, 2.0)
    past.arm(not_after=time.monotonic() - 5)
    assert past.due()


async def test_the_agent_learns_what_the_keeper_fenced(tmp_path: Path) -> None:
    st, keeper, _, _ = _agent_side(tmp_path)
    st.vips = None
    keeper.vips = None
    drv = st.drivers["fake"]
    assert isinstance(drv, FakeDriver)
    for name in ("web", "other"):
        await _ok(st, "create", spec={"name": name, "driver": "fake", "command": ["run"],
                                      "epoch": 1})
        await _ok(st, "start", name=name, epoch=1)
    web = st.records["web"]
    gen = web.handle.data["generation"]
    drv.crash("web")  # what the keeper's SIGKILL looks like to the driver
    await st.refresh(web)
    assert web.state == "failed"  # seen before the agent knew of the fence
    keeper.dir.mkdir(mode=0o700)
    kp.record_fence(keeper.dir, {"at": 123.0, "monotonic": 1.0, "boot": kp.boot_id(),
                                 "why": "lease ran out", "instances": [
                                     {"name": "web", "generation": gen},
                                     {"name": "other", "generation": "an-older-run"}]})
    assert await keeper.learn() == ["web"]
    assert web.state == "stopped" and web.stop_requested and web.extra["fenced_at"] == 123.0
    assert st.records["other"].state == "running"  # another run of it: not this one
    assert await keeper.learn() == []  # nothing new
    assert await keeper.learn(force=True) == []  # and marked once


async def test_the_agent_starts_adopts_and_stops_its_keeper(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, keeper, _, _ = _agent_side(tmp_path)
    try:
        await keeper.start()
        first = wait_for(lambda: kp.identify(keeper.dir), "the keeper's pid file")
        assert keeper.alive() and keeper.proc is not None and keeper.proc.pid == first.pid
        assert os.getsid(first.pid) == first.pid
        # a restarted agent (a second one on the same data) adopts it: still one keeper
        _, again, _, _ = _agent_side(tmp_path)
        await again.start()
        assert again.proc is not None and again.proc.pid == first.pid
        assert [f.pid for f in kp.find_all(keeper.dir)] == [first.pid]

        # a file it cannot write: the keeper would act on an old deadline, so it goes
        def full(path: Path, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(kp, "write_private", full)
        keeper.lease.acked()
        await keeper.tend()
        assert not kp.find_all(keeper.dir) and not keeper.alive()
        await keeper.tend()  # and is not started again while that lasts
        assert not kp.find_all(keeper.dir)
        monkeypatch.undo()
        keeper.lease.acked()
        await keeper.tend()
        assert keeper.alive() and keeper.proc is not None and keeper.proc.pid != first.pid

        # a clean stop with nothing guarded stops it
        await keeper.close()
        assert not kp.find_all(keeper.dir)
    finally:
        kp.stop(keeper.dir, timeout=2)


async def test_a_clean_stop_leaves_the_keeper_armed_while_guarded_instances_run(
        tmp_path: Path) -> None:
    st, keeper, _, _ = _agent_side(tmp_path)
    st.records = {"web": _record("web", 4001, 77)}  # guarded (no list yet: all are)
    try:
        await keeper.start()
        await keeper.close()
        assert [f.pid for f in kp.find_all(keeper.dir)] == [keeper.proc.pid if keeper.proc
                                                             else -1]
        assert {e.name for e in kp.read_state(keeper.dir).instances} == {"web"}
    finally:
        kp.stop(keeper.dir, timeout=2)
