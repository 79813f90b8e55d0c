"""Live migration between two qemu drivers on this machine, over TLS from a fleet CA.

Two driver objects with scopes of their own stand for two hosts' agents; each "host" has a
certificate from one :class:`corral.control.pki.Authority`, as enrolment gives it. The guest
counts in its shell's memory and prints the count with its uptime on the console: after the
migration the destination's console goes on from where the source's stopped (no reboot, no
restart from 1). A destination that does not accept the source's certificate, and one killed
mid-way, leave the source running. Every VM and cgroup is removed in a finalizer.
"""

from __future__ import annotations

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
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_qemu_driver import VMs, guest  # noqa: F401  (the guest fixture)

from corral.control.pki import Authority
from corral.drivers.base import Handle
from corral.drivers.qemu import QemuDriver
from corral.drivers.qemu_migrate import TlsFiles
from corral.errors import DriverError

IS_ROOT = os.geteuid() == 0
COUNTER = ("i=0; while :; do i=$((i + 1)); echo \"tick $i $(cut -d' ' -f1 /proc/uptime)\"; "
           "sleep 0.2; done")
TICK = re.compile(r"^tick (\d+) ([\d.]+)\s*$", re.M)
MEMORY = 96 * 1024 * 1024


def host_identity(ca: Authority, d: Path, host: str) -> TlsFiles:
    """What enrolment leaves on a host: its key, its certificate, the CA."""
    d.mkdir(parents=True)
    key = ec.generate_private_key(ec.SECP256R1())
    (d / "host.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
           .sign(key, hashes.SHA256()))
    pem = ca.sign_host(csr.public_bytes(serialization.Encoding.PEM).decode(), host, "127.0.0.1")
    (d / "host.crt").write_bytes(pem)
    return TlsFiles(str(ca.ca_file), str(d / "host.crt"), str(d / "host.key"))


class Pair:
    """A source and a destination "host", each its own driver, both known to the finalizer."""

    def __init__(self, tmp: Path, image: Path, accel: str) -> None:
        self.src = VMs(tmp / "src", image, accel)
        self.dst = VMs(tmp / "dst", image, accel)
        ca = Authority(tmp / "ca")
        ca.ensure(["server"])
        self.tls_src = host_identity(ca, tmp / "id-src", "src-host")
        self.tls_dst = host_identity(ca, tmp / "id-dst", "dst-host")

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

    def cleanup(self) -> None:
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
    dst = pair.destination(src)
    dst, port = pair.dst.driver.incoming(dst, "127.0.0.1", pair.tls_dst, "src-host")
    pair.dst.handles[dst.name] = dst
    assert pair.dst.driver.status(dst).state == "frozen"  # waiting for the stream
    stats = pair.src.driver.migrate_out(src, "127.0.0.1", port, pair.tls_src, "dst-host",
                                        300, 300)
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


def test_a_destination_that_refuses_the_source_leaves_it_running(pair: Pair) -> None:
    src = pair.start()
    wait_ticks(pair.src, src, 2)
    # the destination expects another host: the source's certificate is refused
    dst = pair.destination(src)
    dst, port = pair.dst.driver.incoming(dst, "127.0.0.1", pair.tls_dst, "some-other-host")
    pair.dst.handles[dst.name] = dst
    with pytest.raises(DriverError) as refused:
        pair.src.driver.migrate_out(src, "127.0.0.1", port, pair.tls_src, "dst-host", 300, 60)
    print(f"refused by the destination: {refused.value}")
    pair.src.driver.migration_abort(src)
    assert pair.src.driver.status(src).state == "running"
    assert "authz" in (Path(str(dst.data["spec"]["workdir"])) / "stderr.log").read_text()
    pair.dst.driver.kill(dst, int(signal.SIGKILL))
    pair.dst.wait_state(dst, {"stopped", "exited"})
    pair.dst.driver.delete(dst)
    # the source expects another host than the one whose certificate answers: refused too
    dst = pair.destination(src, again=True)
    dst, port = pair.dst.driver.incoming(dst, "127.0.0.1", pair.tls_dst, "src-host")
    pair.dst.handles[dst.name] = dst
    with pytest.raises(DriverError) as wrong:
        pair.src.driver.migrate_out(src, "127.0.0.1", port, pair.tls_src, "elsewhere", 300, 60)
    print(f"refused by the source: {wrong.value}")
    assert "elsewhere" in str(wrong.value) or "certificate" in str(wrong.value).lower()
    pair.src.driver.migration_abort(src)
    assert pair.src.driver.status(src).state == "running"
    n = len(ticks(pair.src.console(src)))
    wait_ticks(pair.src, src, n + 2)


def test_a_destination_killed_mid_way_leaves_the_source_running(pair: Pair) -> None:
    src = pair.start()
    wait_ticks(pair.src, src, 2)
    dst = pair.destination(src)
    dst, port = pair.dst.driver.incoming(dst, "127.0.0.1", pair.tls_dst, "src-host")
    pair.dst.handles[dst.name] = dst
    errors: list[BaseException] = []

    def send() -> None:
        try:
            pair.src.driver.migrate_out(src, "127.0.0.1", port, pair.tls_src, "dst-host",
                                        # a downtime limit no copy meets: it never switches
                                        1, 120)
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
    dst = pair.destination(src)
    dst, port = pair.dst.driver.incoming(dst, "127.0.0.1", pair.tls_dst, "src-host")
    pair.dst.handles[dst.name] = dst
    stats = pair.src.driver.migrate_out(src, "127.0.0.1", port, pair.tls_src, "dst-host",
                                        300, 300)
    assert stats.status == "completed"
    last = ticks(pair.src.console(src))[-1]
    pair.dst.driver.kill(dst, int(signal.SIGKILL))
    pair.dst.wait_state(dst, {"stopped", "exited"})
    pair.src.driver.migration_abort(src)
    assert pair.src.driver.status(src).state == "running"
    got = wait_ticks(pair.src, src, len(ticks(pair.src.console(src))) + 2)
    assert got[-1][0] > last[0] and got[-1][1] > last[1]
