"""As root: ``corral run --image`` of a busybox image with runc on a ``--netns`` fleet.

The agents live in network namespaces and fetch chunks from the server's API over the bridge;
a second container of the image on the same host fetches nothing, one on another host fetches
the whole image into that host's own cache.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetkit import Fleet, fleet_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="--netns fleets need root"),
]


@pytest.fixture(scope="module")
def bfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet_for(tmp_path_factory.mktemp("bfleet"), "--hosts", "2", "--netns") as fleet:
        yield fleet


def fetched(fleet: Fleet, host: str, name: str) -> dict[str, Any]:
    path = fleet.tmp / "data" / "hosts" / host / "instances" / name / "instance.json"
    return dict(json.loads(path.read_text())["extra"]["image"])


def wait_output(fleet: Fleet, name: str, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in (out := fleet.ok("logs", name)):
        assert time.monotonic() < deadline, f"{name} never printed {text!r}: {out!r}"
        time.sleep(0.3)


def test_runc_busybox_image(bfleet: Fleet, tmp_path: Path) -> None:
    from corral.agent.busybox import build_busybox_rootfs

    root = build_busybox_rootfs(tmp_path / "bb")
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "hello").write_text("hello from busybox image\n")
    bfleet.ok("image", "import", "bb", str(root))
    cmd = ["--", "sh", "-c", "cat /data/hello; exec sleep 600"]
    for name, host in (("r1", "host1"), ("r2", "host1"), ("r3", "host2")):
        bfleet.ok("run", name, "--image", "bb", "--host", host, *cmd)  # runc by default
    for name in ("r1", "r2", "r3"):
        view = bfleet.wait_state(name, {"running"})
        assert view["driver"] == "runc" and view["image"] == "bb"
        wait_output(bfleet, name, "hello from busybox image")
    r1, r2, r3 = (fetched(bfleet, h, n) for n, h in
                  (("r1", "host1"), ("r2", "host1"), ("r3", "host2")))
    assert r1["fetched_chunks"] == r1["chunks"] > 0
    assert r2["fetched_chunks"] == 0  # same host: all cached
    assert r3["fetched_chunks"] == r3["chunks"]  # another host has its own cache
    for name in ("r1", "r2", "r3"):
        bfleet.ok("rm", "--force", name)
