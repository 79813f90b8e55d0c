"""Live migration between two qemu drivers on this machine.

Two driver objects with scopes of their own stand for two hosts' agents. The stream goes from
the source QEMU's unix socket to the destination's through the source agent's end of the
tunnel (:class:`corral.disks.tunnel.Outbound`), here connected straight to the destination's
socket: the data channel between them, its TLS and its tickets, are test_live_tunnel's. The
guest counts in its shell's memory and prints the count with its uptime on the console: after
the migration the destination's console goes on from where the source's stopped (no reboot, no
restart from 1). A tunnel refused, and a destination killed mid-way, leave the source running.
Every VM and cgroup is removed in a finalizer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_qemu_driver import VMs, guest  # noqa: F401  (the guest fixture)

from corral.agent.live_handlers import OUT_SOCK
from corral.disks import tunnel
from corral.drivers.base import Handle, MigrationStats
from corral.drivers.qemu import QemuDriver
from corral.errors import CorralError, DriverError

IS_ROOT = os.geteuid() == 0
COUNTER = ("i=0; while :; do i=$((i + 1)); echo \"tick $i $(cut -d' ' -f1 /proc/uptime)\"; "
           "sleep 0.2; done")
TICK = re.compile(r"^tick (\d+) ([\d.]+)\s*$", re.M)
MEMORY = 96 * 1024 * 1024


class Tunnel:
    """The source agent's end of the stream, in a thread of its own (the driver's calls
    block): relayed to the destination's socket, or refused as a peer refuses a ticket."""

    def __init__(self, src: Path, dst: Path | None) -> None:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            if dst is None:
                raise CorralError("h2 refused the stream: the transfer ticket has expired")
            return await asyncio.open_unix_connection(sock=tunnel.connect_unix(dst))

        self.out = tunnel.Outbound(src / OUT_SOCK, connect)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            asyncio.run(self.out.serve())
        except BaseException as e:
            self.error = e

    def close(self) -> None:
        self.out.close_listener()
        self.thread.join(30)


class Pair:
    """A source and a destination "host", each its own driver, both known to the finalizer."""

    def __init__(self, tmp: Path, image: Path, accel: str) -> None:
        self.src = VMs(tmp / "src", image, accel)
        self.dst = VMs(tmp / "dst", image, accel)
        self.tunnels: list[Tunnel] = []

    def start(self) -> Handle:
        return self.src.run(COUNTER, memory=MEMORY)

    def destination(self, h: Handle, again: bool = False) -> Handle:
        """The same VM created on the destination: its disk directory copied (as corral's file
        pass does), its own workdir."""
        spec = h.data["spec"]
        wd = self.dst.tmp / h.name
        if not again:
            shutil.copytree(str(spec["rootfs"]), wd / "disk")
        spec0 = self.dst.spec(COUNTER, disk=wd / "disk", memory=MEMORY)
        d = self.dst.driver.create(dataclasses.replace(spec0, name=h.name, workdir=str(wd)))
        self.dst.handles[d.name] = d
        return d

    def incoming(self, src: Handle) -> Handle:
        """The destination waiting, and the source's end of the stream relayed to it."""
        dst = self.destination(src)
        dst, sock = self.dst.driver.incoming(dst, "src-host")
        self.dst.handles[dst.name] = dst
        self.tunnel(src, self.dst.driver.stream_dir(dst) / sock)
        return dst

    def tunnel(self, src: Handle, dst: Path | None) -> Tunnel:
        t = Tunnel(self.src.driver.stream_dir(src), dst)
        self.tunnels.append(t)
        return t

    def send(self, src: Handle, downtime_ms: int = 300, timeout: float = 300
             ) -> MigrationStats:
        return self.src.driver.migrate_out(src, OUT_SOCK, "dst-host", downtime_ms, timeout)

    def cleanup(self) -> None:
        for t in self.tunnels:
            t.close()
        self.src.cleanup()
        self.dst.cleanup()


@pytest.fixture
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    if not IS_ROOT:
        pytest.skip("the qemu driver needs root")
    probe = QemuDriver(f"probe{os.getpid()}")
    reason = probe.available()
    if reason:
        pytest.skip(reason)
    p = Pair(tmp_path, request.getfixturevalue("guest"), probe.accel)
    request.addfinalizer(p.cleanup)
    yield p


def ticks(text: str) -> list[tuple[int, float]]:
    return [(int(n), float(up)) for n, up in TICK.findall(text)]


def wait_ticks(vms: VMs, h: Handle, count: int) -> list[tuple[int, float]]:
    deadline = time.monotonic() + 180
    while len(got := ticks(vms.console(h))) < count:
        assert time.monotonic() < deadline, f"{count} ticks never came:\n{vms.console(h)[-1500:]}"
        time.sleep(0.2)
    return got


def test_memory_and_uptime_go_on_on_the_destination(pair: Pair) -> None:
    src = pair.start()
    before = wait_ticks(pair.src, src, 3)
    assert [n for n, _ in before] == list(range(1, len(before) + 1))
    dst = pair.incoming(src)
    assert pair.dst.driver.status(dst).state == "frozen"  # waiting for the stream
    stats = pair.send(src)
    print(f"live migration: {stats}")  # the figures, with -s
    assert stats.status == "completed" and stats.downtime_ms is not None
    assert stats.ram_bytes > 0 and stats.disk_bytes >= 32 * 1024 * 1024
    last_src = ticks(pair.src.console(src))[-1]
    assert pair.src.driver.status(src).state == "frozen"  # paused for good (postmigrate)
    assert pair.dst.driver.status(dst).state == "running"
    after = wait_ticks(pair.dst, dst, 3)
    # the shell's counter went on from its memory: no reboot, no restart from 1
    assert after[0][0] > 1 and after[0][0] <= last_src[0] + 2, (last_src, after[:3])
    assert [n for n, _ in after] == list(range(after[0][0], after[0][0] + len(after)))
    assert after[0][1] >= last_src[1], "the guest's uptime went back: it booted again"
    assert "Linux version" not in pair.dst.console(dst)
    pair.src.driver.kill(src, int(signal.SIGKILL))
    pair.src.wait_state(src, {"stopped", "exited"})


def test_a_stream_the_peer_refuses_leaves_the_source_running(pair: Pair) -> None:
    src = pair.start()
    wait_ticks(pair.src, src, 2)
    refused = pair.tunnel(src, None)  # the destination's channel says no (its ticket, say)
    with pytest.raises(DriverError) as failed:
        pair.send(src, 300, 60)
    print(f"QEMU says: {failed.value}; the tunnel says: {refused.error}")
    refused.close()
    assert isinstance(refused.error, CorralError) and "refused the stream" in str(refused.error)
    pair.src.driver.migration_abort(src)
    assert pair.src.driver.status(src).state == "running"
    n = len(ticks(pair.src.console(src)))
    wait_ticks(pair.src, src, n + 2)
    # and the same QEMU migrates fine afterwards
    dst = pair.incoming(src)
    assert pair.send(src).status == "completed"
    assert pair.dst.driver.status(dst).state == "running"


def test_a_destination_killed_mid_way_leaves_the_source_running(pair: Pair) -> None:
    src = pair.start()
    wait_ticks(pair.src, src, 2)
    dst = pair.incoming(src)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            pair.send(src, 1, 120)  # a downtime limit no copy meets: it never switches
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=send)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # until bytes flow, then the destination's power is cut
            info = pair.src.driver._execute(src, "query-migrate") or {}
            if info.get("status") == "active" and (info.get("disk") or {}).get("transferred"):
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.05)
        os.kill(int(dst.data["pid"]), signal.SIGKILL)
    finally:
        t.join(150)
    assert errors and isinstance(errors[0], DriverError), errors
    pair.src.driver.migration_abort(src)
    assert pair.src.driver.status(src).state == "running"
    n = len(ticks(pair.src.console(src)))
    wait_ticks(pair.src, src, n + 2)


def test_after_a_completed_migration_the_source_can_still_take_back_over(pair: Pair) -> None:
    """The undo of a switch-over cut short: the destination is ended first, then the source's
    paused copy runs on from the very state it sent."""
    src = pair.start()
    wait_ticks(pair.src, src, 2)
    dst = pair.incoming(src)
    stats = pair.send(src)
    assert stats.status == "completed"
    last = ticks(pair.src.console(src))[-1]
    pair.dst.driver.kill(dst, int(signal.SIGKILL))
    pair.dst.wait_state(dst, {"stopped", "exited"})
    pair.src.driver.migration_abort(src)
    assert pair.src.driver.status(src).state == "running"
    got = wait_ticks(pair.src, src, len(ticks(pair.src.console(src))) + 2)
    assert got[-1][0] > last[0] and got[-1][1] > last[1]
