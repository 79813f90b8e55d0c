"""A runc container cannot leave the host a way to root: setuid binaries, chown, its root's owners.

Root only, real runc. Each test runs one busybox container through the driver the agent uses,
from a disk laid out as the agent lays it out (a directory others may traverse, 0711, holding
the instance's root, whose busybox binary is hard-linked to a template's), then looks at what
the workload left from the host's side: the owner and mode of every file, and what a host user
(``nobody``) gets from running a setuid file the workload made. These tests judge by behaviour
only (no import of the user namespace's module), so they run unchanged against a driver without
a user namespace, where they fail. Every container, cgroup and directory a test makes is
removed afterwards, even when it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from corral.agent.busybox import build_busybox_rootfs, copy_template
from corral.drivers import cgroups
from corral.drivers.base import Handle, Spec
from corral.drivers.runc import RuncDriver

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv"),
]

#: a host user (util-linux setpriv); inside, busybox's su (its setpriv cannot change ids)
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
DEADLINE = 20.0


@dataclass
class Box:
    """One driver, the disks it made, and everything to remove afterwards."""

    driver: RuncDriver
    base: Path
    template: Path
    handles: list[Handle] = field(default_factory=list)

    def disk(self, name: str) -> Path:
        d = self.base / "disks" / name
        d.mkdir(parents=True)
        copy_template(self.template, d)  # as the agent fills a disk: busybox hard-linked
        d.chmod(0o711)
        return d

    def run(self, name: str, script: str, disk: Path) -> str:
        """Run ``sh -c script`` in a container on ``disk`` to its end; its stdout."""
        wd = self.base / "work" / name
        h = self.driver.create(Spec(name, ["sh", "-c", script], str(wd), rootfs=str(disk)))
        self.handles.append(h)
        h = self.driver.start(h)
        self.handles[-1] = h
        deadline = time.monotonic() + DEADLINE
        while self.driver.status(h).state not in ("exited", "stopped"):
            assert time.monotonic() < deadline, f"{name} did not end"
            time.sleep(0.05)
        return (wd / "stdout.log").read_text()

    def cleanup(self) -> None:
        for h in self.handles:
            try:
                self.driver.stop(h, 0.5)
                self.driver.delete(h)
            except Exception:  # last resort: kill what is in its cgroup, force runc's delete
                hier = self.driver._all_dirs()
                rel = str(h.data.get("cgroup") or "")
                with contextlib.suppress(Exception):
                    hier.set_frozen(rel, False)
                for pid in hier.pids(rel) if rel else []:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                subprocess.run(self.driver._cmd("delete", "--force", h.name),
                               capture_output=True, timeout=30, check=False)
        cgroups.remove_scope(self.driver.scope)


@pytest.fixture
def box() -> Iterator[Box]:
    """A driver whose disks live where others may traverse (as the agent's disk root does:
    0711 all the way down), so the host-side checks see what a host user would."""
    base = Path(tempfile.mkdtemp(prefix="corral-setuid-", dir="/tmp"))
    base.chmod(0o711)
    scope = f"t{os.getpid()}-{uuid.uuid4().hex[:6]}"
    driver = RuncDriver(scope, str(base / "runc-state"))
    b = Box(driver, base, build_busybox_rootfs(base / "template"))
    if reason := driver.available():
        shutil.rmtree(base)
        pytest.skip(reason)
    (base / "disks").mkdir(mode=0o711)
    (base / "disks").chmod(0o711)
    try:
        yield b
    finally:
        b.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=20,
                          check=False)


def host_privileged(disk: Path) -> list[str]:
    """Files under ``disk`` that make whoever runs them root or group root on the host: setuid
    with owner 0, setgid (with group execute) with group 0."""
    found = []
    for dirpath, _dirs, files in os.walk(disk):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if not stat.S_ISREG(st.st_mode):
                continue
            if (st.st_mode & stat.S_ISUID and st.st_uid == 0) or (
                    st.st_mode & stat.S_ISGID and st.st_mode & stat.S_IXGRP and st.st_gid == 0):
                found.append(os.path.relpath(os.path.join(dirpath, name), disk))
    return sorted(found)


def add_host_binary(disk: Path, binary: str, at: str) -> None:
    """Put a host binary at ``at`` in ``disk`` and the libraries it loads at their own paths
    (what an image with a libc brings)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = [w for line in out.splitlines() for w in line.split() if w.startswith("/")]
    for src, rel in [(binary, at), *((lib, lib) for lib in libs)]:
        dest = disk / rel.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)  # never write through a busybox applet's symlink
        shutil.copy2(os.path.realpath(src), dest)


def test_a_setuid_copy_makes_no_one_root(box: Box) -> None:
    """The workload copies a binary, makes it setuid root and runs it as nobody: inside it
    stays nobody, and a host user who finds the file in the disk and runs it does not become
    root. (coreutils' id, not busybox's: busybox drops a setuid root itself.)"""
    if shutil.which("ldd") is None or not Path("/usr/bin/id").is_file():
        pytest.skip("needs ldd and coreutils' id")
    disk = box.disk("suid")
    add_host_binary(disk, "/usr/bin/id", "/opt/id")
    out = box.run("suid", "mkdir /s && cp /opt/id /s/id && chmod 4755 /s/id && "
                  "su -s /bin/sh nobody -c '/s/id -u'; echo done", disk)
    # inside: the workload, dropped to nobody, stays nobody
    assert out.split() == ["65534", "done"], out
    suid = disk / "s" / "id"
    assert suid.stat().st_mode & stat.S_ISUID  # the workload's file is as it made it...
    got = as_nobody(str(suid), "-u")
    assert got.returncode == 0, got.stderr
    # ...but it is setuid to the container's root, which is not the host's
    assert got.stdout.strip() != "0", "a host user became root through the container's file"
    assert suid.stat().st_uid != 0


def test_chown_to_any_id_never_reaches_the_hosts_ids(box: Box) -> None:
    disk = box.disk("chown")
    script = ("cp /bin/busybox /f && chown 0:0 /f && chmod 6755 /f; "
              "cp /bin/busybox /g && chown 12345:12345 /g && chmod 6755 /g; "
              "touch /h && chown 1000000:1000000 /h && echo chowned-h; "
              "ls -ln /f /g | cut -c1-10; echo done")
    out = box.run("chown", script, disk)
    assert out.strip().endswith("done"), out
    f, g, h = (os.lstat(disk / n) for n in ("f", "g", "h"))
    # "root" inside is not the host's root, "12345" inside is not the host's user 12345
    assert (f.st_uid, f.st_gid) != (0, 0) and f.st_uid != 0 and f.st_gid != 0
    assert g.st_uid != 12345 and g.st_gid != 12345
    assert f.st_uid == h.st_uid != 0  # all of the container's root's files: one host id
    # an id the container has no mapping for is refused, not handed out
    assert "chowned-h" not in out
    assert h.st_uid != 1000000
    assert host_privileged(disk) == []


def test_the_host_sees_no_setuid_root_file_in_the_disk(box: Box) -> None:
    disk = box.disk("scan")
    # what an image may bring: a setuid-root and a setgid-root binary
    for name, mode in (("su-image", 0o4755), ("sg-image", 0o2755)):
        shutil.copy2(box.template / "bin" / "busybox", disk / "bin" / name)
        (disk / "bin" / name).chmod(mode)
    script = ("cp /bin/busybox /a && chmod u+s /a; mkdir -p /deep/er && "
              "cp /bin/busybox /deep/er/b && chmod 6755 /deep/er/b; "
              "chmod u+s /bin/busybox && echo template-setuid; echo done")
    out = box.run("scan", script, disk)
    assert out.strip().endswith("done"), out
    assert host_privileged(disk) == []
    # the busybox binary shared (hard-linked) with the template and every other disk is
    # not the container's to change
    assert "template-setuid" not in out
    shared = box.template / "bin" / "busybox"
    assert not shared.stat().st_mode & stat.S_ISUID
    assert (disk / "bin" / "busybox").stat().st_ino == shared.stat().st_ino


def test_an_ordinary_workload_still_owns_its_root(box: Box, tmp_path: Path) -> None:
    """Root inside writes anywhere in its root, chowns to its users, drops privileges and
    works on as them; the root may lie under a directory others cannot pass (pytest's 0700
    tmp): only the container's own root needs reaching."""
    disk = tmp_path / "private" / "disk"
    disk.parent.mkdir(mode=0o700)
    disk.mkdir()
    copy_template(box.template, disk)
    script = ("id -u; echo hi > /top && mkdir -p /data && echo one > /data/x && "
              "chown 65534:65534 /data /data/x && "
              "su -s /bin/sh nobody -c 'echo two >> /data/x && id -u' && cat /top /data/x; "
              "grep -c corral-runc /proc/self/mountinfo; echo done")
    out = box.run("plain", script, disk)
    assert out.split() == ["0", "65534", "hi", "one", "two", "0", "done"], out
    assert (disk / "top").read_text() == "hi\n"
    # nothing of the container's root is left mounted on the host
    assert "corral-runc" not in Path("/proc/self/mountinfo").read_text()
