"""``--tail`` paths relative to the instance's disk: refused at the API when they could leave
it ('..', NUL), resolved against the disk (a process's working directory) by the agent, and
never followed out of the disk when opened, whether by openat2 or the checked fallback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from corral.agent import capture, handlers
from corral.agent.capture import CaptureManager, TailCapture, TailPath, tail_path
from corral.agent.disks import HostDisks
from corral.agent.state import AgentState
from corral.agent.store import InstanceRecord
from corral.api.models import CreateInstance
from corral.bus import rpc
from corral.bus.messages import LogBatch, WireSpec
from corral.drivers.base import Handle
from corral.drivers.fake import FakeDriver


def make(path: str) -> CreateInstance:
    return CreateInstance(name="web", command=["true"], tail={"access": path})


@pytest.mark.parametrize("path", ["logs/access.log", "./logs/a.log", "a.log", "logs//a.log",
                                  "/var/log/access.log"])
def test_relative_and_absolute_paths_are_accepted(path: str) -> None:
    assert make(path).tail == {"access": path}


@pytest.mark.parametrize(("path", "why"), [
    ("../x.log", "contains '..'"),
    ("logs/../../etc/shadow", "contains '..'"),
    ("logs/..", "contains '..'"),
    ("..", "contains '..'"),
    ("logs/\0x", "NUL byte"),
    ("/var/log/\0x", "NUL byte"),
    (".", "names the instance's disk itself"),
    ("./", "names the instance's disk itself"),
    ("", "is empty"),
])
def test_paths_that_could_leave_the_disk_are_refused(path: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why) as info:
        make(path)
    assert "tail" in str(info.value)


# -- resolution and confinement on the agent ------------------------------------------------------

@pytest.fixture(params=["openat2", "fallback"])
def opener(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every confinement test runs twice: with openat2 and with the checked fallback."""
    monkeypatch.setattr(capture, "openat2_usable", request.param == "openat2")
    yield str(request.param)
    if request.param == "openat2":  # else this run silently tested the fallback twice
        assert capture.openat2_usable, "the kernel refused openat2 (older than 5.6?)"


def process_record(disk: Path, tail: dict[str, str]) -> InstanceRecord:
    spec = WireSpec(name="web", driver="process", command=["true"], tail=tail)
    handle = Handle("process", "web", {"spec": {"rootfs": str(disk)}})
    return InstanceRecord(spec=spec, handle=handle, extra={"cwd_disk": True, "disk": str(disk)})


def read(cap: TailCapture) -> list[str]:
    batch, _ = cap.read_batch()
    return [] if batch is None else batch.lines


def tail_of(tmp_path: Path, where: TailPath) -> TailCapture:
    return TailCapture(where, tmp_path / "offsets.json", "h1", "web", "access")


def test_where_each_kind_of_path_is_read(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    rec = process_record(disk, {})
    wd = tmp_path / "wd"
    assert tail_path(rec, wd, "logs/a.log") == TailPath(disk, "logs/a.log", in_root=False)
    assert tail_path(rec, wd, "/var/log/a.log") == TailPath(Path("/var/log/a.log"))
    # a container (or a --from root): both kinds are inside its root, as it sees them
    runc = InstanceRecord(spec=WireSpec(name="c", driver="runc", command=["true"]),
                          handle=Handle("runc", "c", {"spec": {"rootfs": str(disk)}}))
    assert tail_path(runc, wd, "logs/a.log") == TailPath(disk, "logs/a.log", in_root=True)
    assert tail_path(runc, wd, "/var/log/a.log") == TailPath(disk, "var/log/a.log", in_root=True)
    # no disk at all (bare agent): the working directory is the workdir
    bare = InstanceRecord(spec=WireSpec(name="b", driver="process", command=["true"]),
                          handle=Handle("process", "b", {"spec": {"rootfs": None}}))
    assert tail_path(bare, wd, "a.log") == TailPath(wd, "a.log")


def test_a_file_in_the_disk_is_read(tmp_path: Path, opener: str) -> None:
    disk = tmp_path / "disk"
    (disk / "logs").mkdir(parents=True)
    cap = tail_of(tmp_path, TailPath(disk, "logs/access.log"))
    assert read(cap) == [] and cap.refused is None  # not there yet: nothing, no complaint
    (disk / "logs/access.log").write_text("hit 1\nhit 2\n")
    assert read(cap) == ["hit 1", "hit 2"]
    # a symlink that stays inside the disk is fine
    (disk / "real.log").write_text("inside\n")
    (disk / "logs/link.log").symlink_to("../real.log")
    assert read(tail_of(tmp_path, TailPath(disk, "logs/link.log"))) == ["inside"]


@pytest.mark.parametrize("plant", ["abs-file", "rel-file", "dir"])
def test_symlinks_out_of_the_disk_are_refused(tmp_path: Path, opener: str, plant: str) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "access.log").write_text("host secret\n")
    disk = tmp_path / "disk"
    (disk / "logs").mkdir(parents=True)
    if plant == "abs-file":
        (disk / "logs/access.log").symlink_to(secret / "access.log")
    elif plant == "rel-file":
        (disk / "logs/access.log").symlink_to("../../secret/access.log")
    else:
        (disk / "logs").rmdir()
        (disk / "logs").symlink_to(secret)
    cap = tail_of(tmp_path, TailPath(disk, "logs/access.log"))
    assert read(cap) == []
    assert cap.refused is not None and "leads out of" in cap.refused


def test_a_container_root_keeps_absolute_symlinks_inside(tmp_path: Path, opener: str) -> None:
    secret = tmp_path / "secret.log"
    secret.write_text("host secret\n")
    root = tmp_path / "rootfs"
    (root / "var/log").mkdir(parents=True)
    (root / "var/log/access.log").symlink_to(secret)  # as the container sees it: root/<secret>
    cap = tail_of(tmp_path, TailPath(root, "var/log/access.log", in_root=True))
    assert read(cap) == []  # never the host's file: refused, or looked up inside the root
    (root / str(secret).lstrip("/")).parent.mkdir(parents=True)
    (root / str(secret).lstrip("/")).write_text("the container's own\n")
    got = read(cap)
    assert got in ([], ["the container's own"])
    assert got == ["the container's own"] if opener == "openat2" else cap.refused is not None


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_only_regular_files_are_read(tmp_path: Path, opener: str, kind: str) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if kind == "fifo":
        os.mkfifo(disk / "access.log")  # opening it for reading must not block the agent
    else:
        (disk / "access.log").mkdir()
    cap = tail_of(tmp_path, TailPath(disk, "access.log"))
    assert read(cap) == []
    assert cap.refused is not None and "not a regular file" in cap.refused


class FakeJetStream:
    def __init__(self) -> None:
        self.batches: list[LogBatch] = []

    async def publish(self, subject: str, payload: bytes, headers: dict[str, Any]) -> None:
        self.batches.append(LogBatch.model_validate_json(payload))


async def test_the_agent_captures_a_relative_path_in_the_instances_disk(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    st = AgentState(tmp_path / "agent", {"fake": FakeDriver()}, 5.0)
    st.disks = HostDisks(tmp_path / "disks", "dir", tmp_path / "agent", "h1")
    tail = {"access": "logs/access.log", "evil": "logs/evil.log"}
    spec = WireSpec(name="web", driver="fake", command=["true"], tail=tail, epoch=1)
    await handlers.create(st, rpc.CreateArgs(spec=spec))
    disk = st.disks.path("web")
    (disk / "logs").mkdir()
    (disk / "logs/access.log").write_text("GET /a\nGET /b\n")
    (tmp_path / "host.log").write_text("host secret\n")
    (disk / "logs/evil.log").symlink_to(tmp_path / "host.log")
    mgr = CaptureManager(st, "h1")
    mgr.js = js = FakeJetStream()
    mgr.sync()
    await mgr.pump_all()
    await mgr.pump_all()
    by_source = {b.source: b.lines for b in js.batches}
    assert by_source == {"access": ["GET /a", "GET /b"]}
    refusals = [r.getMessage() for r in caplog.records if "not capturing web/evil" in
                r.getMessage()]
    assert len(refusals) == 1 and "leads out of" in refusals[0]  # said once, not every pump
