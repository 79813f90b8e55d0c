"""Self-fencing and virtual IPs on the agent, in-process on the fake driver with a fake interface
(the real ``ip``/ARP path is exercised by tests/integration/test_vip.py and the netns e2e)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agentkit import call as _call
from agentkit import ok as _ok

from corral.agent import vips as vipmod
from corral.agent.fence import LeaseClock, fence_all
from corral.agent.state import AgentState
from corral.agent.vips import Vips
from corral.drivers.base import Driver
from corral.drivers.fake import FakeDriver

VIP = "10.214.9.50/24"


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class FakeIface:
    """What ``ip addr`` would hold on the VIP interface, and every announcement made."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.addrs: set[str] = set()
        self.announced: list[str] = []
        monkeypatch.setattr(vipmod, "addresses_on", lambda _if: set(self.addrs))
        monkeypatch.setattr("corral.ha.vip.add", self._add)
        monkeypatch.setattr("corral.ha.vip.remove", self._remove)
        monkeypatch.setattr("os.geteuid", lambda: 0)

    def _add(self, _ifname: str, vip: str, announce: int = 3) -> None:
        self.addrs.add(vip.split("/")[0])
        self.announced.append(vip)

    def _remove(self, _ifname: str, vip: str) -> None:
        self.addrs.discard(vip.split("/")[0])


@pytest.fixture
def iface(monkeypatch: pytest.MonkeyPatch) -> FakeIface:
    return FakeIface(monkeypatch)


def _state(tmp_path: Path) -> tuple[AgentState, FakeDriver]:
    drv = FakeDriver("h1")
    drivers: dict[str, Driver] = {"fake": drv}
    st = AgentState(tmp_path, drivers, stop_timeout=1.0)
    st.vips = Vips("eth9", "10.214.9.11")
    return st, drv


def _spec(name: str, vip: str | None = VIP) -> dict[str, Any]:
    return {"name": name, "driver": "fake", "command": ["run"], "epoch": 1, "vip": vip}


# --- the lease clock ------------------------------------------------------------------------------

def test_lease_clock_fences_margin_before_the_lease() -> None:
    clock = Clock()
    lease = LeaseClock(10.0, 2.0, clock)
    clock.now += 7.9
    assert not lease.due()
    clock.now += 0.2
    assert lease.due()
    lease.acked()
    assert not lease.due() and lease.until_due() == pytest.approx(8.0)
    lease.fenced = True
    clock.now += 100
    assert not lease.due()  # once fenced, nothing more to do until the server answers
    lease.acked(lease_seconds=4.0)  # a join reply may bring another lease length
    assert lease.window == pytest.approx(2.0) and not lease.fenced


def test_lease_counts_from_when_the_acknowledged_request_was_sent() -> None:
    clock = Clock()
    lease = LeaseClock(10.0, 2.0, clock)
    sent = clock.now
    clock.now += 3.0  # the answer took 3 s to come back: the server renewed at >= sent
    lease.acked(sent_at=sent)
    assert lease.until_due() == pytest.approx(5.0)
    lease.acked(sent_at=sent - 1)  # an older request's late answer never moves it back
    assert lease.until_due() == pytest.approx(5.0)


def test_a_margin_as_long_as_the_lease_still_fences_before_it() -> None:
    lease = LeaseClock(2.0, 5.0, Clock())
    assert 0 < lease.window < 2.0


# --- fencing --------------------------------------------------------------------------------------

async def test_fence_kills_alive_instances_drops_vips_and_reports_stopped(
        tmp_path: Path, iface: FakeIface) -> None:
    st, _ = _state(tmp_path)
    for name, vip in (("web", VIP), ("plain", None), ("idle", None)):
        await _ok(st, "create", spec=_spec(name, vip))
    await _ok(st, "start", name="web", epoch=1)
    await _ok(st, "start", name="plain", epoch=1)
    assert iface.addrs == {"10.214.9.50"} and iface.announced == [VIP]

    fenced = await fence_all(st, st.vips, "test")

    assert sorted(fenced) == ["plain", "web"]  # "idle" was never started
    assert iface.addrs == set()
    for name in ("web", "plain"):
        report = await _ok(st, "status", name=name)
        assert report["state"] == "stopped", report  # asked for, not a crash
        assert "fenced_at" in st.records[name].extra
    # a later start (the server's decision) runs it again and takes the address back
    await _ok(st, "start", name="web", epoch=2)
    assert iface.addrs == {"10.214.9.50"}
    assert "fenced_at" not in st.records["web"].extra


# --- VIPs through the handlers --------------------------------------------------------------------

async def test_vip_follows_start_stop_kill_and_delete(tmp_path: Path, iface: FakeIface) -> None:
    st, drv = _state(tmp_path)
    await _ok(st, "create", spec=_spec("web"))
    assert iface.addrs == set()  # created is not running
    await _ok(st, "start", name="web", epoch=1)
    assert iface.addrs == {"10.214.9.50"}
    await _ok(st, "stop", name="web", timeout=1)
    assert iface.addrs == set()
    await _ok(st, "start", name="web", epoch=2)
    await _ok(st, "kill", name="web", signal=15)
    assert iface.addrs == set()
    await _ok(st, "start", name="web", epoch=3)
    drv.crash("web")  # ends by itself: the next sync (after a heartbeat) drops the address
    await st.refresh(st.records["web"])
    assert st.vips is not None
    await st.vips.sync(st.records)
    assert iface.addrs == set()
    await _ok(st, "delete", name="web")
    assert iface.addrs == set()


async def test_sync_restores_a_missing_vip_once_and_leaves_others_alone(
        tmp_path: Path, iface: FakeIface) -> None:
    st, _ = _state(tmp_path)
    await _ok(st, "create", spec=_spec("web"))
    await _ok(st, "start", name="web", epoch=1)
    iface.addrs = {"10.214.9.11"}  # someone removed the VIP; the host address must stay
    assert st.vips is not None
    await st.vips.sync(st.records)
    await st.vips.sync(st.records)
    assert iface.addrs == {"10.214.9.11", "10.214.9.50"}
    assert iface.announced == [VIP, VIP]  # start, then one repair; no ARP on a plain sync


async def test_vip_add_failure_fails_the_start_and_stops_it(
        tmp_path: Path, iface: FakeIface, monkeypatch: pytest.MonkeyPatch) -> None:
    st, _ = _state(tmp_path)
    await _ok(st, "create", spec=_spec("web"))

    def refuse(_if: str, _vip: str, announce: int = 3) -> None:
        raise RuntimeError("RTNETLINK answers: File exists")

    monkeypatch.setattr("corral.ha.vip.add", refuse)
    reply = await _call(st, "start", name="web", epoch=1)
    assert not reply.ok and reply.error is not None
    assert "virtual IP" in reply.error["message"] and "File exists" in reply.error["message"]
    assert (await _ok(st, "status", name="web"))["state"] == "stopped"


async def test_non_root_agent_refuses_a_vip_at_create(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    st, _ = _state(tmp_path)
    reply = await _call(st, "create", spec=_spec("web"))
    assert not reply.ok and reply.error is not None
    assert "needs root" in reply.error["message"]
    assert "web" not in st.records
    await _ok(st, "create", spec=_spec("plain", None))  # without a VIP, no root needed


async def test_bad_vip_is_refused_at_create(tmp_path: Path, iface: FakeIface) -> None:
    st, _ = _state(tmp_path)
    reply = await _call(st, "create", spec=_spec("web", "10.1.2.300/24"))
    assert not reply.ok and reply.error is not None and "bad virtual IP" in reply.error["message"]


def test_interface_of_finds_the_interface_holding_an_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Out:
        stdout = ("1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n"
                  "7: eth0    inet 10.213.4.11/24 brd 10.213.4.255 scope global eth0\\\n")

    monkeypatch.setattr("subprocess.run", lambda *a, **k: Out())
    assert vipmod.interface_of("10.213.4.11") == "eth0"
    assert vipmod.interface_of("127.0.0.1") == "lo"
    with pytest.raises(Exception, match="vip_interface"):
        vipmod.interface_of("10.9.9.9")


async def test_if_epoch_guards_kill_and_delete_of_a_reported_copy(tmp_path: Path) -> None:
    """Reconciling acts on the copy it saw: a copy that moved on to a newer epoch is spared."""
    st, _ = _state(tmp_path)
    st.vips = None
    await _ok(st, "create", spec=_spec("web", None))
    await _ok(st, "start", name="web", epoch=3)
    reply = await _call(st, "kill", name="web", signal=9, if_epoch=2)
    assert not reply.ok and reply.error is not None and reply.error["code"] == "conflict"
    assert (await _ok(st, "status", name="web"))["state"] == "running"
    await _ok(st, "kill", name="web", signal=9, if_epoch=3)
    reply = await _call(st, "delete", name="web", if_epoch=1)
    assert not reply.ok and "web" in st.records
    await _ok(st, "delete", name="web", if_epoch=3)
    assert "web" not in st.records


async def test_fence_spares_what_the_server_would_not_run_elsewhere(
        tmp_path: Path, iface: FakeIface) -> None:
    """Only instances with a standby (the server's ``guarded`` list) are fenced: the others
    are never started elsewhere while their host is away. The list survives a restart."""
    from corral.agent.fence import Guarded

    st, _ = _state(tmp_path)
    for name in ("db", "cache"):
        await _ok(st, "create", spec=_spec(name, None))
        await _ok(st, "start", name=name, epoch=1)
    guarded = Guarded(tmp_path / "guarded.json")
    assert guarded.covers("cache")  # unknown: everything is guarded
    guarded.update(["db"])
    assert await fence_all(st, st.vips, "test", guarded) == ["db"]
    assert (await _ok(st, "status", name="cache"))["state"] == "running"
    again = Guarded(tmp_path / "guarded.json")
    assert again.covers("db") and not again.covers("cache")
    again.update(None)  # an older server says nothing: keep what we knew
    assert not again.covers("cache")


@pytest.mark.parametrize(("vip", "says"), [
    ("127.0.0.5/8", "loopback"), ("169.254.3.4/16", "link-local"),
    ("224.0.0.9/24", "multicast"), ("0.0.0.0/0", "unspecified"),
    ("10.214.9.0/24", "network's address"), ("10.214.9.255/24", "broadcast"),
])
def test_addresses_that_cannot_be_a_vip_are_refused(vip: str, says: str) -> None:
    from corral.errors import InvalidRequest
    from corral.ha.vip import parse

    with pytest.raises(InvalidRequest, match=says):
        parse(vip)
    assert str(parse("10.214.9.50/24").ip) == "10.214.9.50"
    assert str(parse("10.214.9.7").ip) == "10.214.9.7"  # a bare address is a /32


async def test_the_hosts_own_address_is_refused_at_create(tmp_path: Path,
                                                          iface: FakeIface) -> None:
    st, _ = _state(tmp_path)
    reply = await _call(st, "create", spec=_spec("web", "10.214.9.11/24"))
    assert not reply.ok and reply.error is not None
    assert "address of this host itself" in reply.error["message"]


async def test_only_addresses_corral_added_are_ever_removed(tmp_path: Path,
                                                            iface: FakeIface) -> None:
    """An address an administrator put on the interface (the same as a stopped instance's
    VIP, say) is neither taken over by a start nor deleted by a sync or a stop."""
    st, _ = _state(tmp_path)
    iface.addrs.add("10.214.9.50")  # someone else's, before corral came
    await _ok(st, "create", spec=_spec("web"))
    reply = await _call(st, "start", name="web", epoch=1)
    assert not reply.ok and reply.error is not None
    assert "corral did not add it" in reply.error["message"]
    assert st.vips is not None
    await st.vips.sync(st.records)
    await _ok(st, "delete", name="web")
    assert iface.addrs == {"10.214.9.50"}  # still there: it was never ours


async def test_what_corral_added_is_remembered_across_an_agent_restart(
        tmp_path: Path, iface: FakeIface) -> None:
    st, _ = _state(tmp_path)
    st.vips = Vips("eth9", "10.214.9.11", tmp_path / "vips.json")
    await _ok(st, "create", spec=_spec("web"))
    await _ok(st, "start", name="web", epoch=1)
    assert iface.addrs == {"10.214.9.50"}
    again = Vips("eth9", "10.214.9.11", tmp_path / "vips.json")  # restarted with -9
    assert again.added == {"10.214.9.50"}
    st.records["web"].state = "stopped"  # it ended while the agent was away
    await again.sync(st.records)
    assert iface.addrs == set()
