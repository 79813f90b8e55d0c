"""``corral run --image`` on a real local fleet: the agent fetches only the chunks it lacks, and
drops them once an invalidated image is used by none of its instances.

Figures come from what the agent itself records: ``image-chunks.json`` and the ``image`` entry of
each instance record (chunks the create fetched), and ``image-cache.json`` (the cache's chunks).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fleetkit import Fleet

HOST = "host1"


def app_tree(root: Path, hello: str, blob: bytes) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "data" / "hello").write_text(hello)
    (root / "lib").mkdir()
    (root / "lib" / "blob.bin").write_bytes(blob)
    (root / "run.sh").write_text("#!/bin/sh\ncat data/hello\nexec sleep 60\n")
    (root / "run.sh").chmod(0o755)
    return root


def agent_dir(fleet: Fleet) -> Path:
    return fleet.tmp / "data" / "hosts" / HOST


def cache(fleet: Fleet) -> dict[str, Any]:
    return dict(json.loads((agent_dir(fleet) / "image-cache.json").read_text()))


def fetched(fleet: Fleet, name: str) -> dict[str, Any]:
    rec = json.loads((agent_dir(fleet) / "instances" / name / "instance.json").read_text())
    return dict(rec["extra"]["image"])


def chunk_set(fleet: Fleet, name: str) -> set[str]:
    path = agent_dir(fleet) / "instances" / name / "image-chunks.json"
    return set(json.loads(path.read_text())["chunks"])


def wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def run_image(fleet: Fleet, name: str, image: str, *cmd: str) -> None:
    fleet.ok("run", name, "--image", image, "--driver", "process", "--host", HOST, "--", *cmd)


def test_run_image_cache_and_invalidation(local_fleet: Fleet, tmp_path: Path) -> None:
    f = local_fleet
    a = app_tree(tmp_path / "a", "hello from image A\n", os.urandom(3_000_000))
    b = app_tree(tmp_path / "b", "hello from image B\n", os.urandom(1_000_000))
    f.ok("image", "import", "app-a", str(a))
    f.ok("image", "import", "app-b", str(b))

    # refusals: unknown image (404 with a hint), image and rootfs together (422)
    missing = f.cli("run", "nope", "--image", "no-such", "--driver", "process", "--", "true")
    assert missing.returncode == 4 and "corral image ls" in missing.stderr, missing.stderr
    both = f.cli("run", "nope", "--image", "app-a", "--from", str(a), "--", "true")
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr

    # first instance: the agent fetches every chunk of the image; the workload reads its files
    run_image(f, "a1", "app-a", "sh", "-c", "cat data/hello; exec sleep 60")
    f.wait_state("a1", {"running"})
    assert f.instance("a1")["image"] == "app-a"
    wait_for("a1's output", lambda: "hello from image A" in f.ok("logs", "a1"))
    first = fetched(f, "a1")
    assert first["chunks"] > 1 and first["fetched_chunks"] == first["chunks"], first
    assert first["fetched_bytes"] > 1_000_000  # random data does not compress
    assert cache(f)["chunks"] == first["chunks"]

    # second instance of the same image on the same host: nothing crosses the wire
    run_image(f, "a2", "app-a", "./run.sh")
    f.wait_state("a2", {"running"})
    wait_for("a2's output", lambda: "hello from image A" in f.ok("logs", "a2"))
    second = fetched(f, "a2")
    assert second["manifest_id"] == first["manifest_id"]
    assert second["fetched_chunks"] == 0 and second["fetched_bytes"] == 0, second
    assert cache(f)["fetched_chunks"] == first["chunks"]

    run_image(f, "b1", "app-b", "./run.sh")
    f.wait_state("b1", {"running"})
    b_chunks = len(chunk_set(f, "b1"))
    both_images = len(chunk_set(f, "a1") | chunk_set(f, "b1"))  # run.sh is the same in both
    assert fetched(f, "b1")["fetched_chunks"] == b_chunks - (first["chunks"] + b_chunks
                                                              - both_images)
    assert cache(f)["chunks"] == both_images

    # removing the image on the server: the agent sweeps, but a1 and a2 still need its chunks
    f.ok("rm", "--force", "a2")
    sweeps = cache(f)["sweeps"]
    f.ok("image", "rm", "app-a")
    f.json("image", "gc")
    wait_for("the invalidation sweep", lambda: cache(f)["sweeps"] > sweeps)
    kept = cache(f)
    assert kept["chunks"] == both_images, kept
    assert "app-a" in kept["invalidated"]
    assert f.instance("a1")["state"] == "running"

    # the last instance of the removed image goes: its chunks go with it, app-b's stay
    f.ok("rm", "--force", "a1")
    dropped = wait_for("the chunks of app-a to go",
                       lambda: (c := cache(f))["chunks"] == b_chunks and c)
    assert dropped["invalidated"] == []
    assert dropped["dropped_chunks"] == both_images - b_chunks
    f.ok("rm", "--force", "b1")
