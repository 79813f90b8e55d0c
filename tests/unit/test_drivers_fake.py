"""The fake driver keeps the real drivers' semantics and gives tests their controls."""

from __future__ import annotations

import signal

import pytest

from corral.drivers.base import Driver, Spec
from corral.drivers.fake import FakeDriver, FakeWorld
from corral.errors import Conflict, DriverError, NotSupported


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _spec(name: str = "a") -> Spec:
    return Spec(name, ["sleep", "inf"], f"/nonexistent/{name}")


def test_it_is_a_driver() -> None:
    assert isinstance(FakeDriver(), Driver)


def test_cpu_grows_at_the_set_rate_and_stops_when_frozen() -> None:
    clock = Clock()
    d = FakeDriver(world=FakeWorld(clock=clock))
    h = d.start(d.create(_spec()))
    d.set_cpu_rate("a", 0.5)
    clock.now += 2
    assert d.stats([h])["a"].cpu_ns == 1_000_000_000
    d.freeze(h)
    clock.now += 5
    assert d.stats([h])["a"].cpu_ns == 1_000_000_000
    assert d.status(h).state == "frozen"
    d.thaw(h)
    clock.now += 1
    assert d.stats([h])["a"].cpu_ns == 1_500_000_000
    d.set_cpu("a", 7)
    assert d.stats([h])["a"].cpu_ns == 7


def test_crash_and_outside_kill() -> None:
    d = FakeDriver()
    h = d.start(d.create(_spec()))
    d.crash("a", 3)
    st = d.status(h)
    assert (st.state, st.exit_code, st.signal) == ("exited", 3, None)
    assert d.stats([h]) == {}
    h = d.start(h)
    d.crash("a", signal=signal.SIGKILL)
    st = d.status(h)
    assert (st.state, st.exit_code, st.signal) == ("exited", None, signal.SIGKILL)


def test_stop_and_restart_is_a_new_generation() -> None:
    d = FakeDriver()
    h1 = d.start(d.create(_spec()))
    d.ignore_term("a")
    st = d.stop(h1, 10.0)
    assert (st.state, st.signal) == ("stopped", signal.SIGKILL)
    h2 = d.start(h1)
    assert h2.data["generation"] != h1.data["generation"]
    assert d.status(h2).state == "running"
    assert d.status(h1).state == "exited"  # an old handle no longer names what runs


def test_recover_on_a_new_driver_sees_the_same_world() -> None:
    world = FakeWorld()
    h = FakeDriver(world=world).start(FakeDriver(world=world).create(_spec()))
    fresh = FakeDriver(world=world)
    assert fresh.recover(h).state == "running"
    assert "a" in fresh.stats([h])


def test_refusals_and_injected_failures() -> None:
    d = FakeDriver(can_freeze=False)
    h = d.create(_spec())
    assert d.status(h).state == "created"
    with pytest.raises(Conflict):
        d.kill(h, signal.SIGTERM)
    h = d.start(h)
    with pytest.raises(NotSupported):
        d.freeze(h)
    with pytest.raises(Conflict):
        d.delete(h)
    d.fail_next("stop", DriverError("boom"))
    with pytest.raises(DriverError):
        d.stop(h, 1)
    assert d.stop(h, 1).state == "stopped"
    d.delete(h)
    assert ("delete", "a") in d.calls
    assert FakeDriver(unavailable="nope").available() == "nope"
